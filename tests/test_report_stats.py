"""report/stats.py against hand-computed intervals and an independent bootstrap loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wattkd.report import stats


def test_t_critical_matches_scipy() -> None:
    sp = pytest.importorskip("scipy.stats")
    for df in [*range(1, 41), 60, 100, 1000]:
        assert stats.t_critical(df) == pytest.approx(sp.t.ppf(0.975, df), abs=2e-4), df


def test_t_interval_closed_form_by_hand() -> None:
    # d = 1, 2, 3, 4: mean 2.5, s = sqrt(5/3), se = s/2, t_{3,0.975} = 3.1824
    iv = stats.t_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.1824 * math.sqrt(5 / 3) / 2
    assert (iv.diff, iv.how, iv.repeats) == (2.5, "t", 4)
    assert iv.lo == pytest.approx(2.5 - half, abs=1e-9)
    assert iv.hi == pytest.approx(2.5 + half, abs=1e-9)
    assert iv.lo == pytest.approx(0.445766, abs=1e-5)  # written out: 2.5 - 2.054234
    single = stats.t_interval([0.7])
    assert (single.how, single.lo, single.hi) == ("single", 0.7, 0.7)


def test_summarize() -> None:
    s = stats.summarize([2.0, 4.0, 9.0])
    assert (s["n"], s["mean"], s["min"], s["max"]) == (3, 5.0, 2.0, 9.0)
    assert s["std"] == pytest.approx(math.sqrt(13.0))
    assert stats.summarize([3.0])["std"] is None


def _reference_bootstrap(a, b, tok, n_boot, seed):
    """The documented procedure written as a plain loop: sequences first, then repeats."""
    rng = np.random.default_rng(seed)
    r, s = a.shape
    seq = rng.integers(0, s, size=(n_boot, s))
    reps = rng.integers(0, r, size=(n_boot, r)) if r > 1 else None
    out = []
    for i in range(n_boot):
        per = [sum(a[k, j] - b[k, j] for j in seq[i]) / sum(tok[j] for j in seq[i])
               for k in range(r)]
        out.append(np.mean([per[k] for k in reps[i]]) if reps is not None else per[0])
    return np.percentile(out, [2.5, 97.5])


@pytest.mark.parametrize("repeats", [1, 3])
def test_paired_bootstrap_matches_an_independent_loop(repeats: int) -> None:
    gen = np.random.default_rng(7)
    tok = gen.integers(20, 64, size=25).astype(float)
    b = gen.normal(3.0, 0.4, size=(repeats, 25)) * tok
    a = b - 0.05 * tok + gen.normal(0, 0.5, size=(repeats, 25))
    iv = stats.paired_nll_bootstrap(a, b, tok, n_boot=400, seed=11)
    lo, hi = _reference_bootstrap(a, b, tok, 400, 11)
    assert (iv.lo, iv.hi) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
    point = np.mean([(a[k] - b[k]).sum() / tok.sum() for k in range(repeats)])
    assert iv.diff == pytest.approx(point)
    assert iv.lo < iv.diff < iv.hi and (iv.repeats, iv.units) == (repeats, 25)
    # seeded: the same call gives the same interval, another seed another one
    assert stats.paired_nll_bootstrap(a, b, tok, n_boot=400, seed=11) == iv
    assert stats.paired_nll_bootstrap(a, b, tok, n_boot=400, seed=12).lo != iv.lo


def test_paired_bootstrap_of_identical_models_is_zero() -> None:
    tok = np.full(10, 32.0)
    a = np.arange(20, dtype=float).reshape(2, 10)
    iv = stats.paired_nll_bootstrap(a, a.copy(), tok)
    assert (iv.diff, iv.lo, iv.hi) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="must be"):
        stats.paired_nll_bootstrap(a, a[:1], tok)


def test_verdict_wording() -> None:
    iv = stats.Interval
    v = stats.verdict
    kw = {"against": "baseline", "text": "x"}
    assert v(iv(-1, -2, -0.5, "t", 3, 3), lower_is_better=True, **kw) == \
        "better than baseline: x"
    assert v(iv(-1, -2, -0.5, "t", 3, 3), lower_is_better=False, **kw) == \
        "worse than baseline: x"
    assert v(iv(1, 0.5, 2, "t", 3, 3), lower_is_better=True, kind="lower", **kw) == \
        "higher than baseline: x"
    assert v(iv(1, -0.5, 2, "t", 3, 3), lower_is_better=True, **kw) == \
        "not distinguishable at this budget: x"
    assert v(iv(-1, -2, -0.5, "bootstrap", 1, 30), lower_is_better=True, **kw).startswith(
        "one repeat: not distinguishable")
