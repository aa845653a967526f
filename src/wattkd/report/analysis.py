"""Turn collected runs into report results: per-run energy, quality, EPT; per-method summaries.

Choices a reader must know are made here once and recorded on `Analysis` (and printed in the
report's "Definitions" section):
  * energy basis for derived figures (EPT, E_total, J per point, plots): GPU when any student
    run has GPU energy, else CPU (labelled `estimated` when it is). E_run GPU and CPU are both
    always tabulated.
  * quality basis: task scores (OM_perf) when any run has task evaluations; otherwise held-out
    perplexity retention (OM_ppl = ppl_T / ppl_S = exp(nll_T - nll_S)), labelled as such.
  * EPT batch size for Eff_overall: the largest batch size the teacher and every student were
    measured at (else the teacher's largest).
A figure that cannot be computed is a `Quantity` gap with its reason, never 0.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wattkd.amortisation import Share, cache_share, finetune_share
from wattkd.distill.methods.registry import report_order
from wattkd.energy.components import basis_order, component, components_of, label_of, shown
from wattkd.energy.metrics import e_avg as ledger_e_avg
from wattkd.energy.metrics import ept as ledger_ept
from wattkd.eval.protocol import ProtocolMismatch, compare_protocols
from wattkd.report.collect import RunData
from wattkd.report.energy import FLAG_NOTES, GPU_FLAGS, phase_energy, window_tokens
from wattkd.report.ept_steady import steady_fields
from wattkd.report.metrics import (
    MetricError,
    Quantity,
    Spread,
    eff_overall,
    energy_per_point,
    is_estimated_source,
    mean_quantity,
    merge_sources,
    om_perf,
    ppl_retention,
    ratio,
    total,
    worse_than_uniform,
)
from wattkd.report.onpolicy import DEFINITIONS as ONPOLICY_DEFINITIONS
from wattkd.report.onpolicy import StepSplit, step_split

log = logging.getLogger(__name__)

KIND_ORDER = report_order()  # each method's declared place; the teacher last

# ------------------------------------------------------------------------------- results
@dataclass
class PhaseRow:
    phase: str
    records: int
    duration_s: float
    tokens: int
    energy: dict[str, Quantity]           # component -> energy
    dynamic: dict[str, Quantity]          # component -> energy above idle


@dataclass
class EptPoint:
    batch_size: int
    ept_in: Quantity
    ept_out: Quantity
    ept_total: Quantity
    ept_dynamic: Quantity                 # total EPT above idle power
    ept_dynamic_in: Quantity
    ept_dynamic_out: Quantity
    # wattkd.ept/2 steady-state figures (gaps for wattkd.ept/1 files): report/ept_section.py
    steady: dict[str, Quantity] = field(default_factory=dict)
    engine: str = ""
    spread: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    run: RunData
    student: str
    e_run: dict[str, Quantity]            # train windows, per component
    tokens_train: int | None
    duration_train_s: float | None
    ept_train: Quantity                   # basis component
    cache_share: Quantity | None          # None: not applicable (see cache_note)
    cache_note: str
    e_total: Quantity                     # basis: E_train + cache share
    phases: list[PhaseRow]
    quality: Quantity                     # OM_perf or OM_ppl (see Analysis.quality_basis)
    task_scores: dict[str, Quantity] = field(default_factory=dict)
    task_ratios: dict[str, Quantity] = field(default_factory=dict)
    ept: dict[int, EptPoint] = field(default_factory=dict)
    ept_at: Quantity = field(default_factory=lambda: Quantity.missing("not computed"))
    j_per_point: Quantity = field(default_factory=lambda: Quantity.missing("not computed"))
    finetune_share: Quantity | None = None  # teacher fine-tune share (None: not used)

    @property
    def label(self) -> str:
        return self.run.label


@dataclass
class ConfigResult:
    """One configuration (method x student) and its repeats."""

    method: str
    kind: str
    student: str
    runs: list[RunResult]
    e_avg: Quantity
    e_spread: Spread | None
    ept_train: Quantity


@dataclass
class MethodResult:
    method: str
    kind: str
    runs: list[RunResult]
    e_avg: Quantity
    e_spread: Spread | None
    e_total: Quantity
    om: Quantity
    om_spread: Spread | None
    eff: Quantity
    k_eff: int
    j_per_point: Quantity


@dataclass
class Analysis:
    students: list[RunResult]
    teacher: RunResult
    configs: list[ConfigResult]
    methods: list[MethodResult]
    basis: str                            # gpu | cpu
    quality_basis: str                    # tasks | perplexity | none
    suite: str | None
    tasks: list[str]
    ept_batch: int | None
    ept_batch_note: str
    warnings: list[str]
    onpolicy: dict[str, StepSplit] = field(default_factory=dict)  # run label -> phase split

    @property
    def basis_label(self) -> str:
        ok = [r for r in self.students if r.e_run[self.basis].ok]
        est = bool(ok) and all(r.e_run[self.basis].estimated for r in ok)
        return label_of(self.basis) + (", estimated" if est else "")

    def missing_inputs(self, r: RunResult) -> dict[str, str]:
        """The run's missing inputs that matter for this report (a perplexity file is not
        missed when task scores are the quality basis, and the other way round)."""
        skip = {"tasks": {"perplexity"}, "perplexity": {"eval"}}.get(self.quality_basis, set())
        return {k: v for k, v in sorted(r.run.gaps.items()) if k not in skip}

    @property
    def quality_label(self) -> str:
        return {"tasks": "OM_perf", "perplexity": "OM_ppl (perplexity retention)"}.get(
            self.quality_basis, "OM_perf")


def phase_rows(run: RunData, comps: Sequence[str]) -> list[PhaseRow]:
    """Top-level phase windows grouped by name, in first-seen order."""
    if run.phases is None:
        return []
    names: list[str] = []
    for r in run.phases:
        if r.get("kind", "phase") == "phase" and r.get("depth", 0) == 0 \
                and r.get("phase") not in names:
            names.append(r.get("phase"))
    rows = []
    for name in names:
        recs = [r for r in run.phases if r.get("kind", "phase") == "phase"
                and r.get("depth", 0) == 0 and r.get("phase") == name]
        energy, dynamic = {}, {}
        for c in comps:
            energy[c], _ = phase_energy(_only(run, recs), name, c)
            dyn = [r.get("dynamic_energy_j", {}).get(c) for r in recs]
            if energy[c].ok and all(d is not None for d in dyn):
                dynamic[c] = Quantity(math.fsum(dyn), "J", source=energy[c].source,
                                      estimated=energy[c].estimated)
            elif energy[c].ok:
                dynamic[c] = Quantity.missing("idle power not measured", "J")
            else:
                dynamic[c] = Quantity.missing(energy[c].gap or "", "J")
        rows.append(PhaseRow(name, len(recs), math.fsum(float(r.get("duration_s", 0)) for r in recs),
                             window_tokens(recs), energy, dynamic))
    return rows


def _only(run: RunData, recs: list[dict[str, Any]]) -> RunData:
    return RunData(run.path, run.label, run.info, phases=recs, gaps=run.gaps,
                   energy_notes=run.energy_notes)


def _quantity(share: Share | None) -> Quantity | None:
    """A teacher-side share (wattkd.amortisation) as a report figure."""
    if share is None:
        return None
    if share.value is None:
        return Quantity.missing(share.gap or "unavailable", "J")
    return Quantity(share.value, "J", share.unc, share.source, share.estimated,
                    note=share.note)


# ------------------------------------------------------------------------------- quality
def _doc_scores(doc: dict[str, Any]) -> dict[str, tuple[float | None, float | None]]:
    return {t: (v.get("value"), v.get("stderr")) for t, v in (doc.get("scores") or {}).items()}


def _protocol_gap(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str],
                  ignore: tuple[str, ...] = ()) -> str | None:
    """None when a and b share a protocol, else the refusal naming each difference.

    `ignore`: protocol keys left out of the comparison (EPT: the batch-size list, since EPT at
    batch b compares across sweeps that both measured b). Each file's stored hash is still
    checked against its full protocol, so an edited file is refused.
    """
    try:
        if ignore:
            for doc, name in zip((a, b), names, strict=True):
                compare_protocols(doc, doc, names=(name, name + " "))
            a = {"protocol": {k: v for k, v in (a.get("protocol") or {}).items()
                              if k not in ignore}}
            b = {"protocol": {k: v for k, v in (b.get("protocol") or {}).items()
                              if k not in ignore}}
        compare_protocols(a, b, names=names)
    except ProtocolMismatch as exc:
        lines = [ln.strip(" -") for ln in str(exc).splitlines()]
        head = "protocol differs from the teacher's; refusing to compare"
        diffs = [ln for ln in lines[1:] if ln and not ln.startswith("Re-run")]
        return head + (": " + "; ".join(diffs) if diffs else f": {lines[0]}")
    return None


def task_quality(run: RunData, teacher: RunData, suite: str
                 ) -> tuple[Quantity, dict[str, Quantity], dict[str, Quantity]]:
    """OM_perf of one run on `suite`, its task scores and per-task ratios (or gaps)."""
    doc = run.evals.get(suite)
    scores: dict[str, Quantity] = {}
    ratios: dict[str, Quantity] = {}
    if doc is None:
        return Quantity.missing(f"no eval/{suite}.json"), scores, ratios
    for t, (v, se) in _doc_scores(doc).items():
        scores[t] = Quantity(v, "", se) if v is not None else Quantity.missing(
            f"task {t}: score is null in eval/{suite}.json")
    tdoc = teacher.evals.get(suite)
    if tdoc is None:
        return Quantity.missing(f"teacher has no eval/{suite}.json: OM_perf needs the teacher's "
                                "scores"), scores, ratios
    gap = _protocol_gap(doc, tdoc, (run.label, "teacher"))
    if gap:
        return Quantity.missing(gap), scores, ratios
    ts = _doc_scores(tdoc)
    null = sorted(t for t, (v, _) in list(_doc_scores(doc).items()) + list(ts.items())
                  if v is None)
    if null:
        return Quantity.missing(f"null score for {', '.join(dict.fromkeys(null))}"), scores, ratios
    s_vals = {t: v for t, (v, _) in _doc_scores(doc).items()}
    t_vals = {t: v for t, (v, _) in ts.items()}
    try:
        value = om_perf(s_vals, t_vals)  # type: ignore[arg-type]
    except MetricError as exc:
        return Quantity.missing(str(exc)), scores, ratios
    # statistical uncertainty from the tasks' stderr (independent tasks: quadrature)
    var, have_all = 0.0, True
    for t in sorted(t_vals):
        s, ss = _doc_scores(doc)[t]
        tv, st = ts[t]
        r = s / tv  # type: ignore[operator]
        if ss is None or st is None:
            have_all = False
            ratios[t] = Quantity(r)
            continue
        # r = s / tv: relative errors add in quadrature; at s = 0 only the student's counts
        unc = (abs(r) * math.sqrt((ss / s) ** 2 + (st / tv) ** 2) if s  # type: ignore[operator]
               else ss / tv)  # type: ignore[operator]
        ratios[t] = Quantity(r, "", unc)
        var += unc ** 2
    unc = math.sqrt(var) / len(t_vals) if have_all else None
    return Quantity(value, "", unc), scores, ratios


def ppl_quality(run: RunData, teacher: RunData) -> Quantity:
    doc, tdoc = run.perplexity, teacher.perplexity
    if doc is None:
        return Quantity.missing(run.gaps.get("perplexity", "no eval/perplexity.json"))
    if tdoc is None:
        return Quantity.missing("teacher has no eval/perplexity.json: OM_ppl needs the "
                                "teacher's perplexity")
    gap = _protocol_gap(doc, tdoc, (run.label, "teacher"))
    if gap:
        return Quantity.missing(gap)
    try:
        if doc.get("nll") is not None and tdoc.get("nll") is not None:
            value = math.exp(float(tdoc["nll"]) - float(doc["nll"]))
        else:
            value = ppl_retention(float(doc["perplexity"]), float(tdoc["perplexity"]))
    except (KeyError, TypeError, ValueError, MetricError) as exc:
        return Quantity.missing(f"perplexity result unusable: {exc}")
    return Quantity(value, "")


def choose_suite(students: Sequence[RunData], teacher: RunData) -> str | None:
    counts: dict[str, int] = defaultdict(int)
    for r in list(students) + [teacher]:
        for s in r.evals:
            counts[s] += 2 if r is teacher else 1
    if not counts:
        return None
    return min(counts, key=lambda s: (-counts[s], s))


# ----------------------------------------------------------------------------------- EPT
def choose_ept_batch(students: Sequence[RunResult], teacher: RunResult) -> tuple[int | None, str]:
    t_sizes = set(teacher.ept)
    if not t_sizes:
        common = set.intersection(*(set(r.ept) for r in students)) if students else set()
        if common:
            return max(common), "teacher has no EPT result; largest batch size of every student"
        return None, "no batch size measured for the teacher and every student"
    common = t_sizes.intersection(*(set(r.ept) for r in students if r.ept))
    if common:
        return max(common), "largest batch size measured for the teacher and every student"
    return max(t_sizes), "no batch size is common to all runs; the teacher's largest"


def ept_points(run: RunData, comp: str) -> list[EptPoint]:
    """EPT figures of ept.json (wattkd.ept/1 and /2) for one energy component, per batch
    size; /2 adds the steady-state figures (ms per step, J per output token of decode, ...)."""
    doc = run.ept
    if not doc:
        return []
    pts = []
    for r in doc.get("runs") or []:
        e = (r.get("energy") or {}).get(comp) or {}
        src = e.get("source") or "unavailable"
        est = bool(e.get("estimated")) or is_estimated_source(src)
        unc = e.get("uncertainty_j")
        flag_note = "; ".join(f"{f}: {FLAG_NOTES[f]}" for f in r.get("flags") or []
                              if f in FLAG_NOTES and (comp == "gpu" or f not in GPU_FLAGS))

        def q(key: str, tokens_key: str, e: dict[str, Any] = e, src: str = src, est: bool = est,
              unc: Any = unc, r: dict[str, Any] = r, note: str = flag_note) -> Quantity:
            v = e.get(key)
            if v is None:
                why = ("idle power not measured" if key.startswith("dynamic") and
                       e.get("ept_total_j") is not None else
                       f"no {label_of(comp)} energy in ept.json (source: {src})")
                return Quantity.missing(why, "J/token")
            tokens = r.get(tokens_key) or 0
            u = unc / tokens if unc is not None and tokens else None
            return Quantity(float(v), "J/token", u, src, est, note=note or None)

        pts.append(EptPoint(int(r["batch_size"]), q("ept_in_j", "input_tokens"),
                            q("ept_out_j", "output_tokens"), q("ept_total_j", "total_tokens"),
                            q("dynamic_ept_total_j", "total_tokens"),
                            q("dynamic_ept_in_j", "input_tokens"),
                            q("dynamic_ept_out_j", "output_tokens"),
                            **steady_fields(doc, r, comp)))
    return sorted(pts, key=lambda p: p.batch_size)


# ------------------------------------------------------------------------------- student
def student_id(run: RunData) -> str:
    """A short name of the student configuration (repeats of one configuration share it)."""
    cfg_path = run.path / "config.yaml"
    st: dict[str, Any] = {}
    if cfg_path.is_file():
        try:
            st = (yaml.safe_load(cfg_path.read_text()) or {}).get("student") or {}
        except yaml.YAMLError:
            st = {}
    if run.kind == "teacher":
        return "teacher"
    name = None
    if st.get("model"):
        name = Path(str(st["model"])).name
    elif isinstance(st.get("build"), dict):
        b = st["build"]
        name = (f"{b.get('model_type', 'model')}-h{b.get('hidden_size', '?')}"
                f"-L{b.get('num_hidden_layers', '?')}")
    elif st.get("from_teacher_layers"):
        name = "teacher-layers" + ",".join(str(i) for i in st["from_teacher_layers"])
    if name and isinstance(st.get("lora"), dict):
        name += f"+lora-r{st['lora'].get('r', '?')}"
    if name is None and run.info.get("parameters"):
        p = run.info["parameters"]
        name = f"{p.get('total', p) if isinstance(p, dict) else p} params"
    return name or "student"


# ----------------------------------------------------------------------------- assembling
def _run_result(run: RunData, comps: Sequence[str], basis: str) -> RunResult:
    e = {}
    fig = None
    for c in comps:
        e[c], f = phase_energy(run, "train", c)
        if c == basis:
            fig = f
    # every host's record carries the global token count (train.py adds tokens x world size)
    train_recs = [r for r in run.phases or [] if r.get("kind", "phase") == "phase"
                  and r.get("phase") == "train"]
    tokens = window_tokens(train_recs) if train_recs else None
    if e[basis].ok and tokens:
        v = ledger_ept(e[basis].value, tokens)
        q = e[basis]
        ept_train = Quantity(v, "J/token", None if q.unc is None else q.unc / tokens, q.source,
                             q.estimated)
    elif e[basis].ok:
        ept_train = Quantity.missing("no tokens recorded for the train windows", "J/token")
    else:
        ept_train = Quantity.missing(e[basis].gap or "", "J/token")
    cache, note = cache_share(run.info, run.kind, basis)
    share = _quantity(cache)
    e_total = e[basis] if share is None else total([e[basis], share], unit="J")
    if share is not None and e_total.ok and share.ok:
        e_total = e_total.with_note("includes the amortised teacher-cache share")
    ft = _quantity(finetune_share(run.info, basis)) if run.kind != "teacher" else None
    if ft is not None:
        e_total = total([e_total, ft], unit="J")
        if e_total.ok:
            e_total = e_total.with_note("includes the amortised teacher fine-tune share")
    return RunResult(run, student_id(run), e, tokens, fig.duration_s if fig else None,
                     ept_train, share, note, e_total, phase_rows(run, comps),
                     Quantity.missing("not computed"), finetune_share=ft)


def report_components(runs: Sequence[RunData]) -> list[str]:
    """The energy components the report tabulates: those always shown (GPU, CPU) and every
    other one some window measured (DRAM, node, ...), in declaration order."""
    recs = [p for r in runs for p in r.phases or []]
    measured = {c for p in recs for c, v in (p.get("energy_j") or {}).items() if v is not None}
    return [c for c in components_of(*recs) if shown(c, c in measured)]


def analyze(students: Sequence[RunData], teacher: RunData, *, ept_batch: int | None = None
            ) -> Analysis:
    """Every number of the report, computed once from the collected runs."""
    warnings: list[str] = []
    comps = report_components([*students, teacher])
    basis = next((c for c in basis_order(comps)
                  if any(phase_energy(r, "train", c)[0].ok for r in students)), "gpu")
    if basis != "gpu":
        warnings.append("no student run has GPU energy: derived figures (EPT, E_total, "
                        f"Eff_overall, J per point) use {label_of(basis)} energy")
    students = sorted(students, key=lambda r: (KIND_ORDER.get(r.kind, 5), r.method, r.repeat,
                                               r.label))
    results = [_run_result(r, comps, basis) for r in students]
    tres = _run_result(teacher, comps, basis)

    # quality
    any_tasks = any(r.evals for r in list(students) + [teacher])
    suite = choose_suite(students, teacher) if any_tasks else None
    qbasis = "tasks" if any_tasks else ("perplexity" if any(
        r.perplexity for r in list(students) + [teacher]) else "none")
    tasks: list[str] = []
    if suite is not None:
        for r in [teacher, *students]:
            for t in (r.evals.get(suite) or {}).get("scores") or {}:
                if t not in tasks:
                    tasks.append(t)
        if suite not in teacher.evals:
            warnings.append(f"the teacher has no eval/{suite}.json: OM_perf and Eff_overall "
                            "cannot be computed")
        others = sorted({s for r in [teacher, *students] for s in r.evals} - {suite})
        if others:
            warnings.append(f"suite {suite!r} is the quality basis; also present and not used "
                            f"for OM_perf: {', '.join(others)}")
    for rr in results + [tres]:
        if qbasis == "tasks":
            if rr is tres:
                rr.quality = Quantity(1.0, "") if suite in teacher.evals else \
                    Quantity.missing(f"teacher has no eval/{suite}.json")
                _, rr.task_scores, _ = task_quality(teacher, teacher, suite)  # type: ignore[arg-type]
            else:
                rr.quality, rr.task_scores, rr.task_ratios = task_quality(rr.run, teacher,
                                                                          suite)  # type: ignore[arg-type]
        elif qbasis == "perplexity":
            rr.quality = ppl_quality(rr.run, teacher) if rr is not tres else (
                Quantity(1.0, "") if teacher.perplexity else
                Quantity.missing("teacher has no eval/perplexity.json"))
        else:
            rr.quality = Quantity.missing("no task scores and no perplexity for any run")
    for rr in results + [tres]:
        note = collapsed(rr.run)
        if note:
            rr.quality = rr.quality.with_note(note)
            warnings.append(f"{rr.label}: {note}")
    if qbasis == "perplexity":
        warnings.append("no task evaluations: quality is perplexity retention OM_ppl = "
                        "ppl(teacher) / ppl(student), not OM_perf")
    elif qbasis == "none":
        warnings.append("no evaluation results at all: OM_perf, Eff_overall and J per point are "
                        "gaps")

    # EPT
    for rr in results + [tres]:
        rr.ept = {p.batch_size: p for p in ept_points(rr.run, basis)}
    if ept_batch is None:
        ept_batch, batch_note = choose_ept_batch(results, tres)
    else:
        batch_note = "chosen by the caller"
    for rr in results + [tres]:
        if ept_batch is None:
            rr.ept_at = Quantity.missing(batch_note, "J/token")
        elif ept_batch in rr.ept:
            rr.ept_at = rr.ept[ept_batch].ept_total
            gap = (_protocol_gap(rr.run.ept, teacher.ept, (rr.label, "teacher"),
                                 ignore=("batch_sizes",))
                   if rr is not tres and teacher.ept else None)
            if gap:
                rr.ept_at = Quantity.missing("EPT " + gap, "J/token")
        elif rr.ept:
            rr.ept_at = Quantity.missing(f"no EPT at batch size {ept_batch} (measured: "
                                         f"{', '.join(map(str, sorted(rr.ept)))})", "J/token")
        else:
            rr.ept_at = Quantity.missing(rr.run.gaps.get("ept", "no EPT result"), "J/token")
        rr.j_per_point = _j_per_point(rr.e_total, rr.quality)
    for rr in results:
        for what, q in (("quality", rr.quality), ("EPT", rr.ept_at)):
            if q.gap and "refusing to compare" in q.gap:
                warnings.append(f"{rr.label}: {what} not compared with the teacher — {q.gap}")
    if not tres.ept_at.ok:
        warnings.append(f"teacher EPT unavailable ({tres.ept_at.gap}): Eff_overall cannot be "
                        "computed")

    configs = _configs(results, basis)
    methods = [_method(name, rs, tres, basis) for name, rs in _group(results, lambda r: r.run.method)]
    methods.sort(key=lambda m: (KIND_ORDER.get(m.kind, 5), m.method))
    for r in [*students, teacher]:
        warnings.extend(f"{r.label}: {n}" for n in r.read_notes)
    for r in [*students, teacher]:
        if r.status not in ("completed", "budget", "unknown") and r.kind != "teacher":
            warnings.append(f"{r.label}: status {r.status!r} (figures are from an unfinished run)")
    onpolicy = {r.label: s for r in results if (s := step_split(r.run, basis)) is not None}
    warnings.extend(f"{label}: on-policy phases do not add up to the step windows: "
                    f"{s.check_text}" for label, s in onpolicy.items() if s.check == "outside")
    return Analysis(results, tres, configs, methods, basis, qbasis, suite, tasks, ept_batch,
                    batch_note, warnings, onpolicy)


def collapsed(run: RunData) -> str | None:
    """Why a run's model is degenerate (held-out NLL above a uniform guess over its
    vocabulary), else None. Its task scores then sit at chance, and a quality figure built on
    them (OM_perf) would rank a broken model (issue 27's lambda-1 on-policy student did)."""
    doc = run.perplexity or {}
    nll, vocab = doc.get("nll"), doc.get("vocab")
    if nll is None or not isinstance(vocab, int) or not worse_than_uniform(float(nll), vocab):
        return None
    return (f"collapsed model: held-out NLL {float(nll):.3g} nats a token is above ln({vocab}) "
            f"= {math.log(vocab):.3g}, a uniform guess over the vocabulary; its task scores sit "
            "at chance and are no evidence of quality")


def _j_per_point(energy: Quantity, quality: Quantity) -> Quantity:
    if not energy.ok:
        return Quantity.missing(energy.gap or "", "J/pt")
    if not quality.ok:
        return Quantity.missing(quality.gap or "", "J/pt")
    try:
        v = energy_per_point(energy.value, quality.value)  # type: ignore[arg-type]
    except MetricError as exc:
        return Quantity.missing(str(exc), "J/pt")
    unc = None if energy.unc is None else energy.unc / (100.0 * quality.value)  # type: ignore[operator]
    return Quantity(v, "J/pt", unc, energy.source, energy.estimated)


def _group(items: Sequence[RunResult], key: Any) -> list[tuple[Any, list[RunResult]]]:
    out: dict[Any, list[RunResult]] = {}
    for it in items:
        out.setdefault(key(it), []).append(it)
    return list(out.items())


def _e_avg(runs: Sequence[RunResult], basis: str) -> tuple[Quantity, Spread | None]:
    qs = [r.e_run[basis] for r in runs]
    missing = [r.label for r, q in zip(runs, qs, strict=True) if not q.ok]
    if missing:
        return Quantity.missing("E_avg needs every repeat's energy; missing: " + "; ".join(
            f"{r.label} ({r.e_run[basis].gap})" for r in runs if not r.e_run[basis].ok), "J"), None
    values = [q.value for q in qs]
    mean, std, n = ledger_e_avg(values)
    uncs = [q.unc for q in qs]
    q = Quantity(mean, "J", None if None in uncs else math.fsum(uncs) / n,  # type: ignore[arg-type]
                 source=merge_sources(qs), estimated=any(x.estimated for x in qs))
    return q, Spread(mean, std, min(values), max(values), n)  # type: ignore[type-var]


def _configs(results: Sequence[RunResult], basis: str) -> list[ConfigResult]:
    out = []
    for (method, student), rs in _group(results, lambda r: (r.run.method, r.student)):
        q, sp = _e_avg(rs, basis)
        ept_mean, _ = mean_quantity([r.ept_train for r in rs], "J/token", what="EPT_train",
                                    names=[r.label for r in rs])
        out.append(ConfigResult(method, rs[0].run.kind, student, rs, q, sp, ept_mean))
    out.sort(key=lambda c: (KIND_ORDER.get(c.kind, 5), c.method, c.student))
    return out


def _method(name: str, rs: Sequence[RunResult], teacher: RunResult, basis: str) -> MethodResult:
    """Per-method figures; K = the method's run directories (students, repeats included)."""
    names = [r.label for r in rs]
    e_q, e_sp = _e_avg(rs, basis)
    e_tot, _ = mean_quantity([r.e_total for r in rs], "J", what="E_total", names=names)
    om, om_sp = mean_quantity([r.quality for r in rs], "", what="quality", names=names)
    om = _statistical(om, [r.quality for r in rs])
    usable = [r for r in rs if r.quality.ok and r.ept_at.ok]
    t_ept = teacher.ept_at
    if not t_ept.ok:
        eff = Quantity.missing(f"teacher EPT: {t_ept.gap}")
    elif not usable:
        reasons = "; ".join(f"{r.label}: {r.quality.gap or r.ept_at.gap}" for r in rs)
        eff = Quantity.missing(f"no student has both quality and EPT ({reasons})")
    else:
        try:
            v = eff_overall([r.quality.value for r in usable],  # type: ignore[misc]
                            [r.ept_at.value for r in usable], t_ept.value)  # type: ignore[misc]
            terms = [ratio(t_ept, r.ept_at, "") for r in usable]
            uncs = [None if t.unc is None else t.unc * r.quality.value  # type: ignore[operator]
                    for t, r in zip(terms, usable, strict=True)]
            unc = None if None in uncs else math.fsum(uncs) / len(uncs)  # type: ignore[arg-type]
            eff = Quantity(v, "", unc, merge_sources(terms), any(t.estimated for t in terms))
            for n in dict.fromkeys(x.note for x in [t_ept, *(r.ept_at for r in usable)]
                                   if x.note):
                eff = eff.with_note(f"EPT {n}")
            left = [r.label for r in rs if r not in usable]
            if left:
                eff = eff.with_note(f"K = {len(usable)} of {len(rs)}; left out: "
                                    + ", ".join(f"{r.label} ({r.quality.gap or r.ept_at.gap})"
                                                for r in rs if r not in usable))
        except MetricError as exc:
            eff = Quantity.missing(str(exc))
    jpp = _j_per_point(e_tot, om)
    return MethodResult(name, rs[0].run.kind, list(rs), e_q, e_sp, e_tot, om, om_sp, eff,
                        len(usable), jpp)


def _statistical(mean_q: Quantity, qs: Sequence[Quantity]) -> Quantity:
    """Uncertainty of a mean of independent statistical figures: quadrature / n."""
    have = [q for q in qs if q.ok]
    if not mean_q.ok or not have or any(q.unc is None for q in have):
        return Quantity(mean_q.value, mean_q.unit, None, mean_q.source, mean_q.estimated,
                        mean_q.gap, mean_q.note) if mean_q.ok else mean_q
    unc = math.sqrt(math.fsum(q.unc ** 2 for q in have)) / len(have)  # type: ignore[operator]
    return Quantity(mean_q.value, mean_q.unit, unc, mean_q.source, mean_q.estimated,
                    note=mean_q.note)


# ---------------------------------------------------------------------------- definitions
def definitions(a: Analysis) -> list[tuple[str, str]]:
    """(term, definition) pairs printed in the report, with this report's choices filled in."""
    b = a.basis_label
    q = a.quality_label
    out = [
        ("E_run", ("Energy of a run's `train` windows in the energy ledger (phases.jsonl): the "
                   "sum over devices of counter end − start, summed over resumed sessions and "
                   "hosts, in J; windows of sessions that died are included, recovered at their "
                   "last progress record or telemetry sample (labelled). GPU (NVML counter) and "
                   "CPU (RAPL, or `estimated` from CPU time) are reported side by side and never "
                   "added.")),
        ("E_avg", ("Mean E_run over the repeats of one configuration (or over a method's runs). "
                   "Spread: sample standard deviation (n − 1) and min–max. ± is the mean "
                   "measurement uncertainty. Refused (—) when any repeat has no energy.")),
        ("EPT_train", "E_run / tokens trained in the `train` windows, J/token."),
        ("EPT (inference)", ("From ept.json (warm-up excluded): EPT_in = E / input tokens, "
                             "EPT_out = E / output tokens, EPT_total = E / all tokens; dynamic "
                             "EPT = (E − idle power × duration) / tokens.")),
        ("E_total", ("E_run + the run's share of the teacher-cache energy (cache energy / number "
                     "of students sharing the cache, from run.json `teacher_cache`) + its share "
                     "of the teacher fine-tune energy when the teacher was fine-tuned here "
                     "(the teacher run's E_run / students registered in teacher/users.jsonl: "
                     "every run that reads the adapted teacher, for KD signals or to start "
                     "from its layers). "
                     "Online "
                     "teachers are already inside E_run; a baseline pays no teacher-cache share. "
                     "Evaluation and EPT phases are listed in the phase table, not in E_total.")),
        ("OM_perf", ("OM_perf(S) = mean over tasks t of s_t(S) / s_t(T), only when S and the "
                     "teacher T share the protocol hash (else refused, naming what differs). "
                     "OM_perf(method) = mean over its students (run directories). ± from the "
                     "tasks' stderr, propagated in quadrature.")),
        ("OM_ppl", ("Used only when no run has task scores: ppl(T) / ppl(S) = exp(nll_T − nll_S) "
                    "on the same held-out tokens (same protocol hash). 1 = as good as the "
                    "teacher. Not comparable with OM_perf.")),
        ("Eff_overall", ("Eff_overall(method) = (1/K) Σ_i OM(S_i) × EPT(T) / EPT(S_i), EPT = "
                         f"inference EPT_total at batch size {a.ept_batch} ({a.ept_batch_note}); "
                         "K = students with both figures (others named in a footnote).")),
        ("Energy per retained point", ("E_total / (100 × OM): joules per percentage point of "
                                       "teacher quality retained (method: mean E_total / "
                                       "(100 × OM(method))).")),
        ("Uncertainty", ("± is the energy ledger's measurement uncertainty (counter quantisation "
                         "at window edges + sensor gain error), added linearly over windows "
                         "(errors of one device are correlated) and as relative errors over "
                         "ratios. Estimated CPU figures carry no characterised uncertainty.")),
        ("This report", (f"energy basis for derived figures: {b}; quality basis: {q}"
                         + (f" (suite {a.suite!r})" if a.suite else "") + "; gaps are shown as "
                         "— with a numbered reason, never as 0.")),
    ]
    if a.onpolicy:
        out[-1:-1] = ONPOLICY_DEFINITIONS   # before "This report"
    inside = {c: component(c).contains for c in a.teacher.e_run if component(c).contains}
    for c, parts in inside.items():  # e.g. a node meter: it already holds the GPUs and CPUs
        out.insert(1, (f"E_run {label_of(c)}", (
            f"The {label_of(c)} meter's energy of the same windows; it already contains "
            f"{', '.join(label_of(p) for p in parts)}, so it is shown beside them, never "
            "added to them.")))
    return out
