"""`wattkd train` as a benchmark subject: run it, time it, keep its log, read its metrics.

Shared by the benchmarks that measure whole training runs (multi_gpu.py, lora_base_dtype.py).
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path


def run_train(cmd: list[str], env: dict[str, str], run_dir: Path, log: Path,
              timeout: int) -> tuple[dict, list[dict]]:
    """Run one `wattkd train` command: ({wall_s, status}, its metrics.jsonl records; [] when
    it failed). The whole output goes to `log`; the status carries the tail of stderr."""
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                         check=False)
    rec: dict = {"wall_s": round(time.perf_counter() - t0, 1)}
    log.write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        rec["status"] = f"error (exit {res.returncode}): {res.stderr[-600:]}"
        return rec, []
    rec["status"] = "ok"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return rec, [json.loads(x) for x in lines]


def peak_memory_gb(train: list[dict]) -> float | None:
    """Largest `gpu_mem_peak_gb` of the logged steps (torch peak allocated, fullest rank)."""
    peaks = [r["gpu_mem_peak_gb"] for r in train if r.get("gpu_mem_peak_gb") is not None]
    return max(peaks) if peaks else None


def card() -> str:
    """'N x <GPU name>' from nvidia-smi, else the CPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        names = [x.strip() for x in out.splitlines() if x.strip()]
        return f"{len(names)} x {names[0]}" if names else platform.processor()
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "cpu"
