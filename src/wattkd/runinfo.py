"""Run identity (run.json): what ran, where, with which versions — so every figure has a source."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from wattkd.atomic import atomic_write_json

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
        import torch

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


def write_run_json(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Create or update run.json; identity fields are refreshed at every (re)start."""
    path = run_dir / "run.json"
    data: dict[str, Any] = {}
    if path.exists():
        import json

        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    data.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    data.update({"versions": versions(), "git_sha": git_sha(), "hardware": hardware(),
                 "slurm": slurm_ids()})
    data.update(fields)
    data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)
    return data
