"""Inference energy-per-token (EPT) benchmark, in steady state, on a fast engine.

Fixed workload: `num_prompts` prompts of exactly `prompt_tokens` tokens (from a file, one a
line, or the bundled corpus), greedy decoding of exactly `max_new_tokens` tokens (EOS
suppressed until then, so every model does the same amount of work and counts are exact),
for each batch size in `batch_sizes`, on the engine of `wattkd.eval.engine` (static KV cache
+ compiled decoding on CUDA by default; dynamic eager as an option and on CPU).

Per batch size: `warmup_batches` unmetered request batches (compilation and CUDA-graph
capture happen there and are excluded), then `repeats` pairs of metered windows: `ept`
(whole requests) and `ept_prefill` (the same prompts, one new token). Each window runs whole
batches until it lasts the required length (ept_window.required_window_s); without an energy
counter it is one pass over the prompts. The prefill/decode split and every figure
(J per input token, J per output token, J per request, ms per decoding step, tokens/s, mean
power, total and dynamic) are computed in ept_window.point_figures, with their spread.

Definitions of the legacy per-run `energy` block (all request windows together; docs/metrics.md),
per energy component (gpu, cpu, dram, and any other a source measures, e.g. node: see
wattkd.energy.components), E = the windows' energy:
  EPT_in = E / input tokens, EPT_out = E / output tokens, EPT_total = E / (input + output);
  dynamic EPT_x = (E - P_idle x duration) / tokens_x, with P_idle the meter's idle power.
Components are reported side by side and never summed; a missing source gives nulls, and an
estimated source is labelled `estimated` in every row it touches.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers

import wattkd
from wattkd import generation
from wattkd.config import EptConfig
from wattkd.corpus import documents, fingerprint
from wattkd.energy.components import components_of, label_of, shown
from wattkd.energy.ledger import NullMeter
from wattkd.energy.sources import NvmlSource
from wattkd.errors import InputError
from wattkd.eval.engine import EngineError, generation_config, resolve_engine, set_attention
from wattkd.eval.ept_protocol import ept_protocol, figure
from wattkd.eval.ept_window import (
    Window,
    WindowError,
    point_figures,
    required_window_s,
    throughput_growth,
    window_done,
    window_from_record,
)
from wattkd.eval.harness import load_model
from wattkd.eval.protocol import protocol_hash, write_json_atomic
from wattkd.generation import SamplingParams
from wattkd.generation.graph_engine import INDUCTOR_OPTIONS, forward_for
from wattkd.models import resolve_device

log = logging.getLogger(__name__)

EPT_SCHEMA = "wattkd.ept/2"
CHARS_PER_PROMPT_TOKEN = 8  # generous: any sane tokenizer gives >= 1 token per 8 characters


class EptError(InputError, ValueError):
    """A benchmark setting that cannot be run (too few prompts for a batch size, ...)."""


# ------------------------------------------------------------------------- arithmetic
def _div(a: float | None, b: float) -> float | None:
    return None if a is None or b <= 0 else a / b


def ept_metrics(*, energy_j: float | None, duration_s: float, input_tokens: int,
                output_tokens: int, idle_power_w: float | None = None,
                uncertainty_j: float | None = None) -> dict[str, Any]:
    """EPT figures of one metered window (pure arithmetic; every field None when E is None)."""
    total = input_tokens + output_tokens
    idle_e = None if idle_power_w is None else idle_power_w * duration_s
    dyn = None if energy_j is None or idle_e is None else energy_j - idle_e
    return {
        "energy_j": energy_j,
        "duration_s": duration_s,
        "average_power_w": _div(energy_j, duration_s),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": total,
        "ept_in_j": _div(energy_j, input_tokens),
        "ept_out_j": _div(energy_j, output_tokens),
        "ept_total_j": _div(energy_j, total),
        "idle_power_w": idle_power_w,
        "idle_energy_j": idle_e,
        "dynamic_energy_j": dyn,
        "dynamic_ept_in_j": _div(dyn, input_tokens),
        "dynamic_ept_out_j": _div(dyn, output_tokens),
        "dynamic_ept_total_j": _div(dyn, total),
        "uncertainty_j": uncertainty_j,
        "ept_total_uncertainty_j": _div(uncertainty_j, total),
        "ept_out_uncertainty_j": _div(uncertainty_j, output_tokens),
    }


def ept_from_record(record: dict[str, Any], *, input_tokens: int,
                    output_tokens: int) -> dict[str, dict[str, Any]]:
    """Per-component EPT from a phases.jsonl record, with its source and `estimated` label."""
    idle = record.get("idle_power_w") or {}
    out: dict[str, dict[str, Any]] = {}
    for comp in components_of(record):
        source = (record.get("source") or {}).get(comp, "unavailable")
        energy = (record.get("energy_j") or {}).get(comp)
        if not shown(comp, energy is not None or source != "unavailable"):
            continue  # gpu and cpu always appear (null when unavailable); others only if read
        row = ept_metrics(energy_j=energy, duration_s=float(record["duration_s"]),
                          input_tokens=input_tokens, output_tokens=output_tokens,
                          idle_power_w=idle.get(comp) if isinstance(idle, dict) else None,
                          uncertainty_j=(record.get("uncertainty_j") or {}).get(comp))
        row["source"] = source
        row["estimated"] = str(source).startswith("estimated")
        out[comp] = row
    return out


def _latency(times: list[float], new_tokens: int) -> dict[str, Any]:
    s = sorted(times)

    def q(p: float) -> float:
        return s[min(len(s) - 1, max(0, math.ceil(p * len(s)) - 1))]

    mean = statistics.fmean(s)
    return {"batch_mean_s": mean, "batch_p50_s": q(0.5), "batch_p90_s": q(0.9),
            "batch_max_s": s[-1], "ms_per_output_token": 1000 * mean / new_tokens}


# ---------------------------------------------------------------------------- prompts
def load_prompts(cfg: EptConfig) -> tuple[list[str], str]:
    """(prompt texts, source label). Texts are tokenizer-independent, so teacher and student
    get the same workload; each is long enough to fill `prompt_tokens` tokens."""
    if cfg.prompts:
        p = Path(cfg.prompts).expanduser()
        if not p.is_file():
            raise EptError(f"eval.ept.prompts file not found: {p} (expected text, one prompt "
                           "a line)")
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if len(lines) < cfg.num_prompts:
            raise EptError(f"eval.ept.prompts {p} has {len(lines)} non-empty lines; "
                           f"eval.ept.num_prompts is {cfg.num_prompts}")
        return lines[:cfg.num_prompts], f"file:{p.name}"

    width = max(64, cfg.prompt_tokens * CHARS_PER_PROMPT_TOKEN)
    texts: list[str] = []
    buf = ""
    for doc in documents("all"):
        buf += doc.strip() + "\n\n"
        while len(buf) >= width and len(texts) < cfg.num_prompts:
            cut = buf.rfind(" ", width // 2, width)
            cut = width if cut < 0 else cut
            texts.append(buf[:cut].strip())
            buf = buf[cut:]
        if len(texts) >= cfg.num_prompts:
            break
    if len(texts) < cfg.num_prompts:
        raise EptError(f"the bundled corpus yields only {len(texts)} prompts of {width} "
                       f"characters; lower eval.ept.num_prompts or prompt_tokens")
    return texts, f"bundled:all@{fingerprint('all')[:12]}"


def _check(cfg: EptConfig) -> None:
    too_big = [b for b in cfg.batch_sizes if b > cfg.num_prompts]
    if too_big:
        raise EptError(f"eval.ept.batch_sizes {too_big} exceed eval.ept.num_prompts "
                       f"{cfg.num_prompts}: each batch size needs at least one full batch")
    if not cfg.batch_sizes or any(b <= 0 for b in cfg.batch_sizes):
        raise EptError(f"eval.ept.batch_sizes must be positive integers, got {cfg.batch_sizes}")
    if len(set(cfg.batch_sizes)) != len(cfg.batch_sizes):
        raise EptError(f"eval.ept.batch_sizes has repeats: {cfg.batch_sizes}")


    if cfg.measure_prefill and cfg.max_new_tokens < 2:
        raise EptError("eval.ept.measure_prefill needs eval.ept.max_new_tokens >= 2 (decode "
                       "is request minus prefill); set measure_prefill: false for 1 token")


__all__ = ["EPT_SCHEMA", "EptError", "ept_for", "ept_from_record", "ept_metrics",
           "ept_protocol", "load_prompts", "run_ept"]


# ------------------------------------------------------------------------------ running
def _sync(device: Any) -> None:
    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def _device_name(device: Any) -> str:
    if getattr(device, "type", "") == "cuda":
        return torch.cuda.get_device_name(device)
    return str(getattr(device, "type", device))


def _meter_or_null(meter: Any) -> tuple[Any, bool]:
    """The meter to use and whether this call must start/stop it (idle power is measured at
    start, before any window)."""
    if meter is None:
        return NullMeter(reason="no-meter"), False
    return meter, not getattr(meter, "started", True)


def _has_counter(meter: Any) -> bool:
    sources = getattr(meter, "sources", None)
    return isinstance(sources, dict) and sources.get("gpu") == NvmlSource.LABEL


def _window_s(meter: Any, cfg: EptConfig, override: float | None) -> float:
    """Seconds each metered window must last. With a GPU energy counter (whose ~100 ms
    quantisation swamps short windows): eval.ept.min_window_s (default telemetry.min_window_s)
    or what eval.ept.target_rel_uncertainty needs; without one: eval.ept.min_window_s or 0
    (one pass over the prompts)."""
    if override is not None:
        return max(0.0, float(override))
    tcfg = getattr(meter, "cfg", None)
    if not _has_counter(meter):
        return float(cfg.min_window_s or 0.0)
    min_w = cfg.min_window_s if cfg.min_window_s is not None else float(
        getattr(tcfg, "min_window_s", 0.0) or 0.0)
    return required_window_s(min_window_s=min_w,
                             target_rel_uncertainty=cfg.target_rel_uncertainty,
                             counter_period_s=float(getattr(meter, "counter_period_s", 0.1)
                                                    or 0.1),
                             gain_error=float(getattr(tcfg, "gpu_gain_error", 0.0) or 0.0))


def _label(device_type: str, meter: Any) -> str:
    """How the energy was obtained, in words (the CPU demo says `estimated`)."""
    sources = getattr(meter, "sources", None) or {}
    if sources.get("gpu") == NvmlSource.LABEL:
        return f"{device_type}, GPU energy from the NVML counter"
    if str(sources.get("cpu", "")).startswith("estimated"):
        return f"{device_type}, estimated energy (CPU time x telemetry.cpu_watts_per_core)"
    if sources.get("cpu") == "rapl":
        return f"{device_type}, CPU energy from RAPL"
    measured = {c: s for c, s in sources.items() if s != "unavailable"}
    if measured:
        return f"{device_type}, " + ", ".join(f"{label_of(c)} energy from {s}"
                                            for c, s in measured.items())
    return f"{device_type}, timings only (no energy counter)"


def _merge(windows: list[Window]) -> dict[str, Any]:
    """One phase-like record over several windows (energies and uncertainties summed)."""
    rec: dict[str, Any] = {"duration_s": sum(w.duration_s for w in windows),
                           "energy_j": {}, "uncertainty_j": {}, "source": {}}
    for comp in components_of(*({"source": w.source} for w in windows)):
        es = [w.energy_j.get(comp) for w in windows]
        us = [w.uncertainty_j.get(comp) for w in windows]
        rec["energy_j"][comp] = None if None in es or not es else sum(es)  # type: ignore[arg-type]
        rec["uncertainty_j"][comp] = None if None in us or not us else sum(us)  # type: ignore[arg-type]
        srcs = {w.source.get(comp, "unavailable") for w in windows}
        rec["source"][comp] = srcs.pop() if len(srcs) == 1 else "unavailable"
    return rec


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def measure_point(run_batch: Any, meter: Any, *, kind: str, batch_size: int,
                  n_batches: int, repeat: int, required_s: float, min_batches: int,
                  start: int = 0, clock: Any = time.perf_counter, **meta: Any
                  ) -> tuple[Window, list[float], list[str]]:
    """One metered window of whole batches: `run_batch(k) -> (input, output tokens)` runs
    batch k (k cycles over the prompt set from `start`). Returns the window, each batch's
    seconds and the window's notes."""
    phase = "ept" if kind == "request" else "ept_prefill"
    times: list[float] = []
    tin = tout = n = 0
    with meter.phase(phase, tokens=0, batch_size=batch_size, repeat=repeat, **meta) as w:
        t0 = clock()
        while not window_done(clock() - t0, n, required_s=required_s, min_batches=min_batches):
            t = clock()
            n_in, n_out = run_batch((start + n) % n_batches)
            times.append(clock() - t)
            tin, tout, n = tin + n_in, tout + n_out, n + 1
            w.add_tokens(n_in + n_out)
        wall = clock() - t0
    rec = w.record or {}
    win = window_from_record(kind, rec, duration_s=wall, batches=n, input_tokens=tin,
                             output_tokens=tout)
    return win, times, list(rec.get("notes", []))


def run_ept(model: str, cfg: EptConfig, meter: Any, out_path: Path, *, device: str = "auto",
            adapter: str | None = None, min_window_s: float | None = None) -> dict[str, Any]:
    """Benchmark inference energy per token of an HF model folder; write ept.json.

    `meter` is an EnergyMeter (started or not; an unstarted one is started here and stopped
    at the end, which measures idle power first) or NullMeter/None (no energy: timings only).
    `min_window_s` overrides the window length (see `_window_s`). `out_path` is the JSON
    file, or a run directory (then <run>/ept.json). LoRA adapters are merged first.
    """
    _check(cfg)
    texts, source = load_prompts(cfg)
    net, tok, engine, attn = _load(model, cfg, meter, device=device, adapter=adapter)
    dev = next(net.parameters()).device
    dtype = str(next(net.parameters()).dtype).removeprefix("torch.")
    engine_rec = engine.record(dtype=dtype, attn_implementation=attn)
    if engine.name.startswith("graph"):   # which forward it captures, with which inductor
        engine_rec["forward"] = forward_for(net)
        engine_rec["inductor_options"] = dict(INDUCTOR_OPTIONS) if engine.compile else None
    protocol = ept_protocol(cfg, texts, source, dtype=dtype, device_name=_device_name(dev),
                            engine=engine_rec)
    merged = adapter is not None or (Path(model) / "adapter_config.json").is_file()
    generate, short = _generator(model, net, tok, texts, cfg, engine)

    meter, own = _meter_or_null(meter)
    if own:
        meter.start()
    t_all = time.perf_counter()
    try:
        required = _window_s(meter, cfg, min_window_s)
    except WindowError as exc:
        raise EptError(str(exc)) from None
    try:
        runs, stopped_at = _sweep(generate, meter, cfg, required=required, model=model,
                                  engine=engine.name)
    finally:
        if own:
            meter.stop()

    idle = getattr(meter, "idle_power_w", None)
    result = {
        "schema": EPT_SCHEMA,
        "model": {"id": model, "adapter": adapter, "lora_merged": merged, "dtype": dtype,
                  "device": str(dev), "parameters": sum(p.numel() for p in net.parameters())},
        "engine": engine_rec,
        "protocol": protocol,
        "protocol_hash": protocol_hash(protocol),
        "measurement": _measurement(cfg, meter, dev.type, required),
        "idle_power_w": idle if isinstance(idle, dict) else None,
        "short_prompts": short,
        "sweep": {"requested": list(cfg.batch_sizes),
                  "measured": [r["batch_size"] for r in runs], "stopped_at": stopped_at,
                  "stop_when_saturated": cfg.stop_when_saturated},
        "runs": runs,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t_all, 3),
        "versions": _versions(),
    }
    p = Path(out_path)
    target = p if p.suffix == ".json" else p / "ept.json"
    write_json_atomic(target, result)
    log.info("wrote %s", target)
    return result


def _load(model: str, cfg: EptConfig, meter: Any, *, device: str,
          adapter: str | None) -> tuple[Any, Any, Any, str]:
    """(model, tokenizer, engine, attention implementation); a window target that cannot be
    met is refused before the model is loaded."""
    try:
        if cfg.target_rel_uncertainty is not None:  # fail before loading the model
            required_window_s(min_window_s=0.0, target_rel_uncertainty=cfg.target_rel_uncertainty,
                              gain_error=float(getattr(getattr(meter, "cfg", None),
                                                       "gpu_gain_error", 0.0) or 0.0))
        engine = resolve_engine(cfg, resolve_device(device).type)
        net, tok = load_model(model, adapter=adapter, device=device, dtype=cfg.dtype)
        attn = set_attention(net, cfg.attn_implementation)
    except (EngineError, WindowError) as exc:
        raise EptError(str(exc)) from None
    return net, tok, engine, attn


def _generator(model: str, net: Any, tok: Any, texts: list[str], cfg: EptConfig,
               engine: Any) -> tuple[Callable[[int, int, int], tuple[int, int]], int]:
    """(generate(lo, hi, new) -> (input tokens, output tokens) of prompts lo..hi with exactly
    `new` new tokens each, number of prompts shorter than prompt_tokens (left-padded))."""
    dev = next(net.parameters()).device
    tok.padding_side = "left"
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_id is None:
        raise EptError(f"tokenizer of {model} has neither a pad nor an eos token")
    enc = tok(texts, truncation=True, max_length=cfg.prompt_tokens, padding="max_length",
              return_tensors="pt")
    ids, att = enc["input_ids"], enc["attention_mask"]
    short = int((att.sum(1) < cfg.prompt_tokens).sum())
    gen = {n: generation_config(engine, new_tokens=n, pad_id=pad_id, eos_id=tok.eos_token_id)
           for n in {cfg.max_new_tokens, 1}}

    def decode(a: torch.Tensor, m: torch.Tensor, new: int) -> torch.Tensor:
        """[b, P + new] sequences on the configured engine (EOS never stops a row)."""
        if engine.name.startswith("graph"):
            params = SamplingParams(max_new_tokens=new, pad_token_id=pad_id, ignore_eos=True)
            return generation.generate(net, a, m, params, engine="graph",
                                       compile=engine.compile, refresh=False).sequences
        return net.generate(input_ids=a, attention_mask=m, generation_config=gen[new])

    def generate(lo: int, hi: int, new: int) -> tuple[int, int]:
        a, m = ids[lo:hi].to(dev), att[lo:hi].to(dev)
        with torch.no_grad():
            out = decode(a, m, new)
        _sync(dev)
        got = out.shape[1] - a.shape[1]
        if got != new:
            raise EptError(f"{model} generated {got} tokens per sequence, expected exactly "
                           f"{new} (min_new_tokens = max_new_tokens)")
        return int(m.sum()), got * a.shape[0]

    return generate, short


def _sweep(generate: Callable[[int, int, int], tuple[int, int]], meter: Any, cfg: EptConfig, *,
           required: float, model: str, engine: str) -> tuple[list[dict[str, Any]], int | None]:
    """(one run per batch size measured, the batch size the sweep stopped at or None): stops
    once output tokens/s grows less than eval.ept.stop_when_saturated."""
    runs: list[dict[str, Any]] = []
    for b in cfg.batch_sizes:
        run = measure_batch_size(generate, meter, cfg, b, required=required, model=model,
                                 engine=engine)
        prev = runs[-1]["figures"]["output_tokens_per_s"] if runs else None
        run["throughput_growth"] = throughput_growth(
            prev["mean"] if prev else None,
            (run["figures"]["output_tokens_per_s"] or {}).get("mean"))
        runs.append(run)
        _log_run(run)
        g = run["throughput_growth"]
        if cfg.stop_when_saturated is not None and g is not None \
                and g < cfg.stop_when_saturated:
            log.info("ept: output tokens/s grew %.1f %% from the previous batch size "
                     "(< eval.ept.stop_when_saturated %.3g): sweep stops at batch %d",
                     100 * g, cfg.stop_when_saturated, b)
            return runs, b
    return runs, None


def _measurement(cfg: EptConfig, meter: Any, device_type: str, required: float) -> dict[str, Any]:
    """How the windows were metered (ept.json `measurement`)."""
    return {
        "label": _label(device_type, meter),
        "required_window_s": required,
        "window_rule": ("one pass over the prompts" if required == 0 else
                        f"whole batches until >= {required:.3g} s"),
        "min_window_s": cfg.min_window_s,
        "target_rel_uncertainty": cfg.target_rel_uncertainty,
        "counter_period_s": getattr(meter, "counter_period_s", None),
        "repeats": cfg.repeats,
        "prefill_split": cfg.measure_prefill,
    }


def measure_batch_size(generate: Any, meter: Any, cfg: EptConfig, b: int, *,
                       required: float, model: str, engine: str,
                       clock: Any = time.perf_counter) -> dict[str, Any]:
    """Warm-up, then `repeats` x (request window, prefill window) at batch size b.
    `generate(lo, hi, new_tokens) -> (input, output tokens)` runs prompts lo..hi."""
    n_batches = cfg.num_prompts // b
    spans = [(i * b, (i + 1) * b) for i in range(n_batches)]
    n_new = cfg.max_new_tokens
    split = cfg.measure_prefill
    t0 = clock()
    for k in range(cfg.warmup_batches):  # not metered: compilation, graph capture, caches
        generate(*spans[k % n_batches], n_new)
    if split and cfg.warmup_batches:
        generate(*spans[0], 1)
    warmup_s = clock() - t0
    min_batches = n_batches if required == 0 else 1
    meta = {"model": model, "engine": engine, "max_new_tokens": n_new,
            "prompt_tokens": cfg.prompt_tokens}
    requests: list[Window] = []
    prefills: list[Window] = []
    times: list[float] = []
    notes: list[str] = []
    cursor = {"request": 0, "prefill": 0}
    for r in range(cfg.repeats):
        for kind in (("request", "prefill") if split else ("request",)):
            new = n_new if kind == "request" else 1
            win, ts, ns = measure_point(
                lambda k, new=new: generate(*spans[k], new), meter, kind=kind,
                batch_size=b, n_batches=n_batches, repeat=r, required_s=required,
                min_batches=min_batches, start=cursor[kind], clock=clock, **meta)
            cursor[kind] += win.batches
            (requests if kind == "request" else prefills).append(win)
            notes += ns
            if kind == "request":
                times += ts
    idle = getattr(meter, "idle_power_w", None)
    figures = point_figures(requests, prefills, batch_size=b, new_tokens=n_new,
                            idle_power_w=idle if isinstance(idle, dict) else None)
    tin = sum(w.input_tokens for w in requests)
    tout = sum(w.output_tokens for w in requests)
    duration = sum(w.duration_s for w in requests)
    batches_run = sum(w.batches for w in requests)
    legacy = {**_merge(requests),
              "idle_power_w": idle if isinstance(idle, dict) else {}}
    return {
        "batch_size": b,
        "batches": n_batches,
        "prompts": n_batches * b,
        "passes": batches_run / n_batches,
        "batches_run": batches_run,
        "warmup_batches": cfg.warmup_batches,
        "warmup_s": round(warmup_s, 3),
        "duration_s": duration,
        "input_tokens": tin,
        "output_tokens": tout,
        "total_tokens": tin + tout,
        "tokens_per_s": (tin + tout) / duration if duration > 0 else None,
        "output_tokens_per_s": tout / duration if duration > 0 else None,
        "latency": _latency(times, n_new),
        "figures": figures,
        "energy": ept_from_record(legacy, input_tokens=tin, output_tokens=tout),
        "windows": [w.as_dict() for w in requests + prefills],
        "estimated": any(e["estimated"] for e in figures["energy"].values()),
        "flags": _unique([f for w in requests + prefills for f in w.flags]),
        "notes": _unique(notes),
        "phase_seq": [w.seq for w in requests],
    }


def _log_run(run: dict[str, Any]) -> None:
    f = run["figures"]
    step = (f.get("ms_per_step") or {}).get("mean")
    parts = []
    for c, e in f["energy"].items():
        out = (e.get("j_per_output_token") or {}).get("mean")
        if out is not None:
            parts.append(f"{c} {out:.4g} J/output token"
                         f"{' (estimated)' if e['estimated'] else ''}")
    log.info("ept batch %d: %.3g ms per decoding step, %.1f output tokens/s over %d batches "
             "(%.3g s); %s", run["batch_size"], step or 0, run["output_tokens_per_s"] or 0,
             run["batches_run"], run["duration_s"], ", ".join(parts) or "no energy source")


def ept_for(result: dict[str, Any], batch_size: int, *, component: str = "gpu",
            key: str = "ept_total_j") -> float | None:
    """One figure from an ept.json result (e.g. EPT_total on GPU at batch 8), None if absent.
    wattkd.ept/2 figures (`j_per_output_token`, `ms_per_step`, ...) give their mean."""
    for run in result.get("runs", []):
        if run["batch_size"] == batch_size:
            if key in (run.get("energy", {}).get(component) or {}):
                return run["energy"][component][key]
            return figure(run, key, component)
    known = [r["batch_size"] for r in result.get("runs", [])]
    raise KeyError(f"no EPT run at batch size {batch_size}; measured: {known}")


def _versions() -> dict[str, str]:
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "wattkd": getattr(wattkd, "__version__", "unknown")}
