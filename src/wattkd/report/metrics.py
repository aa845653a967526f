"""Report metrics as pure functions, plus `Quantity`: a number that carries where it came from.

Every figure in a report is a `Quantity`: value, unit, uncertainty (± absolute, same unit),
energy source label, whether it is `estimated`, and — when there is no value — the reason
(`gap`). Functions here never turn a missing input into 0: they return a gap instead, so a
table shows "—" with the reason rather than a plausible-looking number.

Definitions (docs/metrics.md; unit-tested against hand-computed examples):
  E_run            sum of the run's `train` phase energies (GPU counter deltas, all devices)
  E_avg            mean E_run over repeats; spread = sample std (ddof 1), min, max
  EPT_train        E_train / tokens trained
  OM_perf(S)       mean over tasks t of s_t(S) / s_t(T)
  OM_ppl(S)        ppl(T) / ppl(S) = exp(-(nll_S - nll_T)); used only when no task scores exist
  OM_perf(method)  mean over the method's students
  Eff_overall(m)   (1/K) sum_i OM_perf(S_i) * EPT(T) / EPT(S_i)
  J per point      E_total / (100 * OM_perf): energy per retained percentage point of teacher
                   quality
Uncertainties add linearly over sums (the sensor gain error is systematic, so windows of one
device are correlated; linear is the conservative bound) and relative uncertainties add
linearly over products and ratios.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from wattkd.errors import DataError

GAP_MARK = "—"


class MetricError(DataError, ValueError):
    """A metric cannot be computed from these inputs; the message says why (becomes a gap)."""


@dataclass(frozen=True)
class Quantity:
    """A reported number with its provenance, or a gap with its reason."""

    value: float | None
    unit: str = ""
    unc: float | None = None          # ± absolute, in `unit`
    source: str | None = None         # e.g. "nvml-counter", "rapl", "estimated-cpu-time"
    estimated: bool = False
    gap: str | None = None            # why `value` is None
    note: str | None = None           # caveat shown beside a value (footnote)

    def __post_init__(self) -> None:
        if self.value is None and not self.gap:
            raise ValueError("a Quantity without a value needs a gap reason")
        if self.value is not None and not math.isfinite(self.value):
            raise ValueError(f"non-finite value {self.value!r}; use Quantity.missing(reason)")

    @classmethod
    def missing(cls, reason: str, unit: str = "") -> Quantity:
        return cls(None, unit, gap=reason)

    @property
    def ok(self) -> bool:
        return self.value is not None

    def with_note(self, note: str | None) -> Quantity:
        if not note:
            return self
        return replace(self, note=f"{self.note}; {note}" if self.note else note)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and v is not False}


def merge_sources(qs: Iterable[Quantity]) -> str | None:
    """The sources of `qs` joined with "+", each once, in first-seen order."""
    seen: list[str] = []
    for q in qs:
        for s in (q.source or "").split("+"):
            if s and s not in seen:
                seen.append(s)
    return "+".join(seen) or None


def is_estimated_source(source: str | None) -> bool:
    return bool(source) and str(source).startswith("estimated")


def total(qs: Sequence[Quantity], *, unit: str | None = None, what: str = "sum") -> Quantity:
    """Sum of quantities; a gap in any part makes the sum a gap (naming the part's reason)."""
    if not qs:
        return Quantity.missing(f"{what}: nothing to add", unit or "")
    gaps = [q.gap for q in qs if not q.ok]
    if gaps:
        return Quantity.missing(gaps[0] if len(set(gaps)) == 1 else "; ".join(dict.fromkeys(gaps)),
                                unit or qs[0].unit)
    uncs = [q.unc for q in qs]
    return Quantity(math.fsum(q.value for q in qs), unit or qs[0].unit,  # type: ignore[misc]
                    unc=None if any(u is None for u in uncs) else math.fsum(uncs),  # type: ignore[arg-type]
                    source=merge_sources(qs), estimated=any(q.estimated for q in qs))


def ratio(num: Quantity, den: Quantity, unit: str) -> Quantity:
    """num / den with relative uncertainties added; a gap or zero denominator is a gap."""
    for q in (num, den):
        if not q.ok:
            return Quantity.missing(q.gap or "missing input", unit)
    if den.value == 0:
        return Quantity.missing("division by zero (denominator is 0)", unit)
    value = num.value / den.value  # type: ignore[operator]
    return Quantity(value, unit, unc=_rel_unc(value, num, den), source=merge_sources((num, den)),
                    estimated=num.estimated or den.estimated)


def _rel_unc(value: float, *qs: Quantity) -> float | None:
    rel = 0.0
    for q in qs:
        if q.unc is None:
            if q.source is not None:          # an energy figure without an uncertainty
                return None
            continue
        if q.value == 0:
            return None
        rel += abs(q.unc / q.value)  # type: ignore[operator]
    return abs(value) * rel


# ----------------------------------------------------------------------------- aggregates
@dataclass(frozen=True)
class Spread:
    mean: float
    std: float | None       # sample std (ddof 1); None for a single value
    min: float
    max: float
    n: int


def spread(values: Sequence[float]) -> Spread:
    """Mean and spread of repeats; std is the sample standard deviation (n-1)."""
    if not values:
        raise MetricError("no values")
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Spread(mean, std, min(values), max(values), n)


def mean_quantity(qs: Sequence[Quantity], unit: str, *, what: str, names: Sequence[str] = ()
                  ) -> tuple[Quantity, Spread | None]:
    """Mean over the available values; missing ones are named in a note, never counted as 0.

    The uncertainty of the mean is the mean of the uncertainties (systematic errors do not
    average out); the spread of the values is returned separately.
    """
    names = list(names) or [f"#{i}" for i in range(len(qs))]
    have = [(n, q) for n, q in zip(names, qs, strict=True) if q.ok]
    if not have:
        reasons = "; ".join(dict.fromkeys(f"{n}: {q.gap}" for n, q in zip(names, qs, strict=True)))
        return Quantity.missing(f"no {what} available ({reasons})" if qs else f"no {what}",
                                unit), None
    sp = spread([q.value for _, q in have])  # type: ignore[misc]
    uncs = [q.unc for _, q in have]
    q = Quantity(sp.mean, unit, unc=None if any(u is None for u in uncs)
                 else math.fsum(uncs) / len(uncs),  # type: ignore[arg-type]
                 source=merge_sources(q for _, q in have),
                 estimated=any(q.estimated for _, q in have))
    missing = [n for n, q in zip(names, qs, strict=True) if not q.ok]
    if missing:
        q = q.with_note(f"mean of {len(have)} of {len(qs)}; missing: {', '.join(missing)}")
    return q, sp


# ------------------------------------------------------------------------------- quality
def om_perf(student: Mapping[str, float], teacher: Mapping[str, float]) -> float:
    """OM_perf(S) = mean over tasks t of s_t(S) / s_t(T). Task sets must be identical."""
    if not teacher:
        raise MetricError("the teacher has no task scores")
    only_s, only_t = sorted(set(student) - set(teacher)), sorted(set(teacher) - set(student))
    if only_s or only_t:
        parts = []
        if only_t:
            parts.append(f"tasks missing in the student: {', '.join(only_t)}")
        if only_s:
            parts.append(f"tasks missing in the teacher: {', '.join(only_s)}")
        raise MetricError("task sets differ (" + "; ".join(parts) + ")")
    zero = sorted(t for t, s in teacher.items() if s == 0)
    if zero:
        raise MetricError(f"teacher scores 0 on {', '.join(zero)}: the ratio is undefined")
    return math.fsum(student[t] / teacher[t] for t in sorted(teacher)) / len(teacher)


def worse_than_uniform(nll: float, vocab: int | None) -> bool:
    """True when a mean held-out NLL (nats a token) exceeds ln(vocab), a uniform guess over the
    vocabulary: the model has collapsed (for example onto its own degenerate on-policy
    rollouts), and its log-likelihood task scores sit at chance, not at a quality."""
    return vocab is not None and vocab > 1 and not nll <= math.log(vocab)   # NaN included


def ppl_retention(student_ppl: float, teacher_ppl: float) -> float:
    """OM_ppl(S) = ppl(T) / ppl(S) = exp(-(nll_S - nll_T)); 1.0 = as good as the teacher."""
    if not (student_ppl > 0 and teacher_ppl > 0):
        raise MetricError(f"perplexities must be > 0 (student {student_ppl}, "
                          f"teacher {teacher_ppl})")
    return teacher_ppl / student_ppl


def eff_overall(om: Sequence[float], ept_students: Sequence[float], ept_teacher: float) -> float:
    """Eff_overall = (1/K) sum_i OM_perf(S_i) * EPT(T) / EPT(S_i)."""
    if len(om) != len(ept_students):
        raise MetricError(f"{len(om)} OM_perf values but {len(ept_students)} EPT values")
    if not om:
        raise MetricError("no student has both OM_perf and EPT")
    if ept_teacher <= 0 or any(e <= 0 for e in ept_students):
        raise MetricError("EPT values must be > 0")
    return math.fsum(o * ept_teacher / e for o, e in zip(om, ept_students, strict=True)) / len(om)


def energy_per_point(energy_j: float, om: float) -> float:
    """J per retained percentage point of teacher quality: E / (100 * OM)."""
    if om <= 0:
        raise MetricError(f"OM is {om}: no quality retained, energy per point is undefined")
    return energy_j / (100.0 * om)


def dynamic_ept(energy_j: float, idle_power_w: float, duration_s: float, tokens: int) -> float:
    """(E - P_idle * t) / tokens: the energy the work added above idle, per token."""
    if tokens <= 0:
        raise MetricError("no tokens")
    return (energy_j - idle_power_w * duration_s) / tokens


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points (energy: lower is better, quality: higher is better) nobody dominates."""
    front = []
    for i, (e, q) in enumerate(points):
        dominated = any(e2 <= e and q2 >= q and (e2 < e or q2 > q)
                        for j, (e2, q2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front
