"""Triton kernels for the decoder body: RMSNorm and the gated MLP activation (GeGLU / SwiGLU),
forward and backward, as autograd functions.

Why: in a KD step the model bodies (teacher forward, student forward + backward) are most of the
time, and in eager mode each RMSNorm is ~8 elementwise kernels (cast, pow, mean, rsqrt, mul, add,
mul, cast) and each gated activation ~3 forward and ~6 backward, each reading and writing the
whole activation. Here each is one pass forward and one backward (the idea of Liger-Kernel's
model kernels; written from the formulas, not from its code). Exact to fp32 rounding: statistics
and products in fp32, one rounding to the output dtype.

RMSNorm comes in the two conventions Hugging Face models use:
- Gemma (`offset` 1, no early cast): y = (x * rstd * (1 + w)).to(x.dtype)
- Llama / Qwen / Mistral: y = w * (x * rstd).to(x.dtype)  (result in promote(w, x))
with rstd = 1 / sqrt(mean(x^2) + eps) in fp32. Backward, with g = dy * w' (w' = w + offset):
dx = rstd (g - x_hat mean(g x_hat)), dw = sum over rows of dy x_hat.

Gated MLP: y = act(gate) * up, act = gelu (tanh approximation, Gemma) or silu (Llama, Qwen).
Runs on CUDA, and on CPU under TRITON_INTERPRET=1 (tests). `body_kernels.py` puts them into a
model's modules.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

GELU_TANH, SILU = 0, 1
_K = 0.7978845608028654   # sqrt(2 / pi)


@triton.jit
def _tanh(x):
    # without libdevice (also runs in the interpreter); saturates cleanly to +-1
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _rms_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, H, eps, offset,
             CAST_BEFORE_W: tl.constexpr, BH: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BH)
    m = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / H + eps)
    xh = x * rstd
    if CAST_BEFORE_W:
        xh = xh.to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32) + offset
    tl.store(y_ptr + row * H + cols, (xh * w).to(y_ptr.dtype.element_ty), mask=m)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, M, H, offset, rows_per_program,
             CAST_BEFORE_W: tl.constexpr, BH: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BH)
    m = cols < H
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32) + offset
    dw = tl.zeros((BH,), tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for i in range(rows_per_program):
        row = first + i
        mr = cols < H * (row < M).to(tl.int32)   # the row's columns, none past row M
        dy = tl.load(dy_ptr + row * H + cols, mask=mr, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * H + cols, mask=mr, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + tl.minimum(row, M - 1))   # rows past M: dy = x = 0
        xh = x * rstd
        if CAST_BEFORE_W:
            dw += dy * xh.to(x_ptr.dtype.element_ty).to(tl.float32)
        else:
            dw += dy * xh
        g = dy * w
        dx = rstd * (g - xh * (tl.sum(g * xh, 0) / H))
        tl.store(dx_ptr + row * H + cols, dx.to(dx_ptr.dtype.element_ty), mask=mr)
    tl.store(dw_ptr + pid * H + cols, dw, mask=m)


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


class RMSNormFunction(torch.autograd.Function):
    """y = rmsnorm(x) * (w + offset) over the last dim; see the module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, eps: float, offset: float,
                cast_before_w: bool) -> Tensor:
        shape, h = x.shape, x.shape[-1]
        x2 = x.reshape(-1, h).contiguous()
        out_dtype = torch.promote_types(w.dtype, x.dtype) if cast_before_w else x.dtype
        y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        bh = triton.next_power_of_2(h)
        _rms_fwd[(x2.shape[0],)](x2, w, y, rstd, h, eps, offset, CAST_BEFORE_W=cast_before_w,
                                 BH=bh, num_warps=_warps(bh))
        ctx.save_for_backward(x2, w, rstd)
        ctx.args = (eps, offset, cast_before_w, shape)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, w, rstd = ctx.saved_tensors
        _, offset, cast_before_w, shape = ctx.args
        m, h = x2.shape
        dy2 = dy.reshape(-1, h).contiguous()
        dx = torch.empty_like(x2)
        programs = min(m, 4 * torch.cuda.get_device_properties(x2.device).multi_processor_count
                       if x2.is_cuda else 8)
        per = triton.cdiv(m, programs)
        programs = triton.cdiv(m, per)
        dw = torch.empty((programs, h), dtype=torch.float32, device=x2.device)
        bh = triton.next_power_of_2(h)
        _rms_bwd[(programs,)](dy2, x2, w, rstd, dx, dw, m, h, offset, per,
                              CAST_BEFORE_W=cast_before_w, BH=bh, num_warps=_warps(bh))
        return dx.view(shape), dw.sum(0).to(w.dtype), None, None, None


def rms_norm(x: Tensor, w: Tensor, eps: float, offset: float, cast_before_w: bool) -> Tensor:
    return RMSNormFunction.apply(x, w, eps, offset, cast_before_w)


@triton.jit
def _act(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32."""
    if ACT == 0:   # gelu, tanh approximation
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = _tanh(inner)
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (
            1.0 + 3.0 * 0.044715 * g * g)
    else:          # silu
        s = 1.0 / (1.0 + tl.exp(-g))
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    return a, da


@triton.jit
def _glu_fwd(g_ptr, u_ptr, y_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    a, _ = _act(g, ACT)
    tl.store(y_ptr + offs, (a * u).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _glu_bwd(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    a, da = _act(g, ACT)
    tl.store(dg_ptr + offs, (dy * u * da).to(dg_ptr.dtype.element_ty), mask=m)
    tl.store(du_ptr + offs, (dy * a).to(du_ptr.dtype.element_ty), mask=m)


_GLU_BLOCK = 1024


class GatedActFunction(torch.autograd.Function):
    """y = act(gate) * up, elementwise (gate and up of one shape)."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, act: int) -> Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype),
                        device=gate.device)
        n = gate.numel()
        _glu_fwd[(triton.cdiv(n, _GLU_BLOCK),)](gate, up, y, n, ACT=act, BLOCK=_GLU_BLOCK)
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _glu_bwd[(triton.cdiv(n, _GLU_BLOCK),)](dy, gate, up, dg, du, n, ACT=ctx.act,
                                                BLOCK=_GLU_BLOCK)
        return dg, du, None


def gated_act(gate: Tensor, up: Tensor, act: int) -> Tensor:
    return GatedActFunction.apply(gate, up, act)
