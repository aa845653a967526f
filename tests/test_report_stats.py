"""report/stats.py against hand-computed intervals and an independent bootstrap loop."""

from __future__ import annotations

import json
import math
from itertools import product

import numpy as np
import pytest

from report_synth import eval_doc, make_run, perplexity_doc
from wattkd.report import stats
from wattkd.report.analysis import analyze
from wattkd.report.collect import collect
from wattkd.report.verdicts import statistics


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


# ------------------------------------------------------------------- task accuracy, paired
@pytest.mark.parametrize("repeats", [1, 3])
def test_paired_accuracy_bootstrap_matches_the_documented_procedure(repeats: int) -> None:
    gen = np.random.default_rng(3)
    b = (gen.random((repeats, 40)) < 0.4).astype(float)
    a = np.where(gen.random((repeats, 40)) < 0.2, 1.0, b)  # a fixes some of b's misses
    iv = stats.paired_accuracy_bootstrap(a, b, n_boot=500, seed=5)
    lo, hi = _reference_bootstrap(a, b, np.ones(40), 500, 5)  # weight 1 per example
    assert (iv.lo, iv.hi) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
    assert iv.diff == pytest.approx(np.mean(a - b))
    assert (iv.how, iv.repeats, iv.units) == ("bootstrap", repeats, 40)


def test_paired_accuracy_bootstrap_by_hand() -> None:
    # a right on every example b gets wrong, and on the same others: every resample gives +1
    a, b = np.array([[1.0, 1.0, 0.0, 1.0]]), np.array([[0.0, 0.0, 0.0, 1.0]])
    d = stats.paired_accuracy_bootstrap(a, b, n_boot=300)
    assert d.diff == 0.5 and 0.0 <= d.lo <= d.hi <= 1.0
    same = stats.paired_accuracy_bootstrap(a[[0, 0]], a[[0, 0]])
    assert (same.diff, same.lo, same.hi) == (0.0, 0.0, 0.0)
    up = stats.paired_accuracy_bootstrap(np.ones((2, 5)), np.zeros((2, 5)))
    assert (up.diff, up.lo, up.hi) == (1.0, 1.0, 1.0)


def test_paired_accuracy_bootstrap_exact_enumeration_n3() -> None:
    """R = 1, N = 3: the 27 equally likely resamples, enumerated; the seeded bootstrap's
    percentiles must land within one achievable step (1/3) of the exact ones."""
    d = np.array([1.0, 0.0, -1.0]) + 0.0
    a, b = np.array([[1.0, 1.0, 0.0]]), np.array([[0.0, 1.0, 1.0]])
    assert np.array_equal(a[0] - b[0], d)
    exact = sorted(np.mean([d[i] for i in idx]) for idx in product(range(3), repeat=3))
    lo_x, hi_x = np.percentile(exact, [2.5, 97.5])
    iv = stats.paired_accuracy_bootstrap(a, b, n_boot=20000, seed=0)
    assert iv.diff == 0.0
    assert abs(iv.lo - lo_x) <= 1 / 3 + 1e-9 and abs(iv.hi - hi_x) <= 1 / 3 + 1e-9
    assert iv.lo < 0 < iv.hi  # symmetric differences: the interval holds 0


def _eval_doc_with_examples(task_scores: dict[str, list[float]]) -> dict:
    doc = eval_doc({t: (float(np.mean(v)), None) for t, v in task_scores.items()})
    doc["per_example"] = {t: {"metric": "acc,none",
                              "examples": [[t, j, x] for j, x in enumerate(v)]}
                          for t, v in task_scores.items()}
    return doc


def test_verdicts_pair_task_accuracy_over_the_same_examples(tmp_path) -> None:
    gen = np.random.default_rng(1)
    n = 60
    base = {k: (gen.random(n) < 0.3).astype(float) for k in range(3)}
    kd = {k: np.where(gen.random(n) < 0.5, 1.0, base[k]) for k in range(3)}  # clearly better
    make_run(tmp_path, "teacher", info={"method": "teacher", "mode": "none", "repeat": 0},
             evals={"offline": _eval_doc_with_examples({"taskA": [1.0] * n})},
             perplexity=perplexity_doc(2.0))
    for k in range(3):
        for name, mode, arr in (("response", "response", kd[k]), ("baseline", "none", base[k])):
            make_run(tmp_path, f"{name}/rep{k}",
                     info={"method": name, "mode": mode, "repeat": k},
                     evals={"offline": _eval_doc_with_examples({"taskA": list(arr)})})
    st = statistics(analyze(*collect([tmp_path], tmp_path / "teacher")))
    c = next(c for c in st["comparisons"] if c["figure"] == "task:taskA")
    want = stats.paired_accuracy_bootstrap(np.array([kd[k] for k in range(3)]),
                                           np.array([base[k] for k in range(3)]))
    assert c["how"] == "bootstrap" and (c["repeats"], c["units"]) == (3, n)
    assert (c["diff"], c["lo"], c["hi"]) == (want.diff, want.lo, want.hi)
    assert want.lo > 0 and c["verdict"].startswith("better than baseline: task taskA +")
    assert "note" not in c

    # results written without per-example records: t interval over repeats, said in a note
    for k in range(3):
        p = tmp_path / "baseline" / f"rep{k}" / "eval" / "offline.json"
        doc = json.loads(p.read_text())
        del doc["per_example"]
        p.write_text(json.dumps(doc))
    st = statistics(analyze(*collect([tmp_path], tmp_path / "teacher")))
    c = next(c for c in st["comparisons"] if c["figure"] == "task:taskA")
    assert c["how"] == "t" and "per-example" in c["note"]
