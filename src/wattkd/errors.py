"""One family of errors a user can act on, and how the CLI reports them.

Every wattkd domain error subclasses `WattkdError` (through one of the category bases below),
so the CLI catches them in one place and prints a single `error:` line naming the file or key
and what to do, then exits with the category's code (README "Exit codes"). Common OS errors
(no space, permission, read-only file system, missing path) are reported the same way by
`describe_os_error`. A traceback is shown only for bugs, or with `--debug` / WATTKD_DEBUG=1.

Exit codes:
    1   unexpected error (a bug: rerun with --debug and report the traceback)
    2   bad config, command line or request (ConfigError, SpecError, SlurmError, ...)
    3   bad or corrupt input data (shards, teacher cache, sources, task data)
    4   a model cannot be used as configured (missing layer, vocabulary, dtype)
    5   a checkpoint cannot be used (corrupt, written by another setup)
    6   operating system: no space left, permission denied, read-only, missing path
    7   the run failed on its own terms (training diverged)
    75  preempted: a checkpoint was saved, rerun to continue (the Slurm wrapper requeues)
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from wattkd.runinfo import write_run_json

__all__ = [
    "EXIT_CODES",
    "OS_EXIT_CODE",
    "CheckpointFault",
    "ConfigError",
    "DataError",
    "InputError",
    "ModelFault",
    "RunFailure",
    "WattkdError",
    "describe_os_error",
    "failed_runs",
    "mark_failed",
    "note_run_dir",
]

OS_EXIT_CODE = 6
EXIT_CODES = {1: "unexpected error (a bug)", 2: "bad config, command line or request",
              3: "bad or corrupt input data", 4: "model cannot be used as configured",
              5: "checkpoint cannot be used", OS_EXIT_CODE: "operating system error",
              7: "run failed (diverged)", 75: "preempted (checkpoint saved)"}


class WattkdError(Exception):
    """Base of every error the user can act on; `exit_code` is the CLI's exit status."""

    exit_code = 2


class InputError(WattkdError):
    """Bad config, command line or request."""

    exit_code = 2


class ConfigError(InputError, ValueError):
    """A configuration problem, reported with the file and key it concerns."""


class DataError(WattkdError):
    """Input data that is missing, corrupt or does not match its manifest."""

    exit_code = 3


class ModelFault(WattkdError):
    """A model that cannot be used as configured."""

    exit_code = 4


class CheckpointFault(WattkdError):
    """A checkpoint that cannot be used."""

    exit_code = 5


class RunFailure(WattkdError):
    """A run that stopped on its own terms (e.g. diverged)."""

    exit_code = 7


_WRITABLE = "fix the permissions or point output_dir at a folder you can write"
_OS_HINTS = {
    errno.ENOSPC: ("no space left on device",
                   "free space there or point output_dir at a disk with room"),
    errno.EDQUOT: ("disk quota exceeded", "free space there or point output_dir elsewhere"),
    errno.EACCES: ("permission denied", _WRITABLE),
    errno.EPERM: ("operation not permitted", _WRITABLE),
    errno.EROFS: ("read-only file system", "point output_dir at a writable disk"),
    errno.ENOENT: ("no such file or directory", "check the path in the config or command line"),
}


def describe_os_error(exc: OSError) -> str:
    """`no space left on device: /path (free space there ...)` for the common cases; the plain
    message (with the file) otherwise."""
    where = exc.filename or ""
    if exc.filename2:
        where = f"{where} -> {exc.filename2}"
    hint = _OS_HINTS.get(exc.errno or -1)
    if hint is None:
        if exc.errno is None:
            return str(exc)
        return f"{exc.strerror or os.strerror(exc.errno)}: {where or '(no path given)'}"
    what, todo = hint
    own = exc.strerror if exc.strerror and exc.strerror != os.strerror(exc.errno or 0) else None
    detail = f": {own}" if own else ""
    return f"{what}: {where or '(no path given)'}{detail} ({todo})"


# ----------------------------------------------------------------- runs that fail in this process
_RUN_DIRS: list[Path] = []


def note_run_dir(run_dir: Path) -> None:
    """Remember a run directory whose run.json says "running", so that an error reaching the
    CLI marks it failed (with the reason) instead of leaving it "running"."""
    if run_dir not in _RUN_DIRS:
        _RUN_DIRS.append(Path(run_dir))


def failed_runs() -> list[Path]:
    return list(_RUN_DIRS)


def mark_failed(reason: str, exit_code: int, kind: str) -> list[Path]:
    """Write status "failed" and the reason into the run.json of every noted run still marked
    running; returns those updated. Never raises: reporting must not hide the first error."""
    done = []
    for run_dir in _RUN_DIRS:
        try:
            info: dict[str, Any] = json.loads((run_dir / "run.json").read_text())
            if info.get("status") != "running":
                continue
            write_run_json(run_dir, status="failed",
                           error={"message": reason, "exit_code": exit_code, "type": kind})
            done.append(run_dir)
        except Exception:  # noqa: BLE001, S112 - the original error is what the user needs
            continue
    _RUN_DIRS.clear()
    return done
