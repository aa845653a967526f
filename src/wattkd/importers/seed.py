"""`wattkd import seed DIR --out RUNS`: the original study's results as wattkd run directories.

Each source folder becomes RUNS/<method>/rep<k> (RESPONSE|FEATURE|RELATION/MODEL k -> rep k-1,
TRADITIONAL STUDENT -> traditional/rep0, BASE/STUDENT -> base-student/rep0, BASE/TEACHER ->
teacher) with run.json (status completed, `imported`: source files with sha256, flags),
phases.jsonl (one `train` window from the GPU counters), telemetry/<host>.jsonl, eval/seed.json
and ept.json; `wattkd report RUNS --teacher RUNS/teacher` then reads them like its own.
Everything is read and checked before the first folder is written; each run folder is written
whole (temp folder + rename), so a failed import leaves no half-written run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wattkd.atomic import atomic_dir
from wattkd.hashing import file_sha256
from wattkd.importers.seed_checks import Flag, check_runs
from wattkd.importers.seed_ept import SCRIPT_BATCH, ept_doc
from wattkd.importers.seed_eval import SUITE, eval_doc, parse_tasks
from wattkd.importers.seed_layout import (
    SeedImportError,
    SeedRequestError,
    SeedRun,
    find_runs,
    read_json,
    results_root,
)
from wattkd.importers.seed_telemetry import SeedTelemetry, read_seed_telemetry

__all__ = ["ImportSummary", "SeedImportError", "SeedRequestError", "import_seed"]


@dataclass
class ImportSummary:
    """What was imported and found: one line per run, then every flag."""

    out: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    flags: dict[str, list[Flag]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"imported {len(self.rows)} runs into {self.out}"]
        for r in self.rows:
            e = "—" if r["e_run_j"] is None else f"{r['e_run_j'] / 1e3:.1f} kJ"
            dur = "" if r["duration_s"] is None else f", {r['duration_s']:.0f} s"
            out.append(f"  {r['rel']:<22} -> {r['run']:<20} E_run {e}{dur}, EPT_total "
                       f"{r['ept_total']:.4g} J/token (batch {r['batch']}), unit "
                       f"{r['unit'] or '—'}")
        grouped: dict[Flag, list[str]] = {}   # one line per finding, its folders listed
        for rel, fl in self.flags.items():
            for f in fl:
                grouped.setdefault(f, []).append(rel)
        out += [f"  flag {name} ({', '.join(rels)}): {why}" for (name, why), rels in grouped.items()]
        out += [f"  note: {n}" for n in self.notes]
        return out


def _run_dir(r: SeedRun) -> str:
    return "teacher" if r.is_teacher else f"{r.method}/rep{r.repeat}"


def _batch(r: SeedRun, teacher_batch: int | None, student_batch: int | None) -> int:
    if r.is_teacher:
        return teacher_batch or SCRIPT_BATCH["teacher"]
    return student_batch or SCRIPT_BATCH["student"]


def _check_request(out: Path, teacher_batch: int | None, student_batch: int | None) -> None:
    if out.exists() and not out.is_dir():
        raise SeedRequestError(f"--out {out} is a file; expected a folder for the run directories")
    for name, b in (("--teacher-ept-batch", teacher_batch), ("--student-ept-batch", student_batch)):
        if b is not None and b < 1:
            raise SeedRequestError(f"{name} must be a positive batch size, got {b}")


def import_seed(src: Path, out: Path, *, baseline: str = "traditional",
                tasks: str | None = None, teacher_ept_batch: int | None = None,
                student_ept_batch: int | None = None) -> ImportSummary:
    """Import every run folder of the original study's results `src` into `out`."""
    out = Path(out)
    _check_request(out, teacher_ept_batch, student_ept_batch)
    runs = find_runs(Path(src), baseline)
    wanted = parse_tasks(tasks)
    evals = {r.rel: eval_doc(read_json(r.files["eval.json"], f"{r.rel}/eval.json"), wanted,
                             f"{r.rel}/eval.json") for r in runs}
    tels: dict[str, SeedTelemetry] = {r.rel: read_seed_telemetry(r.files["telemetry.jsonl"], r.rel)
                                      for r in runs if "telemetry.jsonl" in r.files}
    epts, ept_notes = {}, []
    for r in runs:
        batch = _batch(r, teacher_ept_batch, student_ept_batch)
        model = dict(evals[r.rel]["model"], lora_merged=None)
        epts[r.rel], notes = ept_doc(read_json(r.files["ept.json"], f"{r.rel}/ept.json"),
                                     r.rel, batch, model)
        ept_notes += notes
    mem = [g.get("mem_total_b") for t in tels.values() for s in t.lines[1:2]
           for g in s["gpu"].values()]
    flags = check_runs(runs, evals, {k: t.duration_s for k, t in tels.items()},
                       max((m for m in mem if m), default=None))
    summary = ImportSummary(out, flags={k: v for k, v in flags.items() if v})
    summary.notes = [n for t in tels.values() for n in t.notes] + ept_notes
    source = results_root(Path(src)).resolve()
    for r in runs:
        _write_run(out / _run_dir(r), r, source, evals[r.rel], epts[r.rel], tels.get(r.rel),
                   flags[r.rel])
        t = tels.get(r.rel)
        run = epts[r.rel]["runs"][0]
        summary.rows.append({"rel": r.rel, "run": _run_dir(r),
                             "e_run_j": t.window["energy_j"]["gpu"] if t else None,
                             "duration_s": t.duration_s if t else None,
                             "ept_total": run["energy"]["gpu"]["ept_total_j"],
                             "batch": run["batch_size"], "unit": t.unit if t else None})
    return summary


def _run_json(r: SeedRun, source: Path, flags: list[Flag], tel: SeedTelemetry | None,
              ev: dict[str, Any]) -> dict[str, Any]:
    files = [{"path": f"{r.rel}/{name}", "sha256": file_sha256(p), "bytes": p.stat().st_size}
             for name, p in sorted(r.files.items())]
    info: dict[str, Any] = {
        "status": "completed", "method": r.method, "mode": r.mode, "repeat": r.repeat,
        "role": "teacher" if r.is_teacher else "student",
        "teacher_signals": "cache" if r.is_kd else None,
        "parameters": (ev.get("model") or {}).get("parameters"),
        "hardware": {"gpus": tel.gpus} if tel else None,
        "imported": {"format": "seed", "source_dir": str(source), "folder": r.rel,
                     "files": files, "energy_unit": tel.unit if tel else None,
                     "flags": [{"flag": n, "detail": d} for n, d in flags],
                     "notes": [f"imported from {r.rel} (the original study's results)"]
                     + [f"{n}: {d}" for n, d in flags]}}
    if r.is_kd:
        info["imported"]["notes"].append(
            "trained from a teacher cache (data/topk_k16, hidden and embedding caches) whose "
            "energy is not in the published results: E_total is a gap")
    return info


def _write_run(path: Path, r: SeedRun, source: Path, ev: dict[str, Any], ept: dict[str, Any],
               tel: SeedTelemetry | None, flags: list[Flag]) -> None:
    """One run folder, written whole."""
    names = {n for n, _ in flags}
    ept_flags = ept["runs"][0]["flags"]
    ept_flags += [n for n in ("lora-unmerged", "teacher-exceeds-metered-gpu") if n in names]
    ept["runs"][0]["notes"] += [d for n, d in flags if n in ept_flags]
    with atomic_dir(path) as tmp:
        (tmp / "eval").mkdir()
        _dump(tmp / "run.json", _run_json(r, source, flags, tel, ev))
        _dump(tmp / "eval" / f"{SUITE}.json", ev)
        _dump(tmp / "ept.json", ept)
        if tel is not None:
            window = dict(tel.window)
            window["flags"] = window["flags"] + [n for n in names if n == "unequal-repeat-duration"]
            (tmp / "telemetry").mkdir()
            (tmp / "telemetry" / f"{tel.lines[0]['host']}.jsonl").write_text(
                "".join(json.dumps(ln) + "\n" for ln in tel.lines), encoding="utf-8")
            (tmp / "phases.jsonl").write_text(json.dumps(window) + "\n", encoding="utf-8")


def _dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", encoding="utf-8")
