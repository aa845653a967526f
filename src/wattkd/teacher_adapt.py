"""Who shares the cost of a teacher fine-tuned in this experiment (`wattkd teacher finetune`).

Adapting the teacher is a teacher-side cost paid once, like the teacher cache build: every
student that reads the fine-tuned teacher (online signals, the cache built from it, or an
initialisation from its layers) registers in `<output_dir>/teacher/users.jsonl`, and the
report splits the fine-tune run's `train` energy equally over the distinct users
(`wattkd.report.teacher_cost`). Registering twice (a resumed student) counts once.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

from wattkd.teacher_cache.usage import append_line

log = logging.getLogger(__name__)

USERS = "users.jsonl"

__all__ = ["USERS", "finetune_users", "record_finetune_use"]


def record_finetune_use(teacher_dir: str | Path, run_dir: str | Path) -> dict[str, Any]:
    """Register `run_dir` as a user of the fine-tuned teacher; returns run.json's record."""
    root = Path(teacher_dir).resolve()
    run = str(Path(run_dir).resolve())
    if run not in finetune_users(root):
        line = json.dumps({"schema": 1, "run_dir": run, "t_wall": round(time.time(), 3),
                           "host": socket.gethostname().split(".")[0]}) + "\n"
        append_line(root / USERS, line.encode())
    return {"run_dir": str(root), "final": str(root / "final")}


def finetune_users(teacher_dir: str | Path) -> list[str]:
    """Distinct student run directories registered on the fine-tuned teacher, sorted."""
    path = Path(teacher_dir) / USERS
    if not path.is_file():
        return []
    seen: set[str] = set()
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        if not line.strip():
            continue
        try:
            seen.add(str(json.loads(line)["run_dir"]))
        except (ValueError, KeyError, TypeError):
            log.warning("%s:%d: skipping an unreadable line", path, i + 1)
    return sorted(seen)
