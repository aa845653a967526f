"""The report's statistics section: per-method spread over repeats and paired comparisons.

Built from an `Analysis` with the pure functions of `report/stats.py`:
  * every figure (held-out perplexity, quality, E_run, E_total, EPT_train, inference EPT, task
    scores) summarised per method over its repeats (mean, std, min–max);
  * each method against the baseline, and each method against each other: held-out perplexity
    by the paired bootstrap over the same sequences and repeats (per-sequence NLL from
    eval/perplexity.json), the other figures by the t interval of per-repeat differences
    (repeat k of both methods paired);
  * task scores by the paired bootstrap over the same examples and repeats (per-example
    results from eval/<suite>.json `per_example`), or, for results written without them, by the
    t interval of per-repeat differences (said in the comparison's note);
  * a verdict line per comparison.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import combinations
from typing import Any

import numpy as np

from wattkd.report import stats
from wattkd.report.analysis import Analysis, RunResult
from wattkd.report.metrics import Quantity
from wattkd.report.tables import Column, Table, fmt_number

# figure key -> (title, lower is better, verdict wording)
FIGURES: dict[str, tuple[str, bool, str]] = {
    "perplexity": ("held-out perplexity", True, "better"),
    "quality": ("quality", False, "better"),
    "e_run": ("E_run", True, "lower"),
    "e_total": ("E_total", True, "lower"),
    "ept_train": ("EPT_train", True, "lower"),
    "ept": ("inference EPT", True, "lower"),
}
COMPARED = ("perplexity", "quality", "e_total", "ept")


def _num(v: float) -> str:
    return ("+" if v > 0 else "") + fmt_number(v)


def _run_values(a: Analysis, r: RunResult) -> dict[str, float]:
    qs: dict[str, Quantity] = {"quality": r.quality, "e_run": r.e_run[a.basis],
                               "e_total": r.e_total, "ept_train": r.ept_train, "ept": r.ept_at}
    out = {k: float(q.value) for k, q in qs.items() if q.ok}  # type: ignore[arg-type]
    out.update({f"estimated:{k}": 1.0 for k, q in qs.items() if q.ok and q.estimated})
    doc = r.run.perplexity or {}
    if isinstance(doc.get("perplexity"), int | float) and math.isfinite(doc["perplexity"]):
        out["perplexity"] = float(doc["perplexity"])
    for t, q in r.task_scores.items():
        if q.ok:
            out[f"task:{t}"] = float(q.value)  # type: ignore[arg-type]
    return out


def _by_method(a: Analysis) -> dict[str, dict[int, RunResult]]:
    """method -> repeat -> its (first) run; methods in the report's order."""
    out: dict[str, dict[int, RunResult]] = {m.method: {} for m in a.methods}
    for r in a.students:
        out.setdefault(r.run.method, {}).setdefault(r.run.repeat, r)
    return out


def _per_seq(r: RunResult) -> tuple[list[float], list[int], str | None] | None:
    doc = r.run.perplexity or {}
    ps = doc.get("per_sequence")
    if not isinstance(ps, dict) or not ps.get("nll_sum"):
        return None
    return list(ps["nll_sum"]), list(ps["tokens"]), doc.get("protocol_hash")


def _ppl_interval(ra: dict[int, RunResult], rb: dict[int, RunResult], reps: list[int]
                  ) -> tuple[stats.Interval | None, str | None]:
    rows_a, rows_b, tokens, proto = [], [], None, None
    for k in reps:
        pa, pb = _per_seq(ra[k]), _per_seq(rb[k])
        if pa is None or pb is None:
            return None, ("eval/perplexity.json has no per-sequence NLL (written by wattkd "
                          "before statistics existed): rerun the eval stage")
        for nll, tok, h in (pa, pb):
            if tokens is None:
                tokens, proto = tok, h
            if tok != tokens or h != proto:
                return None, "perplexity runs scored different held-out tokens: not paired"
        rows_a.append(pa[0])
        rows_b.append(pb[0])
    iv = stats.paired_nll_bootstrap(np.array(rows_a), np.array(rows_b), np.array(tokens))
    return iv, None


def _examples(r: RunResult, suite: str | None, task: str
              ) -> tuple[list[tuple[str, int]], list[float | None], str | None] | None:
    doc = r.run.evals.get(suite) if suite else None
    pe = ((doc or {}).get("per_example") or {}).get(task)
    if not isinstance(pe, dict) or not pe.get("examples"):
        return None
    rows = pe["examples"]
    return ([(x[0], x[1]) for x in rows], [x[2] for x in rows],
            doc.get("protocol_hash"))  # type: ignore[union-attr]


def _task_interval(suite: str | None, task: str, ra: dict[int, RunResult],
                   rb: dict[int, RunResult], reps: list[int]
                   ) -> tuple[stats.Interval | None, str | None]:
    """Paired bootstrap over the task's examples and the repeats, or (None, why not)."""
    rows_a, rows_b, ids, proto = [], [], None, None
    for k in reps:
        pa, pb = _examples(ra[k], suite, task), _examples(rb[k], suite, task)
        if pa is None or pb is None:
            return None, (f"eval/{suite}.json has no per-example results (written by wattkd "
                          "before they were kept): t interval over repeats")
        for got_ids, values, h in (pa, pb):
            if ids is None:
                ids, proto = got_ids, h
            if got_ids != ids or h != proto:
                return None, "runs scored different examples: t interval over repeats"
            if any(v is None for v in values):
                return None, "a per-example score is null: t interval over repeats"
        rows_a.append(pa[1])
        rows_b.append(pb[1])
    return stats.paired_accuracy_bootstrap(np.array(rows_a), np.array(rows_b)), None


def _compare(a: Analysis, name_a: str, name_b: str, runs: dict[str, dict[int, RunResult]],
             vals: Callable[[RunResult], dict[str, float]], against: str) -> list[dict[str, Any]]:
    ra, rb = runs[name_a], runs[name_b]
    reps = sorted(set(ra) & set(rb))
    if not reps:
        return []
    out = []
    keys = list(COMPARED) + sorted({k for r in [*ra.values(), *rb.values()]
                                    for k in vals(r) if k.startswith("task:")})
    for key in keys:
        title, lower, kind = FIGURES.get(key, (f"task {key[5:]}", False, "better"))
        note = None
        if key == "perplexity":
            iv, note = _ppl_interval(ra, rb, reps)
            if iv is None:
                if note:
                    out.append({"a": name_a, "b": name_b, "figure": key, "title": title,
                                "verdict": f"not compared: {note}", "how": None,
                                "note": note})
                continue
            pct = [math.expm1(x) * 100 for x in (iv.diff, iv.lo, iv.hi)]
            text = f"{title} {_num(pct[0])}% [{_num(pct[1])}%, {_num(pct[2])}%]"
            unit, diff, lo, hi = "% (ppl ratio - 1)", *pct
        else:
            pairs = [(vals(ra[k]).get(key), vals(rb[k]).get(key)) for k in reps]
            if any(x is None or y is None for x, y in pairs):
                continue
            iv = None
            if key.startswith("task:"):
                iv, note = _task_interval(a.suite, key[5:], ra, rb, reps)
            if iv is None:
                iv = stats.t_interval([x - y for x, y in pairs])  # type: ignore[operator]
            base = math.fsum(y for _, y in pairs) / len(pairs)  # type: ignore[misc]
            rel = f" ({_num(100 * iv.diff / base)}%)" if base else ""
            text = (f"{title} {_num(iv.diff)}{rel}" if iv.how == "single" else
                    f"{title} {_num(iv.diff)} [{_num(iv.lo)}, {_num(iv.hi)}]{rel}")
            if any(f"estimated:{key}" in vals(r) for r in [*ra.values(), *rb.values()]):
                text += " (estimated)"
            unit, diff, lo, hi = "", iv.diff, iv.lo, iv.hi
        row = {"a": name_a, "b": name_b, "figure": key, "title": title, "unit": unit,
               "diff": diff, "lo": lo, "hi": hi, "how": iv.how, "repeats": iv.repeats,
               "units": iv.units, "text": text,
               "verdict": stats.verdict(iv, lower_is_better=lower, against=against,
                                        text=text, kind=kind)}
        if note:
            row["note"] = note
        out.append(row)
    return out


def statistics(a: Analysis) -> dict[str, Any]:
    """report.json's `statistics`: settings, per-method summaries, comparisons, notes."""
    runs = _by_method(a)
    cache: dict[int, dict[str, float]] = {}

    def vals(r: RunResult) -> dict[str, float]:
        return cache.setdefault(id(r), _run_values(a, r))

    summary: dict[str, dict[str, Any]] = {}
    for m in a.methods:
        per: dict[str, list[float]] = {}
        for r in m.runs:
            for k, v in vals(r).items():
                if not k.startswith("estimated:"):
                    per.setdefault(k, []).append(v)
        summary[m.method] = {k: stats.summarize(v) for k, v in per.items()}
    baseline = next((m.method for m in a.methods if m.kind == "baseline"), None)
    others = [m.method for m in a.methods if m.method != baseline]
    comparisons: list[dict[str, Any]] = []
    if baseline is not None:
        for name in others:
            comparisons += _compare(a, name, baseline, runs, vals, "baseline")
    for x, y in combinations(others, 2):
        comparisons += _compare(a, x, y, runs, vals, y)
    repeats = max((len(v) for v in runs.values()), default=0)
    notes = [(f"95% intervals; perplexity and task scores: paired percentile bootstrap over "
              f"the same held-out sequences / task examples and the repeats ({stats.N_BOOT} "
              f"draws, seed {stats.SEED}); other figures (and task scores without per-example "
              "results): t interval of the per-repeat differences (repeat k of both methods "
              "shares data order and seed)")]
    if repeats < 2:
        notes.append("one repeat per method: training noise is not measured, so no difference "
                     "can be called (set train.repeats >= 2, better 3 or more)")
    return {"conf": stats.CONF, "n_boot": stats.N_BOOT, "seed": stats.SEED,
            "baseline": baseline, "repeats": repeats, "summary": summary,
            "comparisons": comparisons, "notes": notes}


def verdict_lines(st: dict[str, Any], limit: int | None = None) -> list[str]:
    """'<a> vs <b>: <verdict>' for the quality figure against the baseline (held-out perplexity
    when compared, else quality), one line per method."""
    comps = [c for c in st.get("comparisons") or [] if c.get("b") == st.get("baseline")]
    out = []
    for name in dict.fromkeys(c["a"] for c in comps):
        mine = {c["figure"]: c for c in comps if c["a"] == name}
        c = mine.get("perplexity") if mine.get("perplexity", {}).get("how") else \
            mine.get("quality") or mine.get("perplexity")
        if c is not None:
            out.append(f"{name} vs {c['b']}: {c['verdict']}")
    return out[:limit] if limit else out


def statistics_tables(st: dict[str, Any]) -> list[Any]:
    """Two report tables: spread over repeats per method, and the comparisons with verdicts."""
    spread = Table("repeats", "Repeats: mean and spread per method",
                   "Every figure over the method's repeats: n, mean, sample std (n − 1), "
                   "min, max. Energy figures on the report's energy basis.",
                   [Column("method", "Method", numeric=False),
                    Column("figure", "Figure", numeric=False), Column("n", "n"),
                    Column("mean", "Mean"), Column("std", "Std"), Column("min", "Min"),
                    Column("max", "Max")])
    for method, figs in st["summary"].items():
        for key, s in figs.items():
            title = FIGURES.get(key, (f"task {key[5:]}",))[0]
            spread.add(method=method, figure=title, n=s["n"], mean=s["mean"],
                       std=s["std"] if s["std"] is not None else Quantity.missing(
                           "a single repeat: no spread"),
                       min=s["min"], max=s["max"])
    verdicts = Table("verdicts", "Verdicts: differences with 95% confidence intervals",
                     ". ".join(st["notes"]) + ".",
                     [Column("a", "Method", numeric=False), Column("b", "Against",
                                                                  numeric=False),
                      Column("figure", "Figure", numeric=False),
                      Column("how", "Interval", numeric=False), Column("repeats", "Repeats"),
                      Column("verdict", "Verdict (difference [95% CI])", numeric=False)])
    for c in st["comparisons"]:
        verdicts.add(a=c["a"], b=c["b"], figure=c["title"], how=c.get("how") or "—",
                     repeats=c["repeats"] if "repeats" in c else Quantity.missing(
                         c.get("note") or "not compared"), verdict=c["verdict"])
    return [verdicts, spread]
