"""Teacher-side fixed costs and the students that share them (amortisation), in one place.

Two costs are paid once for many students: building a teacher cache (`wattkd teacher cache`)
and fine-tuning the teacher here (`wattkd teacher finetune`). Each student that uses one
registers in its folder's `users.jsonl` (`record_cache_use`, `record_finetune_use`: one line
per run, under a lock, counted once per run however often it resumes), and its share is the
cost / the distinct users (`cache_share`, `finetune_share`): E_total = E_run + its shares
(docs/metrics.md). The cache's cost is its manifest's per-component build energy
(teacher_cache/build_energy.py); the fine-tune's is the fine-tune run's `train` windows
(E_run). Shares are returned as `Share` (a value with its provenance, or a gap with its
reason); the report turns them into table cells.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wattkd.energy.components import label_of
from wattkd.energy.metrics import e_run, read_phases
from wattkd.energy.sources import source_class
from wattkd.teacher_cache.manifest import CacheError, manifest_sha256, read_cache_manifest

log = logging.getLogger(__name__)

__all__ = ["USERS", "Share", "amortisation", "append_line", "cache_share", "cache_users",
           "finetune_share", "finetune_users", "record_cache_use", "record_finetune_use"]

USERS = "users.jsonl"


@dataclass(frozen=True)
class Share:
    """One student's share of a teacher-side cost (J), or the reason there is none."""

    value: float | None
    unc: float | None = None
    source: str | None = None
    estimated: bool = False
    gap: str | None = None
    note: str | None = None

    @classmethod
    def missing(cls, reason: str) -> Share:
        return cls(None, gap=reason)

    def with_note(self, note: str) -> Share:
        return Share(self.value, self.unc, self.source, self.estimated, self.gap,
                     f"{self.note}; {note}" if self.note else note)


def _estimated(source: str | None) -> bool:
    """The label names an estimate (a registered estimated source, or `estimated-...`)."""
    parts = [p for p in str(source or "").split("+") if p]
    return any((source_class(p).ESTIMATED if source_class(p) else p.startswith("estimated"))
               for p in parts)


# ----------------------------------------------------------------------------- registration
def append_line(path: Path, data: bytes) -> None:
    """One write on an O_APPEND descriptor under an exclusive lock: concurrent students of a
    Slurm array never interleave their lines."""
    if not path.parent.is_dir():
        raise CacheError(f"{path.parent}: folder missing")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data)
    finally:
        os.close(fd)


def _register(folder: Path, run: str, **extra: Any) -> None:
    line = json.dumps({"schema": 1, "run_dir": run, **extra, "t_wall": round(time.time(), 3),
                       "host": socket.gethostname().split(".")[0]}) + "\n"
    append_line(folder / USERS, line.encode())


def _user_lines(folder: Path) -> list[dict[str, Any]]:
    """Readable lines of a users.jsonl (an unreadable one is skipped, and logged)."""
    path = Path(folder) / USERS
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            str(obj["run_dir"])
        except (ValueError, KeyError, TypeError):
            log.warning("%s:%d: skipping an unreadable line", path, i + 1)
            continue
        out.append(obj)
    return out


def record_cache_use(cache_dir: str | Path, run_dir: str | Path) -> dict[str, Any]:
    """Register `run_dir` as a user of the cache and return what the run records about it
    (run.json `teacher_cache`). Users count once per (run_dir, cache sha256)."""
    root = Path(cache_dir).resolve()
    m = read_cache_manifest(root)
    sha = manifest_sha256(root)
    run = str(Path(run_dir).resolve())
    if not any(u["run_dir"] == run and u["cache_sha256"] == sha for u in cache_users(root)):
        _register(root, run, cache_sha256=sha)
    e = m.get("energy") or {}
    return {"path": str(root), "sha256": sha, "energy_j": e.get("energy_j"),
            "source": e.get("source", "unavailable"), "estimated": bool(e.get("estimated")),
            "component": e.get("component"), "complete": bool(e.get("complete")),
            "tokens": m["tokens"], "j_per_token": e.get("j_per_token"),
            "signals": m["signals"].get("spec"), "encoding": m["encoding"]}


def cache_users(cache_dir: str | Path, sha256: str | None = None) -> list[dict[str, Any]]:
    """Distinct runs registered on the cache (optionally only those of one manifest sha256)."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for obj in _user_lines(Path(cache_dir)):
        if "cache_sha256" not in obj:
            continue
        if sha256 is None or obj["cache_sha256"] == sha256:
            seen.setdefault((obj["run_dir"], obj["cache_sha256"]), obj)
    return list(seen.values())


def record_finetune_use(teacher_dir: str | Path, run_dir: str | Path) -> dict[str, Any]:
    """Register `run_dir` as a user of the teacher fine-tuned here; returns run.json's record
    (`teacher_finetune`)."""
    root = Path(teacher_dir).resolve()
    run = str(Path(run_dir).resolve())
    if run not in finetune_users(root):
        _register(root, run)
    return {"run_dir": str(root), "final": str(root / "final")}


def finetune_users(teacher_dir: str | Path) -> list[str]:
    """Distinct student run directories registered on the fine-tuned teacher, sorted."""
    return sorted({str(o["run_dir"]) for o in _user_lines(Path(teacher_dir))})


# ------------------------------------------------------------------------------- shares
def amortisation(cache_dir: str | Path) -> dict[str, Any]:
    """The cache's energy split equally over the runs that used this cache (this manifest):
    {path, sha256, energy_j, source, estimated, complete, tokens, users [run dirs], share_j
    (per run, None without users or energy)}."""
    root = Path(cache_dir).resolve()
    m = read_cache_manifest(root)
    sha = manifest_sha256(root)
    users = sorted(u["run_dir"] for u in cache_users(root, sha))
    e = m.get("energy") or {}
    value = e.get("energy_j")
    return {"path": str(root), "sha256": sha, "energy_j": value,
            "source": e.get("source", "unavailable"), "estimated": bool(e.get("estimated")),
            "complete": bool(e.get("complete")), "tokens": m["tokens"], "users": users,
            "share_j": None if value is None or not users else value / len(users)}


def cache_share(info: dict[str, Any], kind: str, comp: str) -> tuple[Share | None, str]:
    """A run's share of the teacher-cache energy (component `comp`): cache energy / runs that
    used the cache, and a note on why there is none (None: not applicable).

    The cache folder (run.json `teacher_cache.path`) is the source of truth: its manifest's
    per-component build energy and its users.jsonl. Without the folder, run.json's own record
    is used if it names the number of `students` sharing the cache."""
    signals = info.get("teacher_signals")
    if kind in ("baseline", "teacher") or signals is None:
        return None, "no teacher signals (n/a)"
    if signals == "online":
        return None, "online teacher: its forward passes are inside E_run"
    tc = info.get("teacher_cache")
    if not isinstance(tc, dict):
        return Share.missing("teacher_signals=cache but run.json has no teacher_cache "
                             "record: the cache's energy is unknown"), "cache"
    path = tc.get("path")
    if path and (Path(path) / "manifest.json").is_file():
        return _share_from_cache(Path(path), comp), "cache"
    return _share_from_record(tc, comp, path), "cache"


def _share_from_cache(path: Path, comp: str) -> Share:
    try:
        am = amortisation(path)
        energy = read_cache_manifest(path).get("energy") or {}
    except (CacheError, OSError, ValueError) as exc:
        return Share.missing(f"teacher cache {path}: {exc}")
    users = len(am["users"])
    e = (energy.get("components") or {}).get(comp)
    src = (energy.get("sources") or {}).get(comp)
    if e is None:
        return Share.missing(f"teacher cache {path.name}: no {label_of(comp)} energy figure "
                             "for its build")
    if not users:
        return Share.missing(f"teacher cache {path.name}: no run registered in users.jsonl "
                             "to share its energy")
    u = None
    if comp == "gpu":  # the manifest records each build session's GPU uncertainty only
        uncs = [s.get("uncertainty_j") for s in energy.get("sessions") or []]
        u = math.fsum(uncs) if uncs and None not in uncs else None
    share = Share(e / users, None if u is None else u / users, src, _estimated(src),
                  note=f"cache energy {e:.6g} J / {users} runs")
    if not energy.get("complete", True):
        share = share.with_note("cache energy is a lower bound (a build session was not "
                                "metered)")
    return share


def _share_from_record(tc: dict[str, Any], comp: str, path: str | None) -> Share:
    students = tc.get("students")
    where = f"teacher cache folder {path} not found" if path else "no teacher cache path"
    if not isinstance(students, int) or isinstance(students, bool) or students < 1:
        return Share.missing(f"{where}, and run.json teacher_cache has no `students` count "
                             "(>= 1) to amortise its energy over")
    energy, source, unc = tc.get("energy_j"), tc.get("source"), tc.get("uncertainty_j")
    if isinstance(energy, dict):
        e = energy.get(comp)
        src = source.get(comp) if isinstance(source, dict) else source
        u = unc.get(comp) if isinstance(unc, dict) else None
    elif isinstance(energy, int | float):
        src = source if isinstance(source, str) else None
        cls = source_class(src) if src else None
        rec_comp = tc.get("component") or (cls.COMPONENTS[0] if cls else None)
        if rec_comp is None:
            return Share.missing("run.json teacher_cache.energy_j has no source or component "
                                 "label")
        e = energy if rec_comp == comp else None
        u = unc if isinstance(unc, int | float) else None
    else:
        e, src, u = None, None, None
    if e is None:
        return Share.missing(f"teacher cache record has no {label_of(comp)} energy figure")
    return Share(e / students, None if u is None else u / students, src,
                 _estimated(src) or bool(tc.get("estimated")),
                 note=f"cache energy {e:.6g} J / {students} students")


def finetune_share(info: dict[str, Any], comp: str) -> Share | None:
    """A student's share of the teacher fine-tune energy: the fine-tune run's E_run / the
    students registered on it. None when the run did not use a teacher fine-tuned in its
    experiment."""
    rec = info.get("teacher_finetune")
    if not isinstance(rec, dict) or not rec.get("run_dir"):
        return None
    tdir = Path(rec["run_dir"])
    if not (tdir / "run.json").is_file():
        return Share.missing(f"teacher fine-tune run {tdir} not found: its energy cannot be "
                             "shared")
    try:
        fig = e_run(read_phases(tdir), "train", comp)
    except (OSError, ValueError) as exc:
        return Share.missing(f"teacher fine-tune: no {label_of(comp)} energy ({exc})")
    if fig.value is None:
        why = next((f for f in fig.flags if f.startswith("partial")), "source: unavailable")
        return Share.missing(f"teacher fine-tune: no {label_of(comp)} energy ({why})")
    users = len(finetune_users(tdir))
    if users < 1:
        return Share.missing(f"teacher fine-tune {tdir}: no student registered in "
                             "users.jsonl to share its energy")
    return Share(fig.value / users, None if fig.uncertainty is None else fig.uncertainty / users,
                 fig.source, fig.estimated,
                 note=f"teacher fine-tune energy {fig.value:.6g} J / {users} students")
