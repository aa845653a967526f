"""The GPU entry of issue 30 must not die on the GPU machine for a typo or a hanging case:
argument checks of benchmarks/gpu_issue30.sh and kernel_tests_cuda.py, the per-case timeout
(kill, record, go on with the next case), and the verdicts of the table generator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import issue30_table
import kernel_tests_cuda


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "error: unknown argument '--bogus'"),
    (["--total", "8min"], "error: --total needs whole seconds, got '8min'"),
    (["--part", "3"], "error: --part must be 1 or 2, got '3'"),
])
def test_gpu_script_refuses_bad_arguments_before_any_work(args, message, tmp_path):
    out = subprocess.run(["bash", str(BENCH / "gpu_issue30.sh"), *args], capture_output=True,
                         text=True, env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"},
                         check=False)
    assert out.returncode == 2
    assert message in out.stderr
    assert not any(tmp_path.iterdir())   # nothing started


def test_kernel_runner_refuses_bad_arguments(tmp_path, capsys):
    for argv, message in ((["--fp32-blocks", "128,64"], "--fp32-blocks: expected five"),
                          (["--timeout", "0"], "--timeout and --budget must be > 0"),
                          (["--tests", "tests/none.py"], "--tests: tests/none.py does not")):
        with pytest.raises(SystemExit) as exc:
            kernel_tests_cuda.main(["--out", str(tmp_path), *argv])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_a_hanging_case_is_killed_recorded_and_the_rest_still_run(tmp_path):
    cases = tmp_path / "test_cases.py"
    cases.write_text("import time\n\n"
                     "def test_first():\n    assert True\n\n"
                     "def test_hangs():\n    time.sleep(600)\n\n"
                     "def test_fails():\n    assert 1 == 2\n\n"
                     "def test_last():\n    assert True\n")
    ids = [f"{cases}::{name}" for name in ("test_first", "test_hangs", "test_fails",
                                           "test_last")]
    out = tmp_path / "out"
    out.mkdir()
    results, timing = kernel_tests_cuda.run_cases(ids, out, timeout=6.0, budget=120.0)
    assert timing["event"] == "session"   # the plugin ran in the child
    outcomes = {i.split("::")[1]: r["outcome"] for i, r in results.items()}
    assert outcomes == {"test_first": "passed", "test_hangs": "timeout", "test_fails": "failed",
                        "test_last": "passed"}
    hung = results[ids[1]]
    assert 6.0 <= hung["wall_s"] < 30 and hung["killed_while_compiling"] is None
    # where it stood, a second before the kill
    assert "in test_hangs" in (out / "kernel_tests_tracebacks.txt").read_text()
    assert "assert 1 == 2" in results[ids[2]]["error"]


def _record(impl, tps, peak=31.5, setup=None, status="ok"):
    return {"impl": impl, "batch": 64, "status": status, "tokens_per_s": tps,
            "peak_mem_gb": peak, "setup_peak_mem_gb": setup, "j_per_token": None, "mfu": None}


def test_table_verdicts_follow_the_issue_targets(tmp_path):
    kd = {"card": "NVIDIA H200", "date": "d", "command": "c", "records": [
        _record("liger_chunked", 100_000.0), _record("wattkd", 120_000.0),
        _record("wattkd_body_compile", 130_000.0),
        _record("wattkd_topk", 200_000.0, peak=28.0, setup=40.0),
        _record("wattkd_topk_body_compile", 0.0, status="oom")]}
    path = tmp_path / "kd.json"
    path.write_text(json.dumps(kd))
    lines = issue30_table.verdicts(kd, None)
    text = "\n".join(lines)
    # 200,000 < 220,000; 200k / 100k = 2.0 >= 1.9; 130k / 100k = 1.3 >= 1.25; 40 GB > 31.5 GB
    assert "220,000 tokens/s on an H200: **missed** (wattkd_topk 200,000" in text
    assert ">= 1.9x liger_chunked, same run: **met** (wattkd_topk 200,000 / liger_chunked " \
           "100,000 = 2.000x)" in text
    assert ">= 1.25x liger_chunked, same run: **met** (wattkd_body_compile 130,000" in text
    assert "no more memory than the online step: **missed** (wattkd_topk peak 40.0 GB" in text
    kd["card"] = "NVIDIA H100 80GB HBM3"
    assert "220,000 tokens/s on an H200: not measured" in "\n".join(
        issue30_table.verdicts(kd, None))
    assert issue30_table.main(["--kd", str(path), "--kernel", str(tmp_path / "none.json")]) == 0
