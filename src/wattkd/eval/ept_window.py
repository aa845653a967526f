"""Steady-state EPT arithmetic: how long a window must last, and what its figures are.

Pure functions on plain numbers (no torch, no hardware), so the rules are tested by hand.

Window length. The ledger's GPU uncertainty of a window of length T at power P is
counter_period x (P_start + P_end) + gain x E (energy/ledger.py), so its relative uncertainty
is about 2 x counter_period / T + gain. A window lasts `min_window_s`, or, with a target
relative uncertainty u (> gain), T = 2 x counter_period / (u - gain). Without an energy
counter (required length 0) a window is one whole pass over the prompts.

Prefill/decode split. A request is a prompt of P tokens and exactly N new tokens: the prefill
(one forward over the prompt) produces token 1, N - 1 decoding steps produce the rest.
Prefill windows run `generate` with one new token; request windows run all N. Per batch of B:
  J per input token   = E_prefill / input tokens                       (prefill)
  J per output token  = (E_request - E_prefill) / (B x (N - 1))        (decode)
  J per request       = E_request / B
  ms per decoding step = (t_request - t_prefill) / (N - 1)
with E and t per batch (window totals / batches run). Dynamic figures subtract idle power x
duration from each E first. Repeats pair request window i with prefill window i; figures are
reported as mean, sample standard deviation, min and max over repeats.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from wattkd.energy.components import components_of, shown
from wattkd.errors import InputError


class WindowError(InputError, ValueError):
    """A window setting that cannot be met (an uncertainty target below the gain error)."""


def required_window_s(*, min_window_s: float, target_rel_uncertainty: float | None = None,
                      counter_period_s: float = 0.1, gain_error: float = 0.0) -> float:
    """Seconds a metered window must last (see the module docstring)."""
    if target_rel_uncertainty is None:
        return max(0.0, float(min_window_s))
    if target_rel_uncertainty <= gain_error:
        raise WindowError(
            f"eval.ept.target_rel_uncertainty {target_rel_uncertainty:g} cannot be met: the "
            f"counter's gain error (telemetry.gpu_gain_error {gain_error:g}) alone is larger; "
            "set a target above it or use eval.ept.min_window_s")
    return 2.0 * counter_period_s / (target_rel_uncertainty - gain_error)


def window_done(elapsed_s: float, batches_run: int, *, required_s: float,
                min_batches: int) -> bool:
    """A window closes at a batch boundary once it has run `min_batches` and lasted long enough."""
    return batches_run >= max(1, min_batches) and elapsed_s >= required_s


@dataclass
class Window:
    """One metered window: totals over the whole batches it ran."""

    kind: str                                # "request" or "prefill"
    duration_s: float
    batches: int
    input_tokens: int
    output_tokens: int
    energy_j: dict[str, float | None] = field(default_factory=dict)
    uncertainty_j: dict[str, float | None] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    seq: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "duration_s": self.duration_s, "batches": self.batches,
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "energy_j": dict(self.energy_j), "uncertainty_j": dict(self.uncertainty_j),
                "source": dict(self.source), "flags": list(self.flags), "phase_seq": self.seq}


def window_from_record(kind: str, record: dict[str, Any], *, duration_s: float, batches: int,
                       input_tokens: int, output_tokens: int) -> Window:
    """A Window from a phases.jsonl record (an empty record: timings only, no energy)."""
    return Window(kind, float(record.get("duration_s") or duration_s), batches, input_tokens,
                  output_tokens, dict(record.get("energy_j") or {}),
                  dict(record.get("uncertainty_j") or {}),
                  dict(record.get("source") or {}), list(record.get("flags") or []),
                  record.get("seq"))


def spread(values: Sequence[float | None], uncertainty: Sequence[float | None] = ()
           ) -> dict[str, Any] | None:
    """Mean, sample std, min, max and count over repeats; None when any repeat is missing.
    `uncertainty`: each repeat's own (counter) uncertainty; their mean is kept."""
    if not values or any(v is None for v in values):
        return None
    vs = [float(v) for v in values]  # type: ignore[arg-type]
    mean = statistics.fmean(vs)
    out: dict[str, Any] = {"mean": mean, "std": statistics.stdev(vs) if len(vs) > 1 else 0.0,
                           "min": min(vs), "max": max(vs), "n": len(vs)}
    us = [u for u in uncertainty if u is not None]
    out["uncertainty"] = statistics.fmean(us) if us and len(us) == len(vs) else None
    return out


def _per(a: float | None, b: float) -> float | None:
    return None if a is None or b <= 0 else a / b


def _energy(w: Window, comp: str, idle_w: float | None, dynamic: bool) -> float | None:
    e = w.energy_j.get(comp)
    if e is None or not dynamic:
        return e
    return None if idle_w is None else e - idle_w * w.duration_s


def pair_figures(req: Window, pre: Window | None, *, batch_size: int, new_tokens: int,
                 comp: str, idle_w: float | None = None, dynamic: bool = False
                 ) -> dict[str, float | None]:
    """The figures of one repeat (request window + its prefill window) for one component."""
    e_req = _per(_energy(req, comp, idle_w, dynamic), req.batches)
    u_req = _per(req.uncertainty_j.get(comp), req.batches)
    out: dict[str, float | None] = {"j_per_request": _per(e_req, batch_size),
                                    "j_per_request_uncertainty": _per(u_req, batch_size)}
    if pre is None:  # no split: the whole request over its output tokens
        out["j_per_input_token"] = None
        out["j_per_output_token"] = _per(e_req, batch_size * new_tokens)
        out["j_per_output_token_uncertainty"] = _per(u_req, batch_size * new_tokens)
        out["j_per_input_token_uncertainty"] = None
        return out
    e_pre = _per(_energy(pre, comp, idle_w, dynamic), pre.batches)
    u_pre = _per(pre.uncertainty_j.get(comp), pre.batches)
    steps = new_tokens - 1
    e_dec = None if e_req is None or e_pre is None else e_req - e_pre
    out["j_per_input_token"] = _per(e_pre, pre.input_tokens / pre.batches)
    out["j_per_input_token_uncertainty"] = _per(u_pre, pre.input_tokens / pre.batches)
    out["j_per_output_token"] = _per(e_dec, batch_size * steps)
    u_dec = None if u_req is None or u_pre is None else math.hypot(u_req, u_pre)
    out["j_per_output_token_uncertainty"] = _per(u_dec, batch_size * steps)
    return out


def point_figures(requests: Sequence[Window], prefills: Sequence[Window], *, batch_size: int,
                  new_tokens: int, idle_power_w: dict[str, Any] | None = None,
                  components: Sequence[str] | None = None) -> dict[str, Any]:
    """Every reported figure of one batch size, over its repeats (module docstring);
    `components`: default, every component the request windows name (energy.components)."""
    if prefills and len(prefills) != len(requests):
        raise ValueError(f"{len(requests)} request windows but {len(prefills)} prefill windows")
    split = bool(prefills) and new_tokens > 1
    pres: list[Window | None] = list(prefills) if split else [None] * len(requests)
    t_req = [w.duration_s / w.batches for w in requests]
    t_pre = [w.duration_s / w.batches for w in prefills] if split else []
    steps = new_tokens - 1 if split else new_tokens
    step_ms = [1000 * (tr - (t_pre[i] if split else 0.0)) / steps for i, tr in enumerate(t_req)]
    out: dict[str, Any] = {
        "split": "prefill-decode" if split else "none",
        "decode_steps": steps,
        "ms_per_step": spread(step_ms),
        "ms_per_request_batch": spread([1000 * t for t in t_req]),
        "ms_prefill_batch": spread([1000 * t for t in t_pre]) if split else None,
        "tokens_per_s": spread([(w.input_tokens + w.output_tokens) / w.duration_s
                                for w in requests if w.duration_s > 0]),
        "output_tokens_per_s": spread([w.output_tokens / w.duration_s for w in requests
                                       if w.duration_s > 0]),
        "energy": {},
    }
    idle = idle_power_w or {}
    if components is None:
        components = components_of(*({"source": w.source} for w in requests))
    for comp in components:
        sources = {w.source.get(comp, "unavailable") for w in requests}
        if not shown(comp, sources != {"unavailable"}):
            continue  # gpu and cpu always appear (null when unavailable); others only if read
        idle_w = idle.get(comp) if isinstance(idle.get(comp), int | float) else None
        row: dict[str, Any] = {"source": "+".join(sorted(sources))}
        row["estimated"] = any(str(s).startswith("estimated") for s in sources)
        reps = [pair_figures(r, p, batch_size=batch_size, new_tokens=new_tokens, comp=comp)
                for r, p in zip(requests, pres, strict=True)]
        dyn = [pair_figures(r, p, batch_size=batch_size, new_tokens=new_tokens, comp=comp,
                            idle_w=idle_w, dynamic=True)
               for r, p in zip(requests, pres, strict=True)]
        for key in ("j_per_input_token", "j_per_output_token", "j_per_request"):
            unc = [x.get(key + "_uncertainty") for x in reps]
            row[key] = spread([x[key] for x in reps], unc)
            row["dynamic_" + key] = spread([x[key] for x in dyn], unc)
        row["mean_power_w"] = spread([_per(w.energy_j.get(comp), w.duration_s)
                                      for w in requests])
        row["idle_power_w"] = idle_w
        out["energy"][comp] = row
    return out


def throughput_growth(previous: float | None, current: float | None) -> float | None:
    """Relative growth of output tokens/s from the previous batch size (None: first point)."""
    if previous is None or current is None or previous <= 0:
        return None
    return current / previous - 1.0
