"""benchmarks/energy_validation.py --dry-run: the GPU benchmark's CPU-side logic end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_reports_nvml_unavailable_and_writes_results(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO / "src")] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "energy_validation.py"), "--out",
         str(tmp_path), "--dry-run", "--load-seconds", "0.3", "--idle-seconds", "0.2",
         "--overhead-blocks", "2", "--overhead-block-seconds", "0.05"],
        capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "energy_validation.json").read_text())
    assert r["dry_run"] is True and r["benchmark"] == "energy_validation"
    assert "--dry-run" in r["command"] and r["date"] and r["versions"]["torch"]
    if not r["nvml"]["available"]:
        assert r["nvml"]["reason"] and r["card"] is None
        assert r["load"].get("counter_energy_j") is None
    assert r["load"]["matmuls"] > 0 and r["sampler"]["samples"] >= 1
    for name in ("launch_bound", "gpu_bound"):
        ov = r["overhead"][name]
        assert ov["blocks"] == 2 and ov["step_ms_on"] > 0 and ov["step_ms_off"] > 0
    assert r["zeus"]["available"] in (True, False)
    assert "| Step-time overhead, gpu-bound (95% CI) |" in proc.stdout
    phases = (Path(r["run_dir"]) / "phases.jsonl").read_text().splitlines()
    assert json.loads(phases[-1])["kind"] == "run"


def test_without_gpu_and_without_dry_run_says_so(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO / "src")] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "energy_validation.py"),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env=env, check=False)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
    assert not (tmp_path / "energy_validation.json").exists()
