"""pytest plugin for benchmarks/kernel_tests_cuda.py: one JSON line per test case (start, end)
with its wall time and the Triton compiles inside it, and a Python traceback of every thread
written shortly before the runner's timeout kills a case (where it hangs: compiling or running).

    python -m pytest -p kernel_case_timing tests/test_lm_head_kd.py   (benchmarks/ on PYTHONPATH)

Environment: KERNEL_TIMING_LOG (JSONL path, required), KERNEL_TIMING_TIMEOUT (seconds of the
runner's per-case timeout; the traceback is dumped 5 s before it), KERNEL_TIMING_TRACEBACKS
(file the tracebacks go to), KERNEL_TIMING_FP32_BLOCKS (see _set_fp32_blocks).
"""

from __future__ import annotations

import faulthandler
import json
import os
import time

import pytest

_COMPILES: list[dict] = []
_TB_FILE: list = []


def _log(record: dict) -> None:
    with open(os.environ["KERNEL_TIMING_LOG"], "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _kernel_name(fn) -> str:
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", "?")


def _wrap_do_compile() -> bool:
    """Time JITFunction._do_compile (a fresh TRITON_CACHE_DIR makes every first call a real
    compile); False where this Triton has no such method."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    original = getattr(JITFunction, "_do_compile", None)
    if original is None:
        return False

    def timed(self, *args, **kwargs):
        _log({"event": "compile_start", "kernel": _kernel_name(self.fn), "t": time.time()})
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            seconds = round(time.perf_counter() - t0, 3)
            _COMPILES.append({"kernel": _kernel_name(self.fn), "seconds": seconds})
            _log({"event": "compile_end", "kernel": _kernel_name(self.fn), "seconds": seconds})

    JITFunction._do_compile = timed
    return True


def _listen_stages() -> bool:
    """Per-stage compile times from triton.knobs.compilation.listener, where it exists."""
    try:
        from triton import knobs
    except ImportError:
        return False
    if not hasattr(getattr(knobs, "compilation", None), "listener"):
        return False

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        name = getattr(getattr(src, "fn", None), "__name__", "?")
        stages = {k: round(v / 1e6, 3) for k, v in times.lowering_stages}
        _COMPILES.append({"kernel": name, "stages_s": stages, "cache_hit": cache_hit,
                          "total_s": round(times.total / 1e6, 3)})

    knobs.compilation.listener = listener
    return True


def _set_fp32_blocks() -> str | None:
    """KERNEL_TIMING_FP32_BLOCKS="BM,BV,BK,warps,stages": the fp32 tiles of lm_head_kd for
    this session (to time a compile at other tiles, e.g. the 128-wide ones of before)."""
    spec = os.environ.get("KERNEL_TIMING_FP32_BLOCKS")
    if not spec:
        return None
    from wattkd.distill.kernels import lm_head_kd

    blocks = tuple(int(x) for x in spec.split(","))
    lm_head_kd.BLOCKS_FP32.update(stats=blocks, grad=blocks)
    return spec


def pytest_configure(config):
    fp32_blocks = _set_fp32_blocks()
    wrapped = _wrap_do_compile()
    staged = _listen_stages()
    _log({"event": "session", "t": time.time(), "do_compile_timed": wrapped,
          "stage_listener": staged, "triton_interpret": os.environ.get("TRITON_INTERPRET"),
          "fp32_blocks": fp32_blocks})
    path = os.environ.get("KERNEL_TIMING_TRACEBACKS")
    if path:
        _TB_FILE.append(open(path, "a", encoding="utf-8"))  # noqa: SIM115 - open all session


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _COMPILES.clear()
    _log({"event": "start", "node": item.nodeid, "t": time.time()})
    timeout = float(os.environ.get("KERNEL_TIMING_TIMEOUT", "0"))
    if timeout > 5 and _TB_FILE:
        _TB_FILE[0].write(f"\n=== {item.nodeid}: traceback {timeout - 5:.0f} s in ===\n")
        _TB_FILE[0].flush()
        faulthandler.dump_traceback_later(timeout - 5, file=_TB_FILE[0])
    t0 = time.perf_counter()
    outcome = {"outcome": "passed"}
    item._timing_outcome = outcome
    yield
    faulthandler.cancel_dump_traceback_later()
    wall = time.perf_counter() - t0
    compiled = [c for c in _COMPILES if "seconds" in c]
    staged = [c for c in _COMPILES if "stages_s" in c]
    if not compiled:   # no _do_compile in this Triton: the listener's totals, where it has one
        compiled = [{"kernel": c["kernel"], "seconds": c["total_s"]} for c in staged
                    if not c["cache_hit"]]
    compile_s = sum(c["seconds"] for c in compiled)
    _log({"event": "end", "node": item.nodeid, "t": time.time(), "wall_s": round(wall, 3),
          "outcome": outcome["outcome"], "error": outcome.get("error"),
          "compile_s": round(compile_s, 3), "run_s": round(wall - compile_s, 3),
          "compiles": compiled, "compile_stages": staged})


def pytest_runtest_logreport(report):
    outcome = getattr(_current(report), "_timing_outcome", None)
    if outcome is None:
        return
    if report.failed:
        outcome["outcome"] = "failed"
        outcome["error"] = str(report.longrepr)[-1500:]
    elif report.skipped and outcome["outcome"] == "passed":
        outcome["outcome"] = "skipped"


_ITEMS: dict = {}


def pytest_collection_modifyitems(session, config, items):
    _ITEMS.update({item.nodeid: item for item in items})


def _current(report):
    return _ITEMS.get(report.nodeid)
