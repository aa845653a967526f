"""Decoding step time of wattkd's graph engine against HF's engines, with its bandwidth floor.

Gemma-3-270M-shaped teacher (benchmarks/pair.py, 18 layers) and 6-layer student, random init,
bf16 (speed does not depend on weight values; EOS is ignored so every row decodes exactly the
same number of tokens). For each engine and batch: the median wall time of `generate` with
`--new-tokens` + 1 and with 1 new token (prompt `--prompt-tokens`), over `--reps` runs after a
warm-up; ms per decoding step = (t_long - t_short) / new_tokens (prefill cancels). Engines:
`graph` (wattkd.generation, the CUDA default of `wattkd ept`: wattkd's own fused decode forward,
compiled by plain inductor, captured as CUDA graphs, with its default step kernels),
`graph-triton` (every Triton step kernel that serves: attention, and the GEMV up to batch 16),
`graph-torch` / `graph-attn` / `graph-gemv` (the same forward with none / only the attention /
only the GEMV kernel), `graph-tuned` (the same with
coordinate-descent tuning), `graph-hf` (the graph engine around HF's own forward over HF's StaticCache,
plain inductor: the previous `graph`), `graph-autotune` (max-autotune), `hf-static` (HF generate, static cache, torch.compile
reduce-overhead) and `hf-dynamic` (HF eager). Each row names the decode forward it ran
(`forward`) and, for wattkd's, `refresh_ms`: the in-place weight refresh done once per
`generate` call (a copy of the weights; cancels in t_long - t_short).
Floor: bytes a step must read (weights + the KV cache filled so far, bf16) / the copy
bandwidth measured on this card in the same run. Greedy agreement: graph vs the eager loop on
the first batch (bf16: compiled kernels may round differently, so a fraction is reported).

    python3 benchmarks/decode_engine.py --out OUT [--batches 1,8,32,128,256]
        [--engines graph,graph-tuned,graph-hf,hf-static,hf-dynamic] [--models teacher,student]
        [--tiny]
        [--profile]

Writes OUT/decode_engine.json (card, date, versions, command, rows) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ept_engine import TINY, _card, _versions
from pair import GEMMA_270M

from wattkd.config import EptConfig
from wattkd.eval.engine import generation_config, resolve_engine
from wattkd.generation import SamplingParams, generate
from wattkd.generation.rollout import decoder_for


def build(layers: int, tiny: bool, device: str) -> torch.nn.Module:
    kw = {k: v for k, v in GEMMA_270M.items() if k != "model_type"}
    kw["num_hidden_layers"] = layers
    if tiny:
        kw.update(TINY)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(GEMMA_270M["model_type"], **kw)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# engine -> (compile, forward). graph: the default (wattkd's forward with its default step
# kernels, plain inductor); graph-triton: every Triton step kernel that serves; graph-torch /
# graph-attn / graph-gemv: no / only the attention / only the GEMV Triton kernel; graph-tuned: the same forward, coordinate-descent tuning; graph-hf: HF's
# forward, plain inductor (the engine before wattkd's forward); graph-autotune: max-autotune
GRAPH_MODES = {"graph": (True, "auto"), "graph-triton": (True, "wattkd-triton"),
               "graph-torch": (True, "wattkd-torch"),
               "graph-attn": (True, "wattkd-attention"), "graph-gemv": (True, "wattkd-gemv"),
               "graph-tuned": ("coordinate-descent", "auto"),
               "graph-hf": ("default", "hf"),
               "graph-autotune": ("max-autotune-no-cudagraphs", "auto")}
TOP_KERNELS = 12


def runner(engine: str, net: torch.nn.Module, device: str) -> Any:
    """decode(ids, mask, new) for one engine."""
    if engine in GRAPH_MODES:
        compile, forward = GRAPH_MODES[engine]

        def decode(ids, mask, new):
            return generate(net, ids, mask, SamplingParams(max_new_tokens=new, ignore_eos=True),
                            engine="graph" if device == "cuda" else "eager",
                            compile=compile, forward=forward).sequences
        return decode
    kind = "static" if engine == "hf-static" else "dynamic"
    eng = resolve_engine(EptConfig(engine=kind), device)

    def hf(ids, mask, new):
        g = generation_config(eng, new_tokens=new, pad_id=0, eos_id=None)
        return net.generate(input_ids=ids, attention_mask=mask, generation_config=g)
    return hf


def timed(fn: Any, *args: Any) -> float:
    sync()
    t = time.perf_counter()
    fn(*args)
    sync()
    return time.perf_counter() - t


def copy_bandwidth(device: str) -> float | None:
    """Bytes/s of a 1 GiB device-to-device copy (read + write counted), median of 10."""
    if device != "cuda":
        return None
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ts = []
    for _ in range(12):
        ts.append(timed(b.copy_, a))
    return 2 * a.numel() / statistics.median(ts[2:])


def step_bytes(net: torch.nn.Module, batch: int, ctx: int) -> int:
    """Weights read once per step + the KV cache attended (bf16/fp32 as the model)."""
    c = net.config
    w = sum(p.numel() * p.element_size() for p in net.parameters())
    kv = (2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * ctx * batch
          * next(net.parameters()).element_size())
    return w + kv


def decoder_facts(net: torch.nn.Module, b: int, prompt: int, new: int,
                  engine: str) -> dict[str, Any]:
    """The decode forward the graph engine ran and, for wattkd's, the median time of its
    in-place weight refresh (CUDA only: on CPU the graph rows run the eager engine)."""
    compile, forward = GRAPH_MODES[engine]
    dec = decoder_for(net, b, prompt, SamplingParams(max_new_tokens=new, ignore_eos=True),
                      compile=compile, forward=forward)
    facts: dict[str, Any] = {"forward": dec.forward}
    if dec.forward == "wattkd":
        facts["kernels"] = list(dec.fwd.kernels)
        facts["refresh_ms"] = statistics.median(timed(dec.fwd.refresh) for _ in range(7)) * 1e3
        facts["refresh_bytes"] = 2 * dec.fwd.w.weight_bytes()   # read + write
    return facts


def profile_replay(net: torch.nn.Module, b: int, prompt: int, new: int,
                   engine: str) -> dict[str, Any]:
    """Kernels launched and GPU-busy time per decoding step, from one profiled replay of the
    captured graph (busy << step time: gaps between kernels, i.e. launch latency, dominate),
    and the top kernels by total time (name, launches and us per step)."""
    from torch.profiler import ProfilerActivity, profile

    compile, forward = GRAPH_MODES[engine]
    dec = decoder_for(net, b, prompt, SamplingParams(max_new_tokens=new, ignore_eos=True),
                      compile=compile, forward=forward)
    if dec.graph is None:
        return {}
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.graph.replay()
        sync()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy_us = sum(e.device_time for e in kernels)
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        count_us = by_name.setdefault(e.name, [0, 0.0])
        count_us[0] += 1
        count_us[1] += e.device_time
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:TOP_KERNELS]
    return {"kernels_per_step": len(kernels) / dec.steps,
            "gpu_busy_ms_per_step": busy_us / dec.steps / 1e3,
            "top_kernels": [{"name": name[:160], "per_step": n / dec.steps,
                             "us_per_step": us / dec.steps} for name, (n, us) in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batches", default="1,8,32,128,256")
    ap.add_argument("--engines", default="graph,graph-hf,hf-static,hf-dynamic")
    ap.add_argument("--models", default="teacher,student")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dynamic-max-batch", type=int, default=32,
                    help="hf-dynamic only up to this batch (it is ~20 ms/step)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="graph engines: kernels and GPU-busy time per step (profiler)")
    ap.add_argument("--deadline", type=float, default=None)
    a = ap.parse_args()
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a.out.mkdir(parents=True, exist_ok=True)
    bw = copy_bandwidth(device)
    rec: dict[str, Any] = {"benchmark": "decode_engine", "card": _card(),
                           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "versions": _versions(), "command": "python3 " + shlex.join(sys.argv),
                           "copy_bandwidth_bytes_per_s": bw, "rows": [], "skipped": [], "errors": []}
    batches = [int(x) for x in a.batches.split(",")]
    layers = {"teacher": GEMMA_270M["num_hidden_layers"], "student": 6}
    for model in a.models.split(","):
        net = build(layers[model], a.tiny, device)
        for engine in a.engines.split(","):
            decode = runner(engine, net, device)
            for b in batches:
                if engine == "hf-dynamic" and b > a.dynamic_max_batch:
                    continue
                if a.deadline and time.perf_counter() - t0 > a.deadline:
                    rec["skipped"].append(f"{model}/{engine}/{b}")
                    continue
                try:
                    row = measure(a, net, engine, decode, b, batches[0], bw, device)
                except Exception as exc:  # noqa: BLE001 - a failed row is recorded, the rest run
                    rec["errors"].append(f"{model}/{engine}/{b}: {type(exc).__name__}: {exc}")
                    print(rec["errors"][-1], flush=True)
                    continue
                row["model"] = model
                rec["rows"].append(row)
                print(f"{model:8s} {engine:14s} b={b:4d} {row['ms_per_step']:8.3f} ms/step "
                      f"floor {row['floor_ms']} first {row['first_call_s']:.1f}s", flush=True)
                (a.out / "decode_engine.json").write_text(json.dumps(rec, indent=1) + "\n")
        del net
        torch.cuda.empty_cache() if device == "cuda" else None
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    (a.out / "decode_engine.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(table(rec))


def measure(a: argparse.Namespace, net: torch.nn.Module, engine: str, decode: Any, b: int,
            first_batch: int, bw: float | None, device: str) -> dict[str, Any]:
    """One row: ms per step (and the engine's facts, profile, greedy agreement)."""
    g = torch.Generator().manual_seed(b)
    vocab = net.config.vocab_size
    ids = torch.randint(3, vocab, (b, a.prompt_tokens), generator=g).to(device)
    mask = torch.ones_like(ids)
    first = timed(decode, ids, mask, a.new_tokens + 1) + timed(decode, ids, mask, 1)
    long = [timed(decode, ids, mask, a.new_tokens + 1) for _ in range(a.reps)]
    short = [timed(decode, ids, mask, 1) for _ in range(a.reps)]
    ms = (statistics.median(long) - statistics.median(short)) / a.new_tokens * 1e3
    ctx = a.prompt_tokens + a.new_tokens // 2
    floor = step_bytes(net, b, ctx) / bw * 1e3 if bw else None
    row = {"engine": engine, "batch": b, "ms_per_step": ms,
           "out_tokens_per_s": b / ms * 1e3, "first_call_s": first,
           "floor_ms": floor, "x_floor": ms / floor if floor else None,
           "long_s": long, "short_s": short}
    if engine in GRAPH_MODES and device == "cuda":
        row.update(decoder_facts(net, b, a.prompt_tokens, a.new_tokens, engine))
    if engine in GRAPH_MODES and device == "cuda" and a.profile:
        row.update(profile_replay(net, b, a.prompt_tokens, a.new_tokens, engine))
    if engine in GRAPH_MODES and b == first_batch:
        ref = generate(net, ids, mask, SamplingParams(max_new_tokens=a.new_tokens,
                                                       ignore_eos=True),
                       engine="eager").sequences
        got = decode(ids, mask, a.new_tokens)
        row["greedy_match_vs_eager"] = float((got == ref).float().mean())
    return row


def table(rec: dict[str, Any]) -> str:
    head = ("| model | engine | forward | batch | ms/step | out tok/s | floor ms | x floor "
            "| first call s | kernels/step | GPU busy ms/step | refresh ms |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        fl = "—" if r["floor_ms"] is None else f"{r['floor_ms']:.3f}"
        xf = "—" if r["x_floor"] is None else f"{r['x_floor']:.1f}"
        refresh = r.get("refresh_ms")
        lines.append(f"| {r['model']} | {r['engine']} | {r.get('forward', '—')} | {r['batch']} "
                     f"| {r['ms_per_step']:.3f} | {r['out_tokens_per_s']:.0f} | {fl} | {xf} "
                     f"| {r['first_call_s']:.1f} | {r.get('kernels_per_step', '—')} "
                     f"| {r.get('gpu_busy_ms_per_step', '—')} "
                     f"| {'—' if refresh is None else f'{refresh:.3f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
