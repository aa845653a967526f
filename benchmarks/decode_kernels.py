"""The decode step's Triton kernels (wattkd/generation/kernels.py) on the Gemma-3-270M shapes at
batch 1: each kernel alone per tile setting against what it replaces, then the whole step.

1. GEMV per projection (q|k|v with its input norm, o, gate|up with its norm and GeGLU, down):
   each tile setting (BLOCK_N, BLOCK_K, warps) timed inside one CUDA graph of `--launches`
   launches cycling over `--copies` weight copies (more bytes than L2 holds, so weights come
   from memory as in a real step), against cuBLAS `F.linear` timed the same way (the torch
   path's GEMM; its norm / activation kernels come on top and are not counted here).
2. Attention over a `--context`-slot cache (1 KV head, 4 query heads, head_dim 256) per
   (SPLIT, BLOCK_L, warps), against the torch path's two matmuls + softmax, same timing.
3. The decode step end to end (benchmarks/decode_engine.py's measurement: (t_long - t_short) /
   new tokens, profiled kernels) with the fastest tiles of 1 and 2 set: every kernel
   (`graph-triton`), attention only, GEMV only, the torch ops, at batch 1; every kernel,
   attention only and the torch ops at batch 8 (STEP_ROWS, in that order until the deadline).

    python3 benchmarks/decode_kernels.py --out OUT [--deadline 200]

Writes OUT/decode_kernels.json (card, date, versions, command, every timing, the tiles
picked, the step rows) and prints the tables. CUDA only.
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_engine
from ept_engine import _card, _versions

from wattkd.generation import kernels

BF16 = torch.bfloat16
# name -> (output rows N, K, norm code, activation code): Gemma 3 270M, hidden 640, 4 query
# heads + 1 KV head of 256, intermediate 2048
SHAPES = {"qkv": (1536, 640, kernels.NORMS["gemma"], 0), "o": (640, 1024, 0, 0),
          "gate_up": (2048, 640, kernels.NORMS["gemma"], kernels.ACTS["gelu_pytorch_tanh"]),
          "down": (640, 2048, 0, 0)}
# batch 1 takes the kernel's one-row path (no tl.dot): few output rows a program, many programs
# ((2, 256, 1) the fastest on an H100 of those swept first: RESULTS.md)
GEMV_TILES = [(2, 256, 1), (1, 256, 1), (2, 128, 1), (2, 512, 1), (1, 512, 1), (4, 128, 1),
              (2, 256, 2), (4, 256, 1)]
ATTENTION_TILES = [(32, 32, 4), (16, 16, 4), (32, 32, 2), (32, 16, 4), (64, 32, 4),
                   (16, 16, 2)]
# (engine, batch): every kernel, attention only, GEMV only, none; at batch 8 the GEMV's
# several-row path (tl.dot) against cuBLAS
STEP_ROWS = (("graph-triton", 1), ("graph-attn", 1), ("graph-gemv", 1), ("graph-torch", 1),
             ("graph-triton", 8), ("graph-attn", 8), ("graph-torch", 8))


def us_per_launch(fn: Any, launches: int) -> float:
    """Median over 5 replays of a CUDA graph holding `launches` calls of fn, per call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()                                   # compiles / warms up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) / launches * 1e6


class Cycle:
    """Index of the next copy, so consecutive launches read different weights."""

    def __init__(self, n: int) -> None:
        self.n, self.i = n, 0

    def __call__(self) -> int:
        self.i = (self.i + 1) % self.n
        return self.i


def gemv_row(a: argparse.Namespace, n: int, k: int, norm: int, act: int, t0: float
             ) -> dict[str, Any]:
    """One projection: cuBLAS and every GEMV tile setting (the first always, the rest until
    `deadline` x 0.3), the fastest picked."""
    ws = [torch.randn(n * (2 if act else 1), k, device="cuda", dtype=BF16) * 0.02
          for _ in range(a.copies)]
    x = torch.randn(1, k, device="cuda", dtype=BF16)
    nw = torch.ones(k, device="cuda") if norm else None
    nxt = Cycle(a.copies)
    row: dict[str, Any] = {"cublas_us": us_per_launch(lambda: F.linear(x, ws[nxt()]),
                                                      a.launches), "tiles": {}}
    default = kernels.gemv_blocks
    for tiles in GEMV_TILES:
        if row["tiles"] and time.perf_counter() - t0 > a.deadline * 0.3:
            break
        kernels.gemv_blocks = lambda n_, k_, r_, g_=False, _t=tiles: _t
        key = ",".join(map(str, tiles))
        try:
            row["tiles"][key] = us_per_launch(
                lambda: kernels.decode_gemv(x, ws[nxt()], None, nw, 1e-6, norm, act),
                a.launches)
        except Exception as exc:  # noqa: BLE001 - a tile that does not compile is recorded
            row["tiles"][key] = f"{type(exc).__name__}: {exc}"[:300]
    kernels.gemv_blocks = default
    timed = {t: us for t, us in row["tiles"].items() if isinstance(us, float)}
    if timed:
        row["best"] = min(timed, key=timed.get)
        row["best_us"] = timed[row["best"]]
    return row


def sweep_gemv(a: argparse.Namespace, rec: dict[str, Any], t0: float) -> dict[tuple, tuple]:
    """Every projection's row; returns the fastest tiles by (N, K)."""
    best = {}
    for name, (n, k, norm, act) in SHAPES.items():
        row = rec["gemv"][name] = gemv_row(a, n, k, norm, act, t0)
        if "best" in row:
            best[(n, k)] = tuple(int(v) for v in row["best"].split(","))
        print(f"gemv {name:8s} cuBLAS {row['cublas_us']:6.2f} us | best "
              f"{row.get('best')} {row.get('best_us', float('nan')):6.2f} us", flush=True)
    return best


def sweep_attention(a: argparse.Namespace, rec: dict[str, Any], t0: float
                    ) -> tuple[int, int, int] | None:
    """The torch path's attention ops and every tile setting; returns the fastest tiles."""
    length, d = a.context + 16, 256
    ks = [torch.randn(1, 1, length, d, device="cuda", dtype=BF16) for _ in range(a.copies)]
    vs = [torch.randn(1, 1, length, d, device="cuda", dtype=BF16) for _ in range(a.copies)]
    q = torch.randn(1, 4, d, device="cuda", dtype=BF16)
    qkv = torch.randn(1, 6 * d, device="cuda", dtype=BF16)       # 4 query heads, k, v
    norms = torch.ones(d, device="cuda"), torch.ones(d, device="cuda")
    ang = torch.arange(d, device="cuda") * 0.01
    cos, sin = ang.cos().to(BF16)[None], ang.sin().to(BF16)[None]
    pad = torch.ones(1, length, device="cuda", dtype=torch.long)
    slot = torch.tensor([a.context], device="cuda")
    seen = torch.arange(length, device="cuda") <= a.context
    count = torch.zeros(1, device="cuda", dtype=torch.int32)
    nxt = Cycle(a.copies)

    def torch_ops() -> None:     # the attention alone (its norms, rope, cache writes not counted)
        i = nxt()
        s = (q.view(1, 1, 4, d) @ ks[i].transpose(-1, -2)).float() * 0.0625
        torch.softmax(s.masked_fill(~seen, float("-inf")), -1).to(BF16) @ vs[i]

    row: dict[str, Any] = {"context": a.context, "torch_ops_us": us_per_launch(torch_ops,
                                                                             a.launches),
                           "tiles": {}}
    default = kernels.attention_tiles
    for tiles in ATTENTION_TILES:
        if row["tiles"] and time.perf_counter() - t0 > a.deadline * 0.4:
            break
        kernels.attention_tiles = lambda m, _t=tiles: _t
        try:
            row["tiles"][",".join(map(str, tiles))] = us_per_launch(
                lambda: kernels.decode_attention(qkv, *norms, 1e-6, cos, sin, ks[nxt()],
                                                 vs[nxt.i], pad, slot, count, 0.0625, 0, 0),
                a.launches)
        except Exception as exc:  # noqa: BLE001 - a tile that does not compile is recorded
            row["tiles"][",".join(map(str, tiles))] = f"{type(exc).__name__}: {exc}"[:300]
    kernels.attention_tiles = default
    rec["attention"] = row
    timed = {t: us for t, us in row["tiles"].items() if isinstance(us, float)}
    if not timed:
        return None
    pick = min(timed, key=timed.get)
    row["best"], row["best_us"] = pick, timed[pick]
    print(f"attention ctx {a.context}: torch ops {row['torch_ops_us']:6.2f} us | best {pick} "
          f"{timed[pick]:6.2f} us", flush=True)
    return tuple(int(v) for v in pick.split(","))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--deadline", type=float, default=200.0,
                    help="seconds: no new tile after 0.3 / 0.4 of it, no new step row after "
                         "it (a row then takes ~40-60 s more: the default fits a 6-min call)")
    ap.add_argument("--launches", type=int, default=120)
    ap.add_argument("--copies", type=int, default=48)
    ap.add_argument("--context", type=int, default=176, help="cache slots attended")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_kernels.py needs a CUDA device")
    a.profile = True
    decode_engine.TOP_KERNELS = 40   # the whole kernel list of a step, not only the top 12
    t0 = time.perf_counter()
    a.out.mkdir(parents=True, exist_ok=True)
    rec: dict[str, Any] = {"benchmark": "decode_kernels", "card": _card(),
                           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "versions": _versions(), "command": "python3 " + shlex.join(sys.argv),
                           "gemv": {}, "attention": {}, "rows": [], "errors": []}
    out = a.out / "decode_kernels.json"
    best_gemv = sweep_gemv(a, rec, t0)
    best_attention = sweep_attention(a, rec, t0)
    rec["picked"] = {"gemv": {f"{n},{k}": t for (n, k), t in best_gemv.items()},
                     "attention": best_attention}
    out.write_text(json.dumps(rec, indent=1) + "\n")
    default_gemv = kernels.gemv_blocks
    kernels.gemv_blocks = lambda n, k, r, g=False: ((best_gemv.get((n, k)) if r == 1 else None)
                                                    or default_gemv(n, k, r, g))
    if best_attention is not None:
        kernels.attention_tiles = lambda m: best_attention
    net = decode_engine.build(18, False, "cuda")
    bw = decode_engine.copy_bandwidth("cuda")
    for engine, batch in STEP_ROWS:
        if rec["rows"] and time.perf_counter() - t0 > a.deadline:
            rec["errors"].append(f"{engine} batch {batch}: not run (deadline)")
            continue
        try:
            row = decode_engine.measure(a, net, engine, decode_engine.runner(engine, net, "cuda"),
                                        batch, 1, bw, "cuda")
        except Exception as exc:  # noqa: BLE001 - a failed row is recorded, the rest run
            rec["errors"].append(f"{engine} batch {batch}: {type(exc).__name__}: {exc}"[:500])
            continue
        row["model"] = "teacher"
        rec["rows"].append(row)
        print(f"step {engine:13s} batch {batch:2d} {row['ms_per_step']:.3f} ms "
              f"({row.get('kernels_per_step')} kernels)", flush=True)
        out.write_text(json.dumps(rec, indent=1) + "\n")
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    out.write_text(json.dumps(rec, indent=1) + "\n")
    print(decode_engine.table(rec))


if __name__ == "__main__":
    main()
