"""Read run directories into `RunData`: what each file says, and what is missing and why.

A report must show a gap where an input is missing, so nothing here fails on a missing or
unreadable optional file: the reason is kept in `RunData.gaps` (file -> reason) and the
metrics later turn it into a "—" with a footnote. Only a path that is not a run directory at
all is an error (`ReportInputError`), raised before any work.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wattkd.distill.methods.registry import report_kinds
from wattkd.energy.metrics import read_jsonl_lines
from wattkd.energy.metrics import read_phases as ledger_read_phases
from wattkd.energy.telemetry import Telemetry, read_telemetry
from wattkd.errors import InputError
from wattkd.runinfo import effective_status

log = logging.getLogger(__name__)

KINDS = report_kinds()  # run.json mode -> kind, from each method's declaration


class ReportInputError(InputError, ValueError):
    """A path given to the report is not what it should be (named, with what was expected)."""


@dataclass
class RunData:
    path: Path
    label: str
    info: dict[str, Any]
    phases: list[dict[str, Any]] | None = None
    telemetry: Telemetry | None = None      # every host's samples, merged (energy.telemetry)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)   # suite -> result doc
    perplexity: dict[str, Any] | None = None
    ept: dict[str, Any] | None = None
    gaps: dict[str, str] = field(default_factory=dict)               # input -> reason
    # every ledger window recovered or refused and every cut line skipped, one sentence each
    read_notes: list[str] = field(default_factory=list)
    energy_notes: list[str] = field(default_factory=list)  # the subset that affects E_run

    @property
    def method(self) -> str:
        return str(self.info.get("method") or "?")

    @property
    def kind(self) -> str:
        """response | feature | relation | baseline | teacher (from the run's mode)."""
        if self.info.get("method") == "teacher":
            return "teacher"
        return KINDS.get(str(self.info.get("mode")), str(self.info.get("mode") or "?"))

    @property
    def repeat(self) -> int:
        r = self.info.get("repeat")
        return r if isinstance(r, int) else 0

    @property
    def status(self) -> str:
        return effective_status(self.info)  # a dead "running" run reads "crashed"


# ----------------------------------------------------------------------------- discovery
def expand_runs(paths: list[Path], *, exclude: Path | None = None) -> list[Path]:
    """Run directories from the arguments: a run dir itself, or a folder holding run dirs.

    An experiment's output folder (runs/demo) expands to its <method>/rep<k> run dirs; the
    teacher run dir is left out (it is the reference, given with --teacher).
    """
    out: list[Path] = []
    skip = exclude.resolve() if exclude is not None else None
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise ReportInputError(f"run directory {p} does not exist")
        if not p.is_dir():
            raise ReportInputError(f"{p} is not a directory; expected a run directory "
                                   "(with run.json) or a folder of them")
        if (p / "run.json").is_file():
            found = [p]
        else:
            found = sorted({f.parent for f in p.glob("*/run.json")}
                           | {f.parent for f in p.glob("*/*/run.json")})
            if not found:
                raise ReportInputError(f"{p} has no run.json, and no <method>/rep<k>/run.json "
                                       "below it: not a run directory")
        for f in found:
            if skip is not None and f.resolve() == skip:
                continue
            if f.resolve() not in {o.resolve() for o in out}:
                out.append(f)
    if not out:
        raise ReportInputError("no student run directories given (only the teacher)")
    return out


def check_teacher(path: Path) -> None:
    if not Path(path).is_dir():
        raise ReportInputError(f"--teacher {path}: no such directory (expected the teacher's "
                               "run directory, e.g. runs/demo/teacher)")
    if not (Path(path) / "run.json").is_file() and not (Path(path) / "eval").is_dir() \
            and not (Path(path) / "ept.json").is_file():
        raise ReportInputError(f"--teacher {path}: neither run.json, eval/ nor ept.json there; "
                               "expected the teacher's run directory")


# ------------------------------------------------------------------------------- readers
def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")  # noqa: TRY004
    return data


def _jsonl(path: Path, skipped: list[str] | None = None) -> tuple[list[dict[str, Any]], int]:
    """Records of a JSON-lines file; a cut line a crash can leave is skipped and named in
    `skipped` (metrics.jsonl has no sessions: a resumed run re-logs, so anywhere)."""
    lenient = path.name == "metrics.jsonl"
    recs, _, cut = read_jsonl_lines(path, path.stem, check_schema=False, anywhere=lenient)
    if skipped is not None:
        skipped.extend(f"{path.parent.name}/{path.name}:{n}: {why}" for n, why in cut)
    return [r for r in recs if isinstance(r, dict)], len(cut)


def read_phases(path: Path) -> list[dict[str, Any]]:
    """phases.jsonl windows through the energy layer's reader (schemas 1 and 2, recovered and
    refused windows and skipped lines named in `.labels()`); an unknown schema is refused."""
    return ledger_read_phases(path)


def load_run(path: Path, label: str | None = None) -> RunData:
    """Everything a report needs from one run directory; missing parts recorded as gaps."""
    path = Path(path)
    info: dict[str, Any] = {}
    gaps: dict[str, str] = {}
    if (path / "run.json").is_file():
        try:
            info = _json(path / "run.json")
        except ValueError as exc:
            gaps["run.json"] = str(exc)
    else:
        gaps["run.json"] = "run.json missing"
    run = RunData(path, label or path.name, info, gaps=gaps)
    # an imported run's findings (wattkd import): shown with the report's "Read first" notes
    run.read_notes.extend(str(n) for n in (info.get("imported") or {}).get("notes") or [])
    for change in info.get("config_changes") or []:   # accepted with --allow-config-change
        keys = "; ".join(f"{k}: {v[0]} -> {v[1]}" for k, v in (change.get("changes") or {}).items())
        run.read_notes.append(f"config changed at step {change.get('step')} ({keys})")

    ph = path / "phases.jsonl"
    if ph.is_file():
        try:
            run.phases = read_phases(ph)
            labels = run.phases.labels() if hasattr(run.phases, "labels") else []
            run.read_notes.extend(labels)
            run.energy_notes.extend(labels)
        except ValueError as exc:
            gaps["phases"] = f"phases.jsonl unreadable: {exc}"
    else:
        gaps["phases"] = "no energy ledger (phases.jsonl missing)"

    tdir = path / "telemetry"
    if not (tdir.is_dir() and any(tdir.glob("*.jsonl"))):
        gaps["telemetry"] = "no telemetry (telemetry/<host>.jsonl missing)"
    else:
        try:
            run.telemetry = read_telemetry(tdir)
            run.read_notes.extend(run.telemetry.skipped)
            if not run.telemetry:
                gaps["telemetry"] = "telemetry files hold no samples"
        except (OSError, ValueError) as exc:
            gaps["telemetry"] = f"telemetry unreadable: {exc}"

    mf = path / "metrics.jsonl"
    if mf.is_file():
        try:
            run.metrics, _ = _jsonl(mf, run.read_notes)
        except ValueError as exc:
            gaps["metrics"] = str(exc)
    else:
        gaps["metrics"] = "no training metrics (metrics.jsonl missing)"

    edir = path / "eval"
    for f in sorted(edir.glob("*.json")) if edir.is_dir() else []:
        try:
            doc = _json(f)
        except ValueError as exc:
            gaps[f"eval/{f.name}"] = str(exc)
            continue
        if f.stem == "perplexity":
            run.perplexity = doc
        else:
            run.evals[f.stem] = doc
    if not run.evals:
        gaps["eval"] = "no task evaluation (eval/<suite>.json missing)"
    if run.perplexity is None:
        gaps["perplexity"] = gaps.get("eval/perplexity.json",
                                      "no perplexity (eval/perplexity.json missing)")
    ef = path / "ept.json"
    if ef.is_file():
        try:
            run.ept = _json(ef)
        except ValueError as exc:
            gaps["ept"] = str(exc)
    else:
        gaps["ept"] = "no inference benchmark (ept.json missing)"
    return run


def labels_for(paths: list[Path]) -> list[str]:
    """Short unique labels: the path relative to the runs' common folder (response/rep0)."""
    resolved = [p.resolve() for p in paths]
    if len(resolved) == 1:
        return [f"{resolved[0].parent.name}/{resolved[0].name}"]

    common = Path(os.path.commonpath([str(r) for r in resolved]))
    labels = [str(r.relative_to(common)) if r != common else r.name for r in resolved]
    return labels


def collect(runs: list[Path], teacher: Path) -> tuple[list[RunData], RunData]:
    """Load the student runs (expanded, labelled) and the teacher run."""
    check_teacher(teacher)
    paths = expand_runs(runs, exclude=teacher)
    labels = labels_for(paths)
    students = [load_run(p, lab) for p, lab in zip(paths, labels, strict=True)]
    t = load_run(teacher, "teacher")
    t.info.setdefault("method", "teacher")
    for r in students + [t]:
        for what, reason in r.gaps.items():
            log.debug("%s: %s: %s", r.label, what, reason)
    return students, t
