"""Self-check of the fused logit loss on this machine: the closed-form fast path (eager and
compiled) against the generic autograd path, on random data of the benchmark's shapes.

    python benchmarks/fused_selfcheck.py [--vocab V] [--hidden H] [--chunk C] [--topk K]
                                         [--reps R] [--backend inductor]

Prints relative errors, per-chunk times (incl. the matmuls) and peak memory. Exit status:
0 ok, 1 mismatch, 2 torch.compile failed (the eager fast path was used; still correct).
Defaults: vocab 262,144 and chunk 1024 on CUDA (compiled with inductor), vocab 4096 and
chunk 64 on CPU (no compiled mode unless --backend is given).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wattkd.distill.fused import loop as fused
from wattkd.distill.fused.inputs import Terms, prepare
from wattkd.distill.losses import IGNORE_INDEX, TopKTeacher
from wattkd.distill.registry import get_loss


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python benchmarks/fused_selfcheck.py")
    ap.add_argument("--vocab", type=int, default=None, help="default 262144 (CUDA), 4096 (CPU)")
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--chunk", type=int, default=None, help="default 1024 (CUDA), 64 (CPU)")
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backend", default=None,
                    help="torch.compile backend of the compiled mode (default: inductor on "
                         "CUDA; on CPU no compiled mode unless given)")
    return ap.parse_args(argv)


def _terms(*items: tuple[str, float, dict]) -> Terms:
    return [(get_loss(name), wt, params) for name, wt, params in items]


def _cases(n: int, hid: int, vocab: int, topk: int, dev: torch.device, g: torch.Generator
           ) -> tuple[Tensor, Tensor, Tensor, Tensor, list[tuple]]:
    """(student hidden, head weight, labels, mask, [(name, teacher, terms, s_softcap)])."""

    def rnd(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dev)

    h = rnd(n, hid).requires_grad_(True)
    w = rnd(vocab, hid, scale=2.0 / math.sqrt(hid)).requires_grad_(True)
    th, tw = rnd(n, hid).bfloat16(), rnd(vocab, hid, scale=3.0 / math.sqrt(hid)).bfloat16()
    labels = torch.randint(0, vocab, (n,), generator=g).to(dev)
    labels[::7] = IGNORE_INDEX
    mask = (torch.rand(n, generator=g) > 0.02).to(dev)
    with torch.no_grad():
        logp = F.linear(th, tw).float().log_softmax(-1)
        lp, ids = logp.topk(topk, dim=-1)
        tail = torch.log1p(-lp.exp().sum(-1).clamp(max=1 - 1e-6))
        top = TopKTeacher(ids.int(), lp.half(), tail.half())
        del logp
    cases = [
        ("dense forward_kl T=1 (benchmark)", fused.TeacherHidden(th, tw),
         _terms(("forward_kl", 1.0, {"temperature": 1.0})), None),
        ("dense fkl T=2 + rkl + ce(ls=0.1), softcaps", fused.TeacherHidden(th, tw, softcap=30.0),
         _terms(("forward_kl", 1.0, {"temperature": 2.0}), ("reverse_kl", 0.5, {}),
                ("ce", 0.3, {"label_smoothing": 0.1})), 30.0),
        (f"top-{topk} forward_kl T=1 + ce", top,
         _terms(("forward_kl", 1.0, {}), ("ce", 0.5, {})), None),
    ]
    return h, w, labels, mask, cases


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _time_modes(plan, h: Tensor, w: Tensor, modes: list, reps: int, chunks: int,
                dev: torch.device) -> dict[str, tuple]:
    """Each mode's `fused._run` output, after a warm-up (compiles); prints its time/chunk."""
    cuda = dev.type == "cuda"
    results = {}
    for mode, fast, backend in modes:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            fused._run(plan, h, w, None, (True, True, False), fast=fast,
                       compile_backend=backend)  # warm-up (compiles)
            _sync(cuda)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(reps):
                out = fused._run(plan, h, w, None, (True, True, False), fast=fast,
                                 compile_backend=backend)
            _sync(cuda)
        ms = (time.perf_counter() - t0) * 1e3 / (reps * chunks)
        peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
        results[mode] = out
        print(f"  {mode:14s} {ms:9.2f} ms/chunk (incl. matmuls)  peak {peak:6.2f} GB")
    return results


def _compare(results: dict[str, tuple]) -> int:
    """0 when every fast mode matches the generic one (rel. error in norm), else 1."""
    status = 0
    ref = results["generic"]
    for mode, got in results.items():
        if mode == "generic":
            continue
        for label, a, b_, tol in (("loss", got[0], ref[0], 1e-4), ("sums", got[1], ref[1], 1e-4),
                                  ("grad_h", got[2], ref[2], 1e-2),
                                  ("grad_w", got[3], ref[3], 1e-2)):
            a, b_ = a.double(), b_.double()
            max_abs = (a - b_).abs().max().item()
            rel = ((a - b_).norm() / b_.norm().clamp(min=1e-300)).item()
            ok = rel <= tol and bool(torch.isfinite(a).all())
            status = status or (0 if ok else 1)
            print(f"  {mode:14s} vs generic {label:7s} max abs {max_abs:.3e}  "
                  f"rel (norm) {rel:.3e}  {'ok' if ok else 'MISMATCH'}")
    return status


def _check_addmm(chunk: int, hid: int, dev: torch.device, g: torch.Generator) -> int:
    """In-place fp32 accumulation of grad_W from bf16 inputs (CUDA's out_dtype path)."""
    a = torch.randn(chunk, 64, generator=g).to(dev).bfloat16()
    b_ = torch.randn(chunk, hid, generator=g).to(dev).bfloat16()
    acc = torch.randn(64, hid, generator=g).to(dev)
    want = acc + a.float().T @ b_.float()
    fused._addmm_f32_(acc, a.T, b_)
    rel = ((acc - want).norm() / want.norm()).item()
    print(f"\naddmm fp32 accumulate: rel err {rel:.2e} (out_dtype path "
          f"{'on' if fused.STATE.addmm_out_dtype_ok else 'off'})")
    return 0 if rel < 1e-5 else 1


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    logging.basicConfig(level=logging.INFO)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    vocab = args.vocab or (262144 if cuda else 4096)
    chunk = args.chunk or (1024 if cuda else 64)
    n, hid = 2 * chunk - 37, args.hidden  # a full chunk and a partial one
    g = torch.Generator(device="cpu").manual_seed(0)
    h, w, labels, mask, cases = _cases(n, hid, vocab, args.topk, dev, g)
    modes = [("generic", False, None), ("fast eager", True, None)]
    backend = args.backend or ("inductor" if cuda else None)
    if backend:
        modes.append(("fast compiled", True, backend))
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__},"
          f" tokens {n}, chunk {chunk}, vocab {vocab}, hidden {hid}")
    status = 0
    for name, teacher, ts, cap in cases:
        plan = prepare(n, vocab, dev, teacher, labels, mask, ts, chunk, cap)
        print(f"\n== {name}")
        results = _time_modes(plan, h, w, modes, args.reps, math.ceil(plan.num_rows / chunk), dev)
        status = status or _compare(results)
    if cuda:
        status = status or _check_addmm(chunk, hid, dev, g)
    if fused.STATE.compile_broken:
        print(f"\ntorch.compile FAILED (eager fast path used): {fused.STATE.compile_broken[:2000]}")
        status = status or 2
    print("\nselfcheck", "OK" if status == 0 else f"FAILED (exit {status})")
    return status


if __name__ == "__main__":
    sys.exit(main())
