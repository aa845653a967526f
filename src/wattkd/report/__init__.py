"""`wattkd report`: run directories -> tables (CSV/JSON), plots (PNG/SVG), report.html/.md.

    build_report([Path("runs/demo")], teacher=Path("runs/demo/teacher"), out=Path("report"))

Pipeline: collect (read files, note what is missing) -> analysis (every metric once, gaps as
reasons) -> tables / plots -> html / markdown renderers. Output folder:
    report.html  report.md  report.json  report.ipynb
    tables/<name>.csv|json     plots/<name>.png|svg
Every file is written to a temp name and renamed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from wattkd.atomic import atomic_write_bytes, atomic_write_text
from wattkd.report import html as html_mod
from wattkd.report import markdown as md_mod
from wattkd.report.analysis import analyze, definitions
from wattkd.report.collect import ReportInputError, collect
from wattkd.report.notebook import notebook_json
from wattkd.report.onpolicy import split_json
from wattkd.report.sections import build_plots, build_tables
from wattkd.report.tables import table_json, write_tables
from wattkd.report.verdicts import statistics, statistics_tables

log = logging.getLogger(__name__)

__all__ = ["ReportInputError", "build_report"]


def build_report(runs: list[Path], *, teacher: Path, out: Path,
                 ept_batch: int | None = None) -> Path:
    """Write the report for `runs` (run dirs or folders of them) against `teacher`.

    Raises ReportInputError (before any work) when a path is not a run directory or `out`
    is a file; missing optional inputs become marked gaps. Returns the report.html path.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReportInputError(f"--out {out} is a file; expected a directory for the report")
    if ept_batch is not None and ept_batch <= 0:
        raise ReportInputError(f"ept_batch must be a positive batch size, got {ept_batch}")
    students, t = collect([Path(r) for r in runs], Path(teacher))
    log.info("report: %d student runs, teacher %s", len(students), t.path)
    a = analyze(students, t, ept_batch=ept_batch)
    for w in a.warnings:
        log.warning("report: %s", w)
    missing: dict[str, list[str]] = {}
    for r in [*a.students, a.teacher]:
        for what in a.missing_inputs(r):
            missing.setdefault(what.split("/")[0], []).append(r.label)
    for what, labels in sorted(missing.items()):
        log.info("report: %s missing for %s (marked as gaps)", what, ", ".join(labels))

    stats = statistics(a)
    tables = build_tables(a) + statistics_tables(stats)
    plots = build_plots(a)

    out.mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(exist_ok=True)
    for p in plots:
        if p.gap:
            log.warning("report: figure %r not drawn: %s", p.name, p.gap)
            continue
        atomic_write_bytes(out / "plots" / f"{p.name}.png", p.png)
        atomic_write_bytes(out / "plots" / f"{p.name}.svg", p.svg)
    write_tables(tables, out)
    summary = {
        "schema": "wattkd.report/1",
        "teacher": str(t.path), "runs": [str(r.run.path) for r in a.students],
        "energy_basis": a.basis, "energy_basis_label": a.basis_label,
        "quality_basis": a.quality_basis, "quality_label": a.quality_label, "suite": a.suite,
        "ept_batch_size": a.ept_batch, "ept_batch_note": a.ept_batch_note,
        "warnings": a.warnings, "definitions": dict(definitions(a)),
        "missing_inputs": {r.label: a.missing_inputs(r) for r in [*a.students, a.teacher]
                           if a.missing_inputs(r)},
        "statistics": stats,
        "tables": [table_json(tb) for tb in tables],
        "plots": [{"name": p.name, "title": p.title, "caption": p.caption, "gap": p.gap,
                   "omitted": p.omitted, "notes": p.notes} for p in plots],
        # every ledger window recovered or refused and every cut line skipped, per run
        "read_notes": {r.label: r.run.read_notes for r in [*a.students, a.teacher]
                       if r.run.read_notes},
    }
    if a.onpolicy:   # per-phase figures of on-policy runs (docs/metrics.md)
        summary["onpolicy"] = {label: split_json(s) for label, s in a.onpolicy.items()}
    atomic_write_text(out / "report.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "report.ipynb", json.dumps(notebook_json(), indent=1) + "\n")
    atomic_write_text(out / "report.md", md_mod.render(a, tables, plots))
    path = atomic_write_text(out / "report.html", html_mod.render(a, tables, plots))
    log.info("report written: %s", path)
    return path
