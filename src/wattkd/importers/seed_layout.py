"""Where the original study's results live: folder names -> wattkd runs (method, mode, repeat).

The published layout (0EXPERIMENT_RESULTS/ of the original repository):
  RESPONSE|FEATURE|RELATION/MODEL <k>/   telemetry.jsonl, ept.json, eval.json  (k = 1..5)
  TRADITIONAL STUDENT/                   telemetry.jsonl, ept.json, eval.json  (SFT, no KD)
  BASE/STUDENT/, BASE/TEACHER/           ept.json, eval.json                   (not trained)
Every folder found is checked for its files before anything is read or written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wattkd.errors import DataError, InputError

__all__ = ["BASELINES", "SeedImportError", "SeedRequestError", "SeedRun", "find_runs",
           "read_json"]

KD_GROUPS = {"RESPONSE": "response", "FEATURE": "feature", "RELATION": "relation"}
MODEL_DIR = re.compile(r"^MODEL (\d+)$")
TRAINED_FILES = ("telemetry.jsonl", "ept.json", "eval.json")
UNTRAINED_FILES = ("ept.json", "eval.json")
# the two no-KD students; the one chosen as the report's baseline gets mode "none"
BASELINES = {"traditional": ("TRADITIONAL STUDENT", "sft"),
             "base-student": ("BASE/STUDENT", "untrained")}


class SeedImportError(DataError):
    """The original study's folder is incomplete or a file in it is unreadable (named)."""


class SeedRequestError(InputError):
    """The import command was asked for something it cannot do (bad option, output path)."""


@dataclass
class SeedRun:
    """One source folder and the wattkd run it becomes."""

    folder: Path                      # absolute source folder
    rel: str                          # folder relative to the results root, e.g. "FEATURE/MODEL 1"
    method: str                       # wattkd method name (run dir <method>/rep<k>)
    mode: str                         # run.json mode (report kind)
    repeat: int
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def is_teacher(self) -> bool:
        return self.method == "teacher"

    @property
    def is_kd(self) -> bool:
        return self.method in KD_GROUPS.values()


def results_root(path: Path) -> Path:
    """The folder holding the method folders: DIR itself or DIR/0EXPERIMENT_RESULTS."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise SeedRequestError(f"seed results folder {path} does not exist (expected the "
                               "original study's 0EXPERIMENT_RESULTS folder)")
    inner = path / "0EXPERIMENT_RESULTS"
    return inner if inner.is_dir() else path


def find_runs(path: Path, baseline: str = "traditional") -> list[SeedRun]:
    """Every run folder under the results root, with its files checked to exist."""
    if baseline not in BASELINES:
        raise SeedRequestError(f"--baseline {baseline!r}: expected one of "
                               f"{', '.join(BASELINES)}")
    root = results_root(path)
    runs: list[SeedRun] = []
    for group, method in KD_GROUPS.items():
        gdir = root / group
        if not gdir.is_dir():
            continue
        models = sorted((int(m.group(1)), d) for d in gdir.iterdir()
                        if d.is_dir() and (m := MODEL_DIR.match(d.name)))
        if not models:
            raise SeedImportError(f"{gdir}: no 'MODEL <k>' folders (expected MODEL 1 .. MODEL 5)")
        runs += [SeedRun(d, f"{group}/{d.name}", method, method, k - 1) for k, d in models]
    for name, (rel, other_mode) in BASELINES.items():
        if (root / rel).is_dir():
            runs.append(SeedRun(root / rel, rel, name, "none" if name == baseline
                                else other_mode, 0))
    if (root / "BASE/TEACHER").is_dir():
        runs.append(SeedRun(root / "BASE/TEACHER", "BASE/TEACHER", "teacher", "teacher", 0))
    if not any(r.is_teacher for r in runs):
        raise SeedImportError(f"{root}: no BASE/TEACHER folder; the teacher's eval.json and "
                              "ept.json are the reference of OM_perf and Eff_overall")
    if len(runs) == 1:
        raise SeedImportError(f"{root}: no student folders (RESPONSE|FEATURE|RELATION/MODEL <k>, "
                              "TRADITIONAL STUDENT, BASE/STUDENT)")
    for r in runs:
        trained = r.is_kd or r.method == "traditional"
        for name in TRAINED_FILES if trained else UNTRAINED_FILES:
            f = r.folder / name
            if not f.is_file():
                raise SeedImportError(f"{r.rel}/{name} is missing (a {r.method} folder holds "
                                      f"{', '.join(TRAINED_FILES if trained else UNTRAINED_FILES)})")
            r.files[name] = f
    return runs


def read_json(path: Path, rel: str) -> dict[str, Any]:
    """A JSON object from the source, or SeedImportError naming the file and the position."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise SeedImportError(f"{rel}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SeedImportError(f"{rel}: expected a JSON object, got {type(data).__name__}")
    return data


def need(doc: dict[str, Any], key: str, rel: str, kind: type | tuple[type, ...] = (int, float)
         ) -> Any:
    """doc[key] of the expected type, or SeedImportError naming the file and the field."""
    v = doc.get(key)
    if v is None or isinstance(v, bool) or not isinstance(v, kind):
        raise SeedImportError(f"{rel}: field {key!r} is missing or not "
                              f"{'a number' if kind == (int, float) else kind.__name__}"
                              f" (got {v!r})")
    return v
