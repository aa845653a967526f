"""Which implementation computes the fused logit loss: the switch, and the record of what ran.

Paths: `triton` (kernels/lm_head_kd.py: logits never in HBM), `compiled` (fast.py's closed-form
chunk compiled by inductor), `generic` (autograd on each chunk; any registered term), or `auto`
(the default): compiled on CUDA, the eager closed-form path on CPU, and the Triton kernel only
once it measures faster (AUTO_USES_TRITON). Measured on an H200 (benchmarks/RESULTS.md): the
kernel is correct and holds less memory, but its two vocab sweeps recompute both LM-head
matmuls, and at these hidden sizes that costs more than the compiled path's logits traffic
(8,192 rows, vocab 262,144, hidden 640: 39.9 vs 27.1 ms; Llama-8B->1B heads: 71.4 vs 40.0). The request comes from `distill.fused_kernel`
(`wattkd train` calls `set_path`) or the env var WATTKD_FUSED_KERNEL, which wins (benchmarks,
tests). Each distinct decision is logged once and kept for run.json (`decisions`).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

PATHS = ("auto", "triton", "compiled", "generic")
AUTO_USES_TRITON = False   # flip when the kernel measures faster than compiled
ENV = "WATTKD_FUSED_KERNEL"
_REQUESTED = ["auto"]
_DECISIONS: dict[str, str] = {}


def set_path(path: str) -> None:
    """The configured path (distill.fused_kernel) of a new run; earlier decisions are
    forgotten."""
    if path not in PATHS:
        raise ValueError(f"distill.fused_kernel must be one of {', '.join(PATHS)}; got {path!r}")
    _REQUESTED[0] = path
    _DECISIONS.clear()


def requested() -> str:
    env = os.environ.get(ENV)
    if env is None or env == "":
        return _REQUESTED[0]
    if env not in PATHS:
        raise ValueError(f"{ENV} must be one of {', '.join(PATHS)}; got {env!r}")
    return env


def triton_usable(device_type: str, forced: bool) -> str:
    """"" when the Triton kernels may run on this device type, else why not. Off CUDA only
    when forced and under Triton's interpreter (TRITON_INTERPRET=1: tests, slow)."""
    if device_type != "cuda" and not (forced and os.environ.get("TRITON_INTERPRET") == "1"):
        return f"device is {device_type} (the kernels need CUDA; TRITON_INTERPRET=1 and " \
               f"{ENV}=triton run them on CPU, slowly)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return ""


def record(path: str, reason: str) -> None:
    """Remember (and log, the first time) which path a loss call took and why."""
    if _DECISIONS.get(path) != reason:
        _DECISIONS[path] = reason
        log.info("fused logit loss: %s path (%s)", path, reason)


def decisions() -> dict[str, object]:
    """For run.json: what was asked for and every path taken, with its reason."""
    return {"requested": requested(), "used": dict(_DECISIONS)}


def reset() -> None:
    """Forget the decisions (tests; a new run in the same process)."""
    _DECISIONS.clear()
