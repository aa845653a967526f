"""Inference energy-per-token (EPT) benchmark.

Fixed workload: `num_prompts` prompts of exactly `prompt_tokens` tokens (from a file, one a
line, or the bundled corpus), greedy decoding of exactly `max_new_tokens` tokens (EOS
suppressed until then, so every model does the same amount of work), for each batch size
in `batch_sizes`. Each batch size runs `warmup_batches` unmetered batches, then one metered
phase window `ept` over all its batches.

Definitions (DESIGN.md), per energy component (gpu, cpu, dram), E = the window's energy:
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from wattkd.config import EptConfig
from wattkd.errors import InputError
from wattkd.eval.protocol import PROTOCOL_FORMAT, protocol_hash, sha256_text, write_json_atomic

log = logging.getLogger(__name__)

EPT_SCHEMA = "wattkd.ept/1"
COMPONENTS = ("gpu", "cpu", "dram")
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
    for comp in COMPONENTS:
        source = (record.get("source") or {}).get(comp, "unavailable")
        energy = (record.get("energy_j") or {}).get(comp)
        if comp == "dram" and energy is None and source == "unavailable":
            continue  # gpu and cpu always appear (null when unavailable); dram only if read
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
    from wattkd.corpus import documents, fingerprint

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


def ept_protocol(cfg: EptConfig, texts: list[str], source: str, *, dtype: str,
                 device_name: str) -> dict[str, Any]:
    """What decides an EPT figure: workload, decoding, precision and the kind of device."""
    return {
        "format": PROTOCOL_FORMAT,
        "kind": "ept",
        "prompt_source": source,
        "prompts_sha256": sha256_text("\n\x00".join(texts)),
        "num_prompts": cfg.num_prompts,
        "prompt_tokens": cfg.prompt_tokens,
        "max_new_tokens": cfg.max_new_tokens,
        "min_new_tokens": cfg.max_new_tokens,
        "decoding": "greedy",
        "batch_sizes": list(cfg.batch_sizes),
        "warmup_batches": cfg.warmup_batches,
        "dtype": dtype,
        "device_name": device_name,
    }


# ------------------------------------------------------------------------------ running
def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def _device_name(device: Any) -> str:
    import torch

    if getattr(device, "type", "") == "cuda":
        return torch.cuda.get_device_name(device)
    return str(getattr(device, "type", device))


def _meter_or_null(meter: Any) -> tuple[Any, bool]:
    """The meter to use and whether this call must start/stop it (idle power is measured at
    start, before any window)."""
    if meter is None:
        from wattkd.energy.ledger import NullMeter

        return NullMeter(reason="no-meter"), False
    return meter, not getattr(meter, "started", True)


def _min_window(meter: Any, override: float | None) -> float:
    """Seconds each metered window must last: the meter's `telemetry.min_window_s` when it
    reads a GPU energy counter (whose ~100 ms quantisation swamps short windows), else 0."""
    if override is not None:
        return max(0.0, float(override))
    sources = getattr(meter, "sources", None)
    if isinstance(sources, dict) and sources.get("gpu") == "nvml-counter":
        return float(getattr(getattr(meter, "cfg", None), "min_window_s", 0.0) or 0.0)
    return 0.0


def run_ept(model: str, cfg: EptConfig, meter: Any, out_path: Path, *, device: str = "auto",
            adapter: str | None = None, min_window_s: float | None = None) -> dict[str, Any]:
    """Benchmark inference energy per token of an HF model folder; write ept.json.

    `meter` is an EnergyMeter (started or not; an unstarted one is started here and stopped
    at the end, which measures idle power first) or NullMeter/None (no energy: timings only).
    Each batch size repeats whole passes over the prompts until its window lasts
    `min_window_s` (default: see `_min_window`), so short windows do not dominate the error.
    `out_path` is the JSON file, or a run directory (then <run>/ept.json).
    """
    import torch
    from transformers import GenerationConfig

    from wattkd.eval.harness import load_model

    _check(cfg)
    texts, source = load_prompts(cfg)
    net, tok = load_model(model, adapter=adapter, device=device)
    dev = next(net.parameters()).device
    dtype = str(next(net.parameters()).dtype).removeprefix("torch.")
    protocol = ept_protocol(cfg, texts, source, dtype=dtype, device_name=_device_name(dev))

    tok.padding_side = "left"
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_id is None:
        raise EptError(f"tokenizer of {model} has neither a pad nor an eos token")
    enc = tok(texts, truncation=True, max_length=cfg.prompt_tokens, padding="max_length",
              return_tensors="pt")
    ids, att = enc["input_ids"], enc["attention_mask"]
    short = int((att.sum(1) < cfg.prompt_tokens).sum())
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=cfg.max_new_tokens,
                               min_new_tokens=cfg.max_new_tokens, pad_token_id=pad_id,
                               eos_token_id=tok.eos_token_id, num_beams=1)

    def generate(lo: int, hi: int) -> tuple[int, int, float]:
        a, m = ids[lo:hi].to(dev), att[lo:hi].to(dev)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = net.generate(input_ids=a, attention_mask=m, generation_config=gen_cfg)
        _sync(dev)
        dt = time.perf_counter() - t0
        new = out.shape[1] - a.shape[1]
        if new != cfg.max_new_tokens:
            raise EptError(f"{model} generated {new} tokens per sequence, expected exactly "
                           f"{cfg.max_new_tokens} (min_new_tokens = max_new_tokens)")
        return int(m.sum()), new * a.shape[0], dt

    meter, own = _meter_or_null(meter)
    if own:
        meter.start()
    min_window = _min_window(meter, min_window_s)
    runs = []
    t_all = time.perf_counter()
    try:
        for b in cfg.batch_sizes:
            n_batches = cfg.num_prompts // b
            spans = [(i * b, (i + 1) * b) for i in range(n_batches)]
            for k in range(cfg.warmup_batches):  # not metered
                generate(*spans[k % n_batches])
            times: list[float] = []
            tin = tout = passes = 0
            t0 = time.perf_counter()
            with meter.phase("ept", tokens=0, batch_size=b, model=model,
                             max_new_tokens=cfg.max_new_tokens,
                             prompt_tokens=cfg.prompt_tokens) as w:
                while passes == 0 or time.perf_counter() - t0 < min_window:
                    for lo, hi in spans:
                        n_in, n_out, dt = generate(lo, hi)
                        tin, tout = tin + n_in, tout + n_out
                        times.append(dt)
                        w.add_tokens(n_in + n_out)
                    passes += 1
            wall = time.perf_counter() - t0
            rec = w.record or {}
            duration = float(rec.get("duration_s") or wall)
            run = {
                "batch_size": b,
                "batches": n_batches,
                "prompts": n_batches * b,
                "passes": passes,
                "warmup_batches": cfg.warmup_batches,
                "duration_s": duration,
                "input_tokens": tin,
                "output_tokens": tout,
                "total_tokens": tin + tout,
                "tokens_per_s": (tin + tout) / duration if duration > 0 else None,
                "output_tokens_per_s": tout / duration if duration > 0 else None,
                "latency": _latency(times, cfg.max_new_tokens),
                "energy": ept_from_record({**rec, "duration_s": duration},
                                          input_tokens=tin, output_tokens=tout),
                "estimated": bool(rec.get("estimated", False)),
                "flags": list(rec.get("flags", [])),
                "notes": list(rec.get("notes", [])),
                "phase_seq": rec.get("seq"),
            }
            runs.append(run)
            shown = ", ".join(
                f"{c} {e['ept_total_j']:.4g} J/token{' (estimated)' if e['estimated'] else ''}"
                for c, e in run["energy"].items() if e["ept_total_j"] is not None)
            log.info("ept batch %d: %d tokens in %.3g s (%.1f tokens/s); EPT_total: %s", b,
                     tin + tout, duration, run["tokens_per_s"] or 0, shown or "no energy source")
    finally:
        if own:
            meter.stop()

    idle = getattr(meter, "idle_power_w", None)
    result = {
        "schema": EPT_SCHEMA,
        "model": {"id": model, "adapter": adapter, "dtype": dtype, "device": str(dev),
                  "parameters": sum(p.numel() for p in net.parameters())},
        "protocol": protocol,
        "protocol_hash": protocol_hash(protocol),
        "idle_power_w": idle if isinstance(idle, dict) else None,
        "short_prompts": short,
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


def ept_for(result: dict[str, Any], batch_size: int, *, component: str = "gpu",
            key: str = "ept_total_j") -> float | None:
    """One figure from an ept.json result (e.g. EPT_total on GPU at batch 8), None if absent."""
    for run in result.get("runs", []):
        if run["batch_size"] == batch_size:
            return (run["energy"].get(component) or {}).get(key)
    known = [r["batch_size"] for r in result.get("runs", [])]
    raise KeyError(f"no EPT run at batch size {batch_size}; measured: {known}")


def _versions() -> dict[str, str]:
    import torch
    import transformers

    import wattkd

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "wattkd": getattr(wattkd, "__version__", "unknown")}
