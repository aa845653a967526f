"""Logit losses fused with the LM head, in chunks of tokens: memory flat in vocab and tokens.

With a 128k-262k vocabulary the [tokens x vocab] fp32 logits of one micro-batch (and their
softmaxes and gradients) dwarf the model's activations. `fused_logit_loss` never holds more
than one chunk of them: for each chunk of `chunk_tokens` tokens it computes the student (and
teacher) logits, evaluates every registered logit term on a detached logits leaf, takes
d(loss)/d(logits) right there, and folds it into grad_hidden (the chunk's rows) and grad_W
(+= dlogits^T @ hidden, fp32). Backward then only scales those stored gradients: the "fused
linear cross-entropy" trick of Liger-Kernel, generalised to any weighted sum of registered
logit terms. Only masked-in tokens are computed at all (rows are compacted first), so prompt
or padding tokens cost nothing and can never inject NaN.

Loss = sum_i weight_i * (sum of term_i over counted tokens) / (number of counted tokens), where
counted = mask != 0, and for label terms (ce) additionally label != -100.

Layout: this module (fused/loop.py) is the chunk loop and its dispatch (Triton kernel, compiled or eager closed
form, generic autograd) and holds the run-time state; inputs.py validates the inputs into
a Plan; fast.py evaluates a chunk from the closed forms registered with the losses;
triton_backend.py is the Triton glue; path.py records which path ran.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wattkd.distill.fused import path as fused_path
from wattkd.distill.fused.fast import FastCfg, body_for, fast_cfg
from wattkd.distill.fused.inputs import (
    Plan,
    TeacherHidden,
    TeacherSource,
    Terms,
    head_params,
    prepare,
)
from wattkd.distill.fused.triton_backend import triton_chunk, triton_spec
from wattkd.distill.losses import DenseTeacher, LogitChunk, TopKTeacher, upcast

__all__ = ["fused_logit_loss"]

log = logging.getLogger(__name__)

_MIN_COMPILED_ROWS = 16   # smaller (last) chunks run eagerly: no 0/1-size specialisation


@dataclass
class RuntimeState:
    """What the fused loss learns about this process's torch as it runs, in one place: whether
    CUDA matmuls can write fp32 out directly, the compiled chunk functions, and the first
    compiler failure (after which nothing is compiled: the eager path is still right)."""

    mm_out_dtype_ok: bool = True
    addmm_out_dtype_ok: bool = True
    compiled: dict[tuple[FastCfg, Any], Any] = field(default_factory=dict)
    compile_broken: str = ""


STATE = RuntimeState()


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 result; low-precision inputs keep their fast matmul where torch can
    write fp32 out directly (CUDA `out_dtype`), else the product is rounded then upcast."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and STATE.mm_out_dtype_ok:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            STATE.mm_out_dtype_ok = False
    return (a @ b).float()


def _addmm_f32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32) += a @ b in place. On CUDA with bf16/fp16 inputs cuBLAS accumulates straight
    into acc (beta = 1): no [V x H] fp32 temporary per chunk (671 MB at Gemma-3's vocab)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda and STATE.addmm_out_dtype_ok:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError):
            STATE.addmm_out_dtype_ok = False
    acc += _mm_f32(a, b)


def _generic_chunk(plan: Plan, z: Tensor, teacher_c: Any, labels_c: Tensor, track: bool
                   ) -> tuple[Tensor, Tensor | None]:
    """Any registered logit terms, by autograd on a detached fp32 logits leaf.
    Returns (per-term sums [terms] fp32, d(chunk loss)/d(z) fp32 or None)."""
    z = upcast(z)
    z.requires_grad_(track)
    with torch.set_grad_enabled(track):
        zz = torch.tanh(z / plan.softcap) * plan.softcap if plan.softcap else z
        logits = LogitChunk(zz)
        chunk_loss = torch.zeros((), dtype=torch.float32, device=z.device)
        sums = []
        for i, (spec, _, params) in enumerate(plan.terms):
            s = spec.fn(logits, teacher_c, labels_c, **params).sum()
            sums.append(s.detach())
            chunk_loss = chunk_loss + plan.coef[i] * s
    dz = torch.autograd.grad(chunk_loss, z)[0] if track else None
    return torch.stack(sums).float(), dz


def _compile_wanted(device: torch.device) -> bool:
    return (device.type == "cuda" and not STATE.compile_broken
            and os.environ.get("WATTKD_COMPILE", "1") == "1")


def _auto_path(device: torch.device) -> tuple[bool, str | None]:
    """(use the fast path, compile backend) when nothing is forced. On an H200 the compiled
    fast path ran 2.4x the generic autograd path (127k vs 65k tokens/s) but the *eager* fast
    path only 0.8x (52k: many unfused fp32 passes), so CUDA without the compiler takes the
    generic path. CPU (CI, laptops): eager fast path, validated against the generic one.
    `fused_path` forces compiled (inductor, any device) or generic."""
    forced = fused_path.requested()
    if forced == "generic":
        return False, None
    if forced == "compiled" and not STATE.compile_broken:
        return True, "inductor"
    if device.type != "cuda":
        return True, None
    if _compile_wanted(device):
        return True, "inductor"
    return False, None


def _compiled(cfg: FastCfg, backend: str = "inductor"):
    key = (cfg, backend)
    if key not in STATE.compiled:
        # One graph for every chunk length: the row dim is marked dynamic at each call.
        STATE.compiled[key] = torch.compile(body_for(cfg), backend=backend, fullgraph=True)
    return STATE.compiled[key]


def _fast_chunk(cfg: FastCfg, args: tuple, compile_backend: str | None
                ) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """Run one fast chunk, compiled when asked (falling back to eager, once, on failure)."""
    rows = args[0].shape[0]
    if compile_backend is not None and rows >= _MIN_COMPILED_ROWS and not STATE.compile_broken:
        try:
            for a in args:
                if isinstance(a, Tensor) and a.dim() >= 1 and a.shape[0] == rows:
                    torch._dynamo.maybe_mark_dynamic(a, 0)
            out = _compiled(cfg, compile_backend)(*args)
            return out if cfg.teacher == "topk" else (*out, None)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any compiler failure: eager is still right
            STATE.compile_broken = f"{type(exc).__name__}: {exc}"
            log.warning("torch.compile of the fused logit loss failed; not compiling from now "
                        "on (uncompiled path; WATTKD_COMPILE=0 skips compiling): %s",
                        STATE.compile_broken[:2000])
    out = body_for(cfg)(*args)
    return out if cfg.teacher == "topk" else (*out, None)


def _run(plan: Plan, h: Tensor, w: Tensor, b: Tensor | None, need: tuple[bool, bool, bool],
         *, fast: bool = True, compile_backend: str | None = "auto"
         ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Loop over chunks: (loss, per-term sums, grad_h, grad_w, grad_b).

    `fast`/`compile_backend` are for tests and the self-check ("auto": `_auto_path`, i.e.
    compiled on CUDA unless WATTKD_COMPILE=0, eager on CPU; None: eager). Nothing in the
    loop syncs with the host."""
    need_h, need_w, need_b = need
    track = need_h or need_w or need_b
    dev = h.device
    # Matmul dtype: the autocast dtype when autocast is on (as nn.Linear would use), else the
    # hidden's. Autocast is switched off inside so every cast below is explicit.
    if torch.is_autocast_enabled(dev.type):
        mm = torch.get_autocast_dtype(dev.type)
    else:
        mm = h.dtype
    w_mm = w.detach().to(mm)
    b_mm = None if b is None else b.detach().to(mm)
    gh = torch.zeros_like(h) if need_h else None
    gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
    gb = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b else None
    sums = torch.zeros(len(plan.terms), dtype=torch.float32, device=dev)
    total = torch.zeros((), dtype=torch.float32, device=dev)
    # The bias gradient sums dz over rows: keep dz in fp32 then, as the generic path does.
    kspec = None
    dispatched = compile_backend == "auto"
    if dispatched:
        kspec = triton_spec(plan, dev, w)
        auto_fast, compile_backend = _auto_path(dev)
        fast = fast and auto_fast
    cfg = fast_cfg(plan, track, torch.float32 if need_b else mm) if fast else None
    if dispatched and kspec is None:
        fused_path.record("generic" if cfg is None else "compiled" if compile_backend
                          else "eager", fused_path.requested())
    coef = torch.tensor(plan.coef, dtype=torch.float32, device=dev)

    with torch.autocast(dev.type, enabled=False):
        for start in range(0, plan.num_rows, plan.chunk):
            end = min(start + plan.chunk, plan.num_rows)
            rows = slice(start, end) if plan.rows is None else plan.rows[start:end]
            h_c = h[rows].detach().to(mm)
            labels_c = plan.labels[rows]
            if kspec is not None:  # the Triton kernels: no logits in HBM
                dz, s = triton_chunk(kspec, plan, rows, h_c, w_mm, b_mm, labels_c, track,
                                     torch.float32 if need_b else mm)
            else:
                with torch.no_grad():
                    z = F.linear(h_c, w_mm, b_mm)
                if cfg is None:
                    teacher_c = plan.teacher.take(rows) if plan.teacher is not None else None
                    s, dz = _generic_chunk(plan, z, teacher_c, labels_c, track)
                    del teacher_c
                else:
                    with torch.no_grad():
                        dz, s = _fast_chunk_inputs(cfg, plan, rows, z, labels_c, coef,
                                                   compile_backend)
                del z
            sums += s
            total += (coef * s).sum()
            if not track:
                continue
            if need_b:
                gb += dz.float().sum(0)
            dz = dz.to(mm)
            if need_h:
                gh[rows] = (dz @ w_mm).to(gh.dtype)
            if need_w:
                _addmm_f32_(gw, dz.T, h_c)
    return total, sums, gh, gw, gb


def _fast_chunk_inputs(cfg: FastCfg, plan: Plan, rows: slice | Tensor, z: Tensor,
                       labels_c: Tensor, coef: Tensor, compile_backend: str | None
                       ) -> tuple[Tensor | None, Tensor]:
    """Teacher inputs of one chunk in their stored/matmul dtype (upcast inside the fused
    computation), the fast chunk, and the exact values scattered over the top-k ids."""
    teacher = plan.teacher
    if isinstance(teacher, TopKTeacher):
        ids = teacher.ids[rows].long()
        args: tuple = (z, ids, teacher.logprobs[rows], teacher.tail_logprob[rows], labels_c,
                       coef)
        dz, s, dz_ids = _fast_chunk(cfg, args, compile_backend)
        if dz is not None:
            dz.scatter_(1, ids, dz_ids.to(dz.dtype))
        return dz, s
    if isinstance(teacher, TeacherHidden):
        t = teacher.raw_logits(rows)
    elif isinstance(teacher, DenseTeacher):
        t = teacher.logits[rows]
    else:
        t = None
    dz, s, _ = _fast_chunk(cfg, (z, t, labels_c, coef), compile_backend)
    return dz, s


class _FusedLogitLoss(torch.autograd.Function):
    """Forward does all the work (loss and its gradients); backward scales the stored grads."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, w: Tensor, b: Tensor | None, plan: Plan,
                out: dict[str, Tensor]) -> Tensor:
        need = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        total, sums, gh, gw, gb = _run(plan, h, w, b, need)
        out["sums"] = sums
        # Return grads in the parameters' dtypes; the fp32 accumulators are freed here.
        gw = None if gw is None else gw.to(w.dtype)
        gb = None if gb is None else gb.to(b.dtype)
        ctx.save_for_backward(gh, gw, gb)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):
        gh, gw, gb = ctx.saved_tensors
        scale = [None if g is None else g * grad_out.to(g.dtype) for g in (gh, gw, gb)]
        return scale[0], scale[1], scale[2], None, None


def fused_logit_loss(s_hidden: Tensor, s_head: nn.Module | Tensor | tuple[Tensor, Tensor | None],
                     teacher: TeacherSource | None, labels: Tensor, mask: Tensor | None,
                     terms: Terms, *, chunk_tokens: int = 1024, s_softcap: float | None = None,
                     ) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of logit loss terms, computed chunk by chunk through the student LM head.

    s_hidden [N,Hs] (or [...,Hs], flattened): student final hidden states (after the final norm).
    s_head: nn.Linear, weight [V,Hs] or (weight, bias); a tied embedding weight is fine, its
      gradient flows to the embedding. s_softcap: Gemma-style final logit soft-capping.
    teacher: TeacherHidden | DenseTeacher | TopKTeacher with N rows, or None (ce only).
    labels [N] (-100 = none), mask [N] (nonzero = counted; None = all).
    terms: (LossSpec, weight, params) as from registry.resolve_terms.
    Returns (scalar loss, differentiable w.r.t. s_hidden and the head weight/bias where they
    require grad; {term: its masked mean, unweighted}). All masked out -> 0, never NaN.
    """
    weight, bias = head_params(s_head)
    if s_hidden.dim() < 2 or s_hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"s_hidden {tuple(s_hidden.shape)} must be [tokens, {weight.shape[1]}] "
                         f"to match the head weight {tuple(weight.shape)}")
    h = s_hidden.reshape(-1, s_hidden.shape[-1])
    n = h.shape[0]
    plan = prepare(n, weight.shape[0], h.device, teacher, labels.reshape(-1),
                    None if mask is None else mask.reshape(-1), terms, chunk_tokens, s_softcap)
    out: dict[str, Tensor] = {}
    grads = torch.is_grad_enabled() and (
        h.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if grads:
        loss = _FusedLogitLoss.apply(h, weight, bias, plan, out)
    else:
        with torch.no_grad():
            loss, out["sums"], *_ = _run(plan, h, weight, bias, (False, False, False))
    means = (out["sums"] / torch.tensor([max(c, 1) for c in plan.counts],
                                        dtype=torch.float32, device=h.device)).tolist()
    return loss, dict(zip(plan.keys, means))
