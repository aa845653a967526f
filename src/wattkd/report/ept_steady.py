"""Steady-state EPT figures (wattkd.ept/2) of one ept.json run as report Quantities: the data
the analysis attaches to each EPT point and the EPT section (ept_section.py) tabulates and plots.
"""

from __future__ import annotations

from typing import Any

from wattkd.report.metrics import Quantity

__all__ = ["STEADY_KEYS", "V1_GAP", "steady_fields"]

V1_GAP = "ept.json is wattkd.ept/1 (no steady-state figures): re-run wattkd ept"
STEADY_KEYS = ("j_in_prefill", "j_out_decode", "j_per_request", "ms_per_step")


def steady_fields(doc: dict[str, Any], run: dict[str, Any], comp: str) -> dict[str, Any]:
    """EptPoint's steady-state fields from one wattkd.ept/2 `runs[]` entry (empty for /1)."""
    f = run.get("figures")
    if not isinstance(f, dict):
        return {}
    e = (f.get("energy") or {}).get(comp) or {}
    src = e.get("source") or "unavailable"
    est = bool(e.get("estimated"))

    def q(val: Any, unit: str, energy: bool = True, why: str | None = None) -> Quantity:
        if not isinstance(val, dict) or val.get("mean") is None:
            return Quantity.missing(why or f"no {comp} energy in ept.json (source: {src})", unit)
        return Quantity(float(val["mean"]), unit, val.get("uncertainty") if energy else None,
                        src if energy else None, est if energy else False)

    no_split = "prefill not measured separately (eval.ept.measure_prefill: false)"
    split = f.get("split") == "prefill-decode"
    steady = {
        "ms_per_step": q(f.get("ms_per_step"), "ms", energy=False, why="not measured"),
        "latency_ms": q(f.get("ms_per_request_batch"), "ms", energy=False, why="not measured"),
        "tokens_per_s": q(f.get("tokens_per_s"), "tokens/s", energy=False, why="not measured"),
        "j_in_prefill": q(e.get("j_per_input_token"), "J/token", why=None if split else no_split),
        "j_out_decode": q(e.get("j_per_output_token"), "J/token"),
        "j_per_request": q(e.get("j_per_request"), "J"),
        "dyn_j_out_decode": q(e.get("dynamic_j_per_output_token"), "J/token",
                              why=None if e.get("j_per_output_token") is None
                              else "idle power not measured"),
        "mean_power": q(e.get("mean_power_w"), "W"),
    }
    spread = {}
    for key, val in (("j_out_decode", e.get("j_per_output_token")),
                     ("ms_per_step", f.get("ms_per_step"))):
        if isinstance(val, dict) and val.get("mean") is not None:
            spread[key] = {k: val.get(k) for k in ("std", "min", "max", "n")}
    return {"steady": steady, "engine": str((doc.get("engine") or {}).get("name", "")),
            "spread": spread, "flags": list(run.get("flags") or [])}
