"""Run identity (run.json): what ran, where, with which versions — so every figure has a source."""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from wattkd.atomic import atomic_write_json

log = logging.getLogger(__name__)

PACKAGES = ("wattkd", "torch", "transformers", "accelerate", "peft", "datasets", "pyarrow",
            "nvidia-ml-py", "lm_eval")
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME",
              "SLURM_NODELIST", "SLURM_RESTART_COUNT", "SLURM_PROCID", "SLURM_NNODES")


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Python and package versions (None: not installed), for run.json and benchmarks."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_sha() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"host": socket.gethostname(), "cpu": platform.processor() or
                            platform.machine(), "cpu_count": os.cpu_count(), "gpus": []}
    try:
        import torch  # lazy: run identity is read by `wattkd slurm status`, which needs no torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                info["gpus"].append({"index": i, "name": props.name,
                                     "memory_gb": round(props.total_memory / 2**30, 1),
                                     "uuid": str(getattr(props, "uuid", "")) or None})
    except Exception:  # noqa: BLE001, S110 - identity must never break a run
        pass
    return info


def slurm_ids() -> dict[str, str]:
    return {k: os.environ[k] for k in SLURM_VARS if k in os.environ}


def pid_alive(pid: Any) -> bool:
    """Whether process `pid` exists on this host (a zombie or another user's counts)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def effective_status(info: dict[str, Any]) -> str:
    """run.json's status, with a "running" run whose process is gone shown as "crashed".

    A run killed without a chance to write (SIGKILL, OOM killer, node loss) stays "running" in
    its file; a reader on the same host sees its pid is dead. On another host it cannot tell
    and the recorded status stands (the next start on any host records the crash)."""
    status = str(info.get("status") or "unknown")
    if status != "running":
        return status
    host = info.get("pid_host")
    if host == socket.gethostname() and not pid_alive(info.get("pid")):
        return "crashed"
    return status


HISTORY_KEYS = ("config_changes", "lock_takeovers")


def run_history(run_dir: Path) -> dict[str, list[Any]]:
    """The run's recorded history lists (config changes accepted at a resume, with their step;
    locks taken over from dead processes), to be appended to and written back."""
    try:
        data = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        data = {}
    data = data if isinstance(data, dict) else {}
    return {k: list(data.get(k) or []) for k in HISTORY_KEYS}


def write_run_json(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Create or update run.json; identity fields are refreshed at every (re)start. A start
    that finds the file still "running" from a process that is gone records that crash."""
    path = run_dir / "run.json"
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    data.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    stale = data.get("status") == "running" and data.get("pid") != os.getpid()
    if stale and (data.get("pid_host") != socket.gethostname() or
                  not pid_alive(data.get("pid"))):
        log.warning("%s said running (pid %s on %s, last update %s) but that process is gone: "
                    "recorded as a crash in run.json", path, data.get("pid"),
                    data.get("pid_host"), data.get("updated"))
        data.setdefault("crashes", []).append(
            {"pid": data.get("pid"), "host": data.get("pid_host"), "step": data.get("step"),
             "last_update": data.get("updated"),
             "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    data.update({"versions": versions(), "git_sha": git_sha(), "hardware": hardware(),
                 "slurm": slurm_ids(), "pid": os.getpid(), "pid_host": socket.gethostname()})
    data.update(fields)
    data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)
    return data
