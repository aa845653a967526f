"""One writer per run folder: an flock on `<run_dir>/.wattkd.lock`.

Two `wattkd train` on one folder both finished, every step logged twice, and the report counted
the tokens and energy of both. The writer now holds an exclusive `flock` on the lock file for
its whole life; the OS releases it when the process ends, however it ends (SIGKILL, OOM, node
loss on a local disk). A second writer is refused with one `error:` line naming the holder
(stage, pid, host, start time), which the holder writes into the lock file.

A lock file still naming a holder when the lock is free was left by a process that died without
releasing it (a clean exit empties the file): it is taken over, and the takeover is returned
for run.json. The lock file is never deleted (deleting a locked file lets a third process lock
a new file of the same name while the first still holds the old one).

Shared file systems: flock over NFS is forwarded to the server as a POSIX lock on Linux >= 2.6.12
(NFSv4, or NFSv3 with lockd) and then excludes writers on every node; a mount with `nolock` or
`local_lock=flock/all` makes the lock local to one node. Lustre needs the `flock` mount option
(with `localflock` it is node-local), GPFS and BeeGFS honour it. Where locks are node-local,
one folder must be written by one job at a time (Slurm: one job per run, `--dependency` between
reruns), as without this lock.

Multi-rank runs: only global rank 0 locks; the other ranks of the run must not lock each other
out (they learn from rank 0 whether it holds the lock, `train.lock_run_folder`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from wattkd.errors import InputError

__all__ = ["LOCK_FILE", "RunFolderBusy", "RunLock"]

LOCK_FILE = ".wattkd.lock"


class RunFolderBusy(InputError):
    """Another process writes this run folder right now."""


class RunLock:
    """The exclusive lock of one run folder: acquire, then release (train.lock_run_folder)."""

    def __init__(self, run_dir: Path, stage: str) -> None:
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None
        self.taken_over: dict[str, Any] | None = None  # the dead holder whose lock was taken

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderBusy(busy_message(self.run_dir, holder(self.path))) from None
        except OSError:
            os.close(fd)
            raise
        previous = _parse(os.pread(fd, 65536, 0))
        if previous:
            previous["taken_over"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            self.taken_over = previous
        me = {"stage": self.stage, "pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[:8]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        """Empty the lock file (a clean end) and unlock it."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing the descriptor releases the flock
        self.fd = None


def _parse(raw: bytes) -> dict[str, Any] | None:
    text = raw.decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return {"unreadable": text[:200]}
    return info if isinstance(info, dict) else {"unreadable": text[:200]}


def holder(path: Path) -> dict[str, Any] | None:
    """Who the lock file says holds it (None when it names nobody)."""
    try:
        return _parse(path.read_bytes())
    except OSError:
        return None


def busy_message(run_dir: Path, who: dict[str, Any] | None) -> str:
    if who and "pid" in who:
        by = (f"`wattkd {who.get('stage', '?')}` (pid {who['pid']} on host "
              f"{who.get('host', '?')}, started {who.get('started', '?')})")
    else:
        by = "another wattkd process"
    return (f"{run_dir} is being written by {by}: one writer per run folder; wait for it to "
            f"end or stop it, then rerun (a lock left by a process that died is taken over "
            f"automatically; {run_dir / LOCK_FILE})")
