"""Statistics over repeats: spreads, paired differences with 95% intervals, plain verdicts.

Pure functions on numbers (numpy only); `report/verdicts.py` feeds them the report's runs.

* `summarize(values)`: n, mean, sample std (n - 1), min, max.
* `t_interval(diffs)`: mean of paired differences ± t_{n-1, 0.975} · s / sqrt(n) (closed form),
  for figures with one value per repeat (energy, EPT, OM, task scores without per-example
  results). Repeats are paired: repeat k of every method shares data order and seed.
* `paired_nll_bootstrap(a, b, tokens)`: the difference in mean held-out NLL per token between
  two methods, paired over the same held-out sequences *and* the same repeats: each bootstrap
  draw resamples the sequences (one draw shared by both methods) and, with two or more repeats,
  the repeat indices; the statistic is the mean over the drawn repeats of
  sum_j (nll_a - nll_b)[k, j] / sum_j tokens[j]. Percentile interval, seeded: the generator is
  `numpy.random.default_rng(seed)`, sequence indices drawn first (shape [n_boot, S]), then
  repeat indices (shape [n_boot, R], only when R > 1).
* `paired_accuracy_bootstrap(a, b)`: the difference in task accuracy (mean per-example score,
  1/0 for accuracy) paired over the same examples and repeats: the same procedure with every
  example weighing 1 (`a`, `b`: [R, N] per-example scores, examples in one fixed order).
* `verdict(...)`: "better than baseline: ... [lo, hi]" when the interval excludes 0 in the good
  direction, "worse than ..." in the other, "not distinguishable at this budget" when it holds
  0, and "one repeat: not distinguishable" with a single repeat (training noise unmeasured).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONF = 0.95
N_BOOT = 2000
SEED = 0

# two-sided 95% Student-t critical values t_{df, 0.975}, df = 1..30
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


@dataclass(frozen=True)
class Interval:
    """A difference (a - b) with its 95% interval and how it was obtained."""

    diff: float
    lo: float
    hi: float
    how: str                  # "bootstrap" | "t" | "single"
    repeats: int              # paired repeats used
    units: int                # sequences (bootstrap) or repeats (t)

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


def t_critical(df: int) -> float:
    """t_{df, 0.975}: table for df <= 30, Cornish-Fisher expansion beyond (error < 1e-4)."""
    if df < 1:
        raise ValueError(f"t interval needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, mean, sample std (None below 2 values), min, max."""
    v = [float(x) for x in values]
    if not v:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    mean = math.fsum(v) / len(v)
    std = (math.sqrt(math.fsum((x - mean) ** 2 for x in v) / (len(v) - 1))
           if len(v) > 1 else None)
    return {"n": len(v), "mean": mean, "std": std, "min": min(v), "max": max(v)}


def t_interval(diffs: Sequence[float]) -> Interval:
    """Mean of paired differences with its closed-form 95% t interval (n >= 2), or the single
    difference with a zero-width 'interval' marked `single`."""
    d = [float(x) for x in diffs]
    if not d:
        raise ValueError("t_interval needs at least one paired difference")
    s = summarize(d)
    mean = float(s["mean"])  # type: ignore[arg-type]
    if len(d) < 2:
        return Interval(mean, mean, mean, "single", 1, 1)
    half = t_critical(len(d) - 1) * float(s["std"]) / math.sqrt(len(d))  # type: ignore[arg-type]
    return Interval(mean, mean - half, mean + half, "t", len(d), len(d))


def paired_nll_bootstrap(a: np.ndarray, b: np.ndarray, tokens: np.ndarray, *,
                         n_boot: int = N_BOOT, seed: int = SEED) -> Interval:
    """Difference in NLL per token, a - b, paired over sequences and repeats (module doc).

    `a`, `b`: [R, S] summed NLL per (repeat, sequence), repeat k of a paired with repeat k of b;
    `tokens`: [S] scored tokens per sequence (the same rows for every model).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    tok = np.asarray(tokens, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape or a.shape[1] != tok.shape[0]:
        raise ValueError(f"paired arrays must be [R, S] with S weights: got {a.shape}, "
                         f"{b.shape}, {tok.shape}")
    if tok.sum() <= 0:
        raise ValueError("no scored tokens")
    r, s = a.shape
    d = a - b
    point = float(np.mean(d.sum(axis=1) / tok.sum()))
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, s, size=(n_boot, s))
    per_rep = d[:, seq].sum(axis=2) / tok[seq].sum(axis=1)      # [R, n_boot]
    if r > 1:
        reps = rng.integers(0, r, size=(n_boot, r))
        stats = np.take_along_axis(per_rep.T, reps, axis=1).mean(axis=1)
    else:
        stats = per_rep[0]
    lo, hi = np.percentile(stats, [100 * (1 - CONF) / 2, 100 * (1 + CONF) / 2])
    return Interval(point, float(lo), float(hi), "bootstrap", r, s)


def paired_accuracy_bootstrap(a: np.ndarray, b: np.ndarray, *, n_boot: int = N_BOOT,
                              seed: int = SEED) -> Interval:
    """Difference in mean per-example score, a - b, paired over examples and repeats: the NLL
    bootstrap's procedure and draws with a weight of 1 per example (module doc).

    `a`, `b`: [R, N] per-example scores (accuracy 1/0), example j the same for every model.
    """
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"paired accuracy arrays must be [R, N]: got {a.shape}")
    return paired_nll_bootstrap(a, b, np.ones(a.shape[1]), n_boot=n_boot, seed=seed)


def verdict(iv: Interval, *, lower_is_better: bool, against: str, text: str,
            kind: str = "better") -> str:
    """One plain line. `text` is the formatted difference with its interval; `kind` words the
    direction: "better"/"worse" for quality, "lower"/"higher" for costs."""
    good, bad = ("better", "worse") if kind == "better" else ("lower", "higher")
    if iv.repeats < 2:
        return f"one repeat: not distinguishable ({text}; eval-sample noise only)" \
            if iv.how == "bootstrap" else f"one repeat: not distinguishable ({text})"
    if not iv.excludes_zero():
        return f"not distinguishable at this budget: {text}"
    improved = (iv.hi < 0) if lower_is_better else (iv.lo > 0)
    return f"{good if improved else bad} than {against}: {text}"
