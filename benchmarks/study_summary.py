"""Headline table of a finished study (the report plus each run's own files), for RESULTS.md.

    python benchmarks/study_summary.py STUDY_DIR --name gemma_study --command "..." [--out DIR]

Reads STUDY_DIR/report/report.json (methods: E_avg, OM_perf, Eff_overall; runs: E_run, the
teacher fine-tune share, E_total; statistics: spreads, 95% intervals, verdicts) and every
run's eval/*.json, eval/perplexity.json, ept.json and metrics.jsonl; writes DIR/<name>.json
(one row per repeat) and prints the markdown tables. Nothing is recomputed here that the
report already states.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from datetime import datetime, timezone
from pathlib import Path


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def run_row(run: Path, label: str) -> dict:
    row: dict = {"run": label}
    ppl = _load(run / "eval" / "perplexity.json")
    if ppl:
        row["heldout_nll"] = ppl["nll"]
        row["heldout_ppl"] = math.exp(ppl["nll"])
        row["heldout_tokens"] = ppl["tokens"]
    for suite_file in sorted((run / "eval").glob("*.json")) if (run / "eval").is_dir() else []:
        doc = json.loads(suite_file.read_text())
        if "scores" in doc:
            row["suite"] = suite_file.stem
            row["scores"] = {t: s["value"] for t, s in doc["scores"].items()}
    ept = _load(run / "ept.json")
    if ept:
        # GPU energy per token (None where no GPU counter was read, e.g. a CPU dry run)
        row["ept"] = {r["batch_size"]: {"ept_total_j": (r["energy"].get("gpu") or {}).get(
                                            "ept_total_j"),
                                        "ept_out_j": (r["energy"].get("gpu") or {}).get(
                                            "ept_out_j"),
                                        "tokens_per_s": r["tokens_per_s"],
                                        "ms_per_output_token":
                                            r["latency"]["ms_per_output_token"]}
                      for r in ept["runs"]}
        row["card"] = ept["protocol"].get("device_name")
        row["versions"] = ept.get("versions")
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        records = [json.loads(x) for x in metrics.read_text().splitlines()]
        train = [r for r in records if r.get("kind") == "train"]
        if len(train) > 1:  # the first interval holds start-up and compilation
            row["train_tokens_per_s_median"] = statistics.median(r["tokens_per_s"]
                                                                 for r in train[1:])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--name", default="gemma_study")
    ap.add_argument("--command", default="")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--wall-s", type=float, default=None, help="wall time of the study")
    args = ap.parse_args()
    report = json.loads((args.study / "report" / "report.json").read_text())
    methods = next(t for t in report["tables"] if t["name"] == "methods")["rows"]
    runs = {r["run"]: r for r in next((t for t in report["tables"] if t["name"] == "runs"),
                                      {"rows": []})["rows"]}
    rows = [run_row(args.study / "teacher", "teacher")]
    rows[0].update(_energy(runs.get("teacher")))
    for m in methods:
        for run in sorted((args.study / m["method"]).glob("rep*")):
            row = run_row(run, f"{m['method']}/{run.name}")
            row.update(_energy(runs.get(f"{m['method']}/{run.name}")))
            row.update(method=m["method"], e_avg_j=m["e_avg"].get("value"),
                       e_avg_unc_j=m["e_avg"].get("unc"),
                       om_perf=m["quality"].get("value"), om_perf_unc=m["quality"].get("unc"),
                       eff_overall=m["eff"].get("value"), eff_unc=m["eff"].get("unc"))
            rows.append(row)
    card = next((r.get("card") for r in rows if r.get("card")), None)
    result = {"name": args.name, "card": card,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "versions": next((r.get("versions") for r in rows if r.get("versions")), None),
              "command": args.command, "energy_basis": report.get("energy_basis_label"),
              "quality": report.get("quality_label"), "ept_batch_for_eff":
                  report.get("ept_batch_size"), "wall_s": args.wall_s, "rows": rows,
              "statistics": report.get("statistics"), "warnings": report.get("warnings") or []}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    print(markdown(result))


def _energy(row: dict | None) -> dict:
    """This run's own energy figures from the report's runs table (value or None)."""
    def v(key: str) -> float | None:
        cell = (row or {}).get(key)
        return cell.get("value") if isinstance(cell, dict) else None

    return {"e_run_gpu_j": v("e_run_gpu"), "e_run_cpu_j": v("e_run_cpu"),
            "cache_share_j": v("cache_share"), "finetune_share_j": v("finetune_share"),
            "e_total_j": v("e_total")}


def _f(v: float | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def markdown(result: dict) -> str:
    tasks = list(next((r["scores"] for r in result["rows"] if "scores" in r), {}))
    batches = sorted({int(b) for r in result["rows"] for b in r.get("ept", {})})
    head = ["run", "E_run GPU [J]", "train tok/s", "held-out ppl", *tasks, "OM_perf",
            *[f"EPT b{b} [J/tok]" for b in batches], "Eff_overall"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        ept = r.get("ept", {})

        def e(b: int, ept: dict = ept) -> str:
            x = ept.get(b) or ept.get(str(b)) or {}
            return _f(x.get("ept_total_j"), ".4f")

        e_run = _f(r.get("e_run_gpu_j"), ",.0f")
        if r.get("finetune_share_j") is not None:
            e_run += f" (+{r['finetune_share_j']:,.0f} fine-tune share)"
        om = ("1 (reference)" if r["run"] == "teacher" else
              f"{_f(r.get('om_perf'), '.3f')} ± {_f(r.get('om_perf_unc'), '.3f')}")
        cells = [r["run"], e_run, _f(r.get("train_tokens_per_s_median"), ",.0f"),
                 _f(r.get("heldout_ppl"), ".1f"),
                 *[_f(r.get("scores", {}).get(t), ".2f") for t in tasks], om,
                 *[e(b) for b in batches], _f(r.get("eff_overall"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("warnings"):   # the report's "Read first" (a collapsed model, ...)
        lines += ["", "Read first:", ""] + [f"- {w}" for w in result["warnings"]]
    st = result.get("statistics") or {}
    if st.get("summary"):
        lines += ["", "| method | figure | n | mean | std | min | max |", "|---|---|---|---|---|---|---|"]
        for method, figs in st["summary"].items():
            for key, x in figs.items():
                lines.append(f"| {method} | {key} | {x['n']} | {_f(x['mean'], '.4g')} | "
                             f"{_f(x['std'], '.3g')} | {_f(x['min'], '.4g')} | "
                             f"{_f(x['max'], '.4g')} |")
    if st.get("comparisons"):
        lines += ["", "Verdicts (" + "; ".join(st.get("notes") or []) + "):", ""]
        lines += [f"- {c['a']} vs {c['b']}, {c['title']}: {c['verdict']}"
                  for c in st["comparisons"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
