"""benchmarks/kd_throughput.py's ceiling: the arithmetic against hand-computed numbers, and the
body-only rows + head-GEMM measurement end to end on a tiny pair on CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("kd_throughput",
                                               REPO / "benchmarks" / "kd_throughput.py")
kd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kd)


def test_head_gemm_flops_counts_four_gemms_or_three_without_teacher():
    # 2 x rows x vocab x hidden: 2*10*100*4 = 8000; teacher 2*10*100*8 = 16000
    assert kd.head_gemm_flops(10, 100, 4, 8) == {
        "teacher_forward": 16000.0, "student_forward": 8000.0,
        "student_grad_hidden": 8000.0, "student_grad_weight": 8000.0}
    assert set(kd.head_gemm_flops(10, 100, 4, None)) == set(kd.HEAD_GEMMS[1:])


def test_ceiling_adds_gemm_time_at_measured_rate_to_body_time():
    # 2 TFLOP at 400 TFLOP/s = 5 ms, 1 TFLOP at 100 TFLOP/s = 10 ms; 500 + 15 = 515 ms;
    # 1000 tokens / 0.515 s = 1941.7 tokens/s
    c = kd.ceiling(1000, 0.5, {"a": 2e12, "b": 1e12}, {"a": 400.0, "b": 100.0})
    assert c["head_gemm_s"] == {"a": 0.005, "b": 0.01}
    assert c["step_s_min"] == 0.515
    assert c["tokens_per_s_max"] == pytest.approx(1941.75, abs=0.01)
    assert c["arithmetic"].startswith("1000 tokens / (500.0 ms body + 15.0 ms head GEMMs")
    assert c["arithmetic"].endswith("= 1,942 tokens/s")


def _rec(impl, tps, seconds=1.0, batch=2, seq=5, status="ok"):
    return {"impl": impl, "batch": batch, "seq": seq, "steps": 2, "seconds": seconds,
            "tokens_per_s": tps, "status": status}


def test_ceilings_ratios_and_targets():
    records = [_rec("body_only", 10.0, seconds=1.0), _rec("body_only_student", 33.3, 0.6),
               _rec("liger_chunked", 10.0), _rec("liger_chunked", 13.0), _rec("wattkd", 20.0),
               _rec("wattkd_triton", None, status="oom")]
    head = {"best_tflops": {k: 1e-6 for k in kd.HEAD_GEMMS}}   # 1e6 FLOP/s
    online, cache = kd.ceilings(records, head, (100, 4, 8), kd.TARGETS["gemma"])
    # rows 2 x (5-1) = 8: teacher 2*8*100*8 = 12800 FLOP = 12.8 ms, students 6.4 ms each;
    # 0.5 s body + 32 ms = 0.532 s; 10 tokens / 0.532 s = 18.797 tokens/s
    assert online["head_gemm_s"]["teacher_forward"] == 0.0128
    assert online["step_s_min"] == 0.532
    assert online["tokens_per_s_max"] == pytest.approx(18.797, abs=1e-3)
    assert [p["impl"] for p in online["vs_peers"]] == ["liger_chunked", "liger_chunked",
                                                      "wattkd"]
    assert online["vs_peers"][1]["ceiling_over_measured"] == 1.446   # 18.797 / 13
    (target,) = online["targets"]                                    # best liger: 13
    assert target["needed_tokens_per_s"] == 19.5 and target["reachable"] is False
    # no teacher: 0.3 s + 3 x 6.4 ms = 0.3192 s; 10 / 0.3192 = 31.328; 1.5 x 20 = 30
    assert "teacher_forward" not in cache["head_gemm_s"]
    assert cache["tokens_per_s_max"] == pytest.approx(31.328, abs=1e-3)
    (target,) = cache["targets"]
    assert target["ceiling_over_peer"] == 1.566 and target["reachable"] is True


def test_tiny_run_writes_body_rows_head_gemm_and_ceiling(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "kd_throughput.py"), "--out",
           str(tmp_path), "--tiny", "--impls", "body_only,body_only_student", "--batches", "2",
           "--steps", "1", "--warmup", "0", "--head-gemm"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ,
                               "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "kd_throughput.json").read_text())
    assert [r["status"] for r in result["records"]] == ["ok", "ok"]
    assert not (tmp_path / "kd_throughput.partial.json").exists()
    assert set(result["head_gemm"]["best_tflops"]) == set(kd.HEAD_GEMMS)
    assert all(r["tflops"] > 0 for r in result["head_gemm"]["runs"])
    assert [c["body"] for c in result["ceiling"]] == ["body_only", "body_only_student"]
    for c in result["ceiling"]:
        assert c["tokens_per_s_max"] > 0 and "tokens/s" in c["arithmetic"]
    assert "Ceiling (body_only, batch 2)" in proc.stdout


def test_unknown_impl_is_one_clear_error():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kd_throughput.py"),
                           "--out", "/tmp/unused", "--impls", "wattkd,bogus"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--impls: unknown ['bogus']" in proc.stderr


@pytest.mark.parametrize("name", ["body_only", "body_only_student"])
def test_body_rows_are_registered(name):
    fn, _ = kd.IMPLS[name]
    assert fn is kd.run_body_only
