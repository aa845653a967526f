"""Triton kernels for the one-token decode step at small batch: a GEMV with the residual add
and RMSNorm before it and the gated activation after it fused in, and attention from the raw
q|k|v projection (q/k norms, rope, cache writes, attention over the KV cache) in one launch.

Why: at batch 1 a Gemma-3-270M decode step is ~240 kernels of 2-4 us each although most read
under 5 MB (benchmarks/RESULTS.md, decode engine): the step is bound by launches, not
bandwidth. cuBLAS runs each projection as a GEMM tile kernel (2.7-4.1 us), the attention of
one layer was two GEMMs and a softmax (~10 us), and every norm and activation a kernel of its
own. Here a projection with its input norm and (gate|up) its activation is one kernel, the
residual add before it (with Gemma's post-norm of the branch output) its prologue
(`decode_residual_gemv`), and attention is one kernel per layer that norms and rotates q and
k, writes the new key and value into the cache and reads the cache only up to the current
slot: 104 launches a step instead of 240, 0.587 ms instead of 0.821 on an H100
(benchmarks/RESULTS.md, decode kernels, everything fused).

Numerics follow decode_model's torch path (HF's maths): the norm in fp32 rounded to the
input's dtype, products accumulated in fp32 and rounded to the weight dtype, gate and up
rounded before the activation and the activation before the product; attention scores rounded
to the cache dtype before scaling (as a bf16 matmul's output is), softmax in fp32 (online,
flash-decoding style, so probabilities are rounded unnormalised: within bf16 rounding of the
torch path, checked against fp64 in tests/test_decode_kernels.py).

Attention splits each sequence over programs of SPLIT slots (flash-decoding); the last program
of a (row, KV head) to finish, found with an atomic counter, merges the partial results, so it
is one launch. The counter is zero again when the kernel ends, so the op declares no mutation
of it; it declares the caches' (inductor then writes them in place: no copy).

Both are `torch.library.custom_op`s: opaque to torch.compile (inductor fuses the elementwise
work around them) and captured into the engine's CUDA graph like any kernel. Runs on CUDA, and
on CPU under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from wattkd.distill.kernels.body import _tanh

NORMS = {"none": 0, "gemma": 1, "llama": 2}
# the residual add folded into the GEMV's prologue: input = res + x (plain) or
# res + gemma_norm(x) (Gemma's post-norm on the branch output before the add)
RESIDUALS = {"none": 0, "plain": 1, "gemma": 2}
ACTS = {"none": 0, "gelu_pytorch_tanh": 1, "silu": 2}
MAX_ROWS = 16            # the GEMV keeps every row in one tl.dot tile (its M side)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _input_tile(x_ptr, res_ptr, post_ptr, rows, kk, rmask, km, rstd_x, K: tl.constexpr,
                RESID: tl.constexpr):
    """The GEMV's input over columns kk: x, or res + x (RESID 1), or res + gemma_norm(x)
    (RESID 2, rstd_x its rows' RMS factors), rounded where the torch ops round."""
    m = rmask[:, None] & km[None, :]
    v = tl.load(x_ptr + rows[:, None] * K + kk[None, :], mask=m, other=0.0)
    if RESID != 0:
        dt = x_ptr.dtype.element_ty
        y = v.to(tl.float32)
        if RESID == 2:
            pw = tl.load(post_ptr + kk, mask=km, other=0.0).to(tl.float32)
            y = (y * rstd_x[:, None] * pw[None, :]).to(dt).to(tl.float32)
        r = tl.load(res_ptr + rows[:, None] * K + kk[None, :], mask=m, other=0.0)
        v = (r.to(tl.float32) + y).to(dt)
    return v


@triton.jit
def _gemv(x_ptr, w_ptr, bias_ptr, norm_ptr, out_ptr, res_ptr, post_ptr, h_ptr, B, N, eps,
          K: tl.constexpr, NORM: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
          RESID: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """out[b, n] = norm(x)[b] . w[n] (+ bias); with ACT, w holds gate rows then up rows and
    out[b, n] = act(gate) * up. The K loops are unrolled (K is a constant): every tile's load
    is issued before the first is used, one memory round trip instead of one per tile.
    BLOCK_B 1 (one row): products summed on the CUDA cores instead of tl.dot, whose 16-wide
    tiles would force 16 output rows a program (too few programs for N = 640).
    RESID: the input is first h = res + x or res + gemma_norm(x) (RESIDUALS), which program 0
    also writes to h (the residual stream); every program recomputes it from L2."""
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_B)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    rmask = rows < B
    nmask = cols < N
    x_dtype = x_ptr.dtype.element_ty
    w_dtype = w_ptr.dtype.element_ty
    rstd_x = tl.zeros((BLOCK_B,), tl.float32)
    if RESID == 2:
        ss_x = tl.zeros((BLOCK_B,), tl.float32)
        for t in tl.static_range(0, K, BLOCK_K):
            kk = t + ks
            xv = tl.load(x_ptr + rows[:, None] * K + kk[None, :],
                         mask=rmask[:, None] & (kk[None, :] < K), other=0.0).to(tl.float32)
            ss_x += tl.sum(xv * xv, 1)
        rstd_x = 1.0 / tl.sqrt(ss_x / K + eps)
    rstd = tl.zeros((BLOCK_B,), tl.float32)
    if NORM != 0:
        ss = tl.zeros((BLOCK_B,), tl.float32)
        for t in tl.static_range(0, K, BLOCK_K):
            kk = t + ks
            xv = _input_tile(x_ptr, res_ptr, post_ptr, rows, kk, rmask, kk < K, rstd_x, K,
                             RESID).to(tl.float32)
            ss += tl.sum(xv * xv, 1)
        rstd = 1.0 / tl.sqrt(ss / K + eps)
    acc = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
    for t in tl.static_range(0, K, BLOCK_K):
        kk = t + ks
        km = kk < K
        xv = _input_tile(x_ptr, res_ptr, post_ptr, rows, kk, rmask, km, rstd_x, K, RESID)
        if RESID != 0:   # the new residual stream, written once
            tl.store(h_ptr + rows[:, None] * K + kk[None, :], xv,
                     mask=(rmask & (rows * 0 + pid == 0))[:, None] & km[None, :])
        if NORM == 1:    # Gemma: (x * rstd * (1 + w)).to(x), the buffer holds 1 + w in fp32
            nw = tl.load(norm_ptr + kk, mask=km, other=0.0).to(tl.float32)
            xv = (xv.to(tl.float32) * rstd[:, None] * nw[None, :]).to(x_dtype)
        if NORM == 2:    # Llama: w * (x * rstd).to(x)
            nw = tl.load(norm_ptr + kk, mask=km, other=0.0).to(tl.float32)
            xh = (xv.to(tl.float32) * rstd[:, None]).to(x_dtype).to(tl.float32)
            xv = (nw[None, :] * xh).to(x_dtype)
        a = xv.to(w_dtype)
        wt = tl.load(w_ptr + cols[:, None] * K + kk[None, :],
                     mask=nmask[:, None] & km[None, :], other=0.0)
        if BLOCK_B == 1:
            acc += tl.sum(a.to(tl.float32) * wt.to(tl.float32), 1)[None, :]
        elif UPCAST:   # the interpreter's bf16 dot is wrong (triton 3.9): do it in fp32
            acc += tl.dot(a.to(tl.float32), tl.trans(wt.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(wt))
        if ACT != 0:
            wu = tl.load(w_ptr + (cols + N)[:, None] * K + kk[None, :],
                         mask=nmask[:, None] & km[None, :], other=0.0)
            if BLOCK_B == 1:
                acc_up += tl.sum(a.to(tl.float32) * wu.to(tl.float32), 1)[None, :]
            elif UPCAST:
                acc_up += tl.dot(a.to(tl.float32), tl.trans(wu.to(tl.float32)),
                                 input_precision="ieee")
            else:
                acc_up += tl.dot(a, tl.trans(wu))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if ACT != 0:
            acc_up += tl.load(bias_ptr + N + cols, mask=nmask, other=0.0).to(tl.float32)[None, :]
    out = acc.to(w_dtype)
    if ACT != 0:
        g = out.to(tl.float32)
        if ACT == 1:
            # GeGLU's tanh approximation; 0.79788... = sqrt(2 / pi) (a literal: Triton reads
            # no non-constexpr globals)
            act = 0.5 * g * (1.0 + _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
        else:
            act = g / (1.0 + tl.exp(-g))
        out = (act.to(w_dtype).to(tl.float32) * acc_up.to(w_dtype).to(tl.float32)).to(w_dtype)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], out,
             mask=rmask[:, None] & nmask[None, :])


def gemv_blocks(n: int, k: int, rows: int, gated: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, warps); tiny tiles in the interpreter. One row: one warp a program,
    K in 256-wide tiles, 2 output rows a program, or 1 where that would read more than 2,048
    weights (gated: gate and up rows). Swept on an H100 over the Gemma-3-270M projections
    (benchmarks/RESULTS.md, decode kernels), these were the fastest of eight tilings or within
    0.2 us of it, and faster than cuBLAS: 2.4-3.2 us against 3.7-6.3 (gate|up 4.3 against 4.7
    with its activation fused). `n` is unused here: it keys benchmarks/decode_kernels.py's
    per-shape overrides. Several rows: 16 output rows a program (tl.dot's smallest tile), the
    fastest of six tilings there, and slower than cuBLAS: the default takes the GEMV only at
    one row (decode_model.GEMV_DEFAULT_ROWS)."""
    if interpreting():
        return 16, 32, 1
    if rows == 1:
        return (2 if 2 * k * (2 if gated else 1) <= 2048 else 1), 256, 1
    return 16, 256, 4


def _launch_gemv(x: Tensor, w: Tensor, bias: Tensor | None, norm_w: Tensor | None, eps: float,
                 norm: int, act: int, res: Tensor | None = None, post_w: Tensor | None = None,
                 resid: int = 0) -> tuple[Tensor, Tensor | None]:
    rows, k = x.shape
    if rows > MAX_ROWS:
        raise ValueError(f"decode_gemv takes at most {MAX_ROWS} rows, got {rows}")
    n = w.shape[0] // (2 if act else 1)
    x = x.contiguous()
    out = torch.empty(rows, n, device=x.device, dtype=w.dtype)
    h = torch.empty_like(x) if resid else None
    bn, bk, warps = gemv_blocks(n, k, rows, bool(act))
    _gemv[(triton.cdiv(n, bn),)](
        x, w, bias if bias is not None else w, norm_w if norm_w is not None else w, out,
        res.contiguous() if res is not None else x, post_w if post_w is not None else w,
        h if h is not None else out, rows, n, eps, K=k, NORM=norm, ACT=act,
        HAS_BIAS=bias is not None, RESID=resid, BLOCK_B=1 if rows == 1 else MAX_ROWS,
        BLOCK_N=bn, BLOCK_K=bk, UPCAST=interpreting(), num_warps=warps)
    return out, h


@torch.library.custom_op("wattkd::decode_gemv", mutates_args=())
def decode_gemv(x: Tensor, w: Tensor, bias: Tensor | None, norm_w: Tensor | None, eps: float,
                norm: int, act: int) -> Tensor:
    """x [B, K] (B <= MAX_ROWS) -> [B, N]: F.linear(norm(x), w, bias), N = w rows; with `act`
    (ACTS) w is gate rows then up rows and the result act(gate) * up, N = w rows / 2.
    `norm` (NORMS) with its weight `norm_w` (Gemma: 1 + w in fp32)."""
    return _launch_gemv(x, w, bias, norm_w, eps, norm, act)[0]


@decode_gemv.register_fake
def _(x, w, bias, norm_w, eps, norm, act):
    return x.new_empty(x.shape[0], w.shape[0] // (2 if act else 1), dtype=w.dtype)


@torch.library.custom_op("wattkd::decode_residual_gemv", mutates_args=())
def decode_residual_gemv(x: Tensor, res: Tensor, post_w: Tensor | None, w: Tensor,
                         bias: Tensor | None, norm_w: Tensor | None, eps: float, norm: int,
                         act: int) -> tuple[Tensor, Tensor]:
    """The residual add before a projection folded into it: h = res + x (post_w None) or
    res + gemma_norm(x, post_w) (Gemma's post-norm of the branch output x), then decode_gemv
    of h. Returns (that projection, h: the new residual stream). x, res [B, K]."""
    out, h = _launch_gemv(x, w, bias, norm_w, eps, norm, act, res, post_w,
                          RESIDUALS["plain" if post_w is None else "gemma"])
    assert h is not None
    return out, h


@decode_residual_gemv.register_fake
def _(x, res, post_w, w, bias, norm_w, eps, norm, act):
    return (x.new_empty(x.shape[0], w.shape[0] // (2 if act else 1), dtype=w.dtype),
            torch.empty_like(x))


@triton.jit
def _head_load(qkv_ptr, base, d, rmask, norm_ptr, D: tl.constexpr, QK_NORM: tl.constexpr,
               ROPE: tl.constexpr):
    """The raw heads starting at base[r] (tile rows r), their rotate_half partners (rope) and
    the norm weights of both: loads only, issued before any of them is used."""
    half: tl.constexpr = D // 2
    dp = (d + half) % D                         # rotate_half's partner of each column
    x = tl.load(qkv_ptr + base[:, None] + d[None, :], mask=rmask[:, None], other=0.0)
    xp = x
    if ROPE:
        xp = tl.load(qkv_ptr + base[:, None] + dp[None, :], mask=rmask[:, None], other=0.0)
    nw = tl.zeros((D,), tl.float32)
    nwp = nw
    if QK_NORM:
        nw = tl.load(norm_ptr + d)
        nwp = tl.load(norm_ptr + dp)
    return x, xp, nw, nwp


@triton.jit
def _head_math(x, xp, nw, nwp, cos, sin, d, eps, D: tl.constexpr, QK_NORM: tl.constexpr,
               ROPE: tl.constexpr):
    """Heads RMS-normed (Gemma's q/k norm: weight 1 + w in fp32, output rounded to the input
    dtype) then rotated (rope: x * cos + rotate_half(x) * sin, cos / sin [D] in the model dtype,
    rounded once as inductor's fused torch path does)."""
    dt = x.dtype
    xf = x.to(tl.float32)
    xpf = xp.to(tl.float32)
    if QK_NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 1) / D + eps)
        xf = (xf * rstd[:, None] * nw[None, :]).to(dt).to(tl.float32)
        if ROPE:
            xpf = (xpf * rstd[:, None] * nwp[None, :]).to(dt).to(tl.float32)
    if ROPE:
        sign = tl.where(d < D // 2, -1.0, 1.0)
        xf = xf * cos[None, :] + (sign[None, :] * xpf) * sin[None, :]
    return xf.to(dt)


@triton.jit
def _attend_tile(q, kt, vt, j, jm, slot, pad_ptr, b, PAD_L, scale, window, m, den, acc,
                 WINDOW: tl.constexpr, UPCAST: tl.constexpr):
    """One tile of slots j into the online softmax state (m, den, acc) of the query rows q."""
    cache_dtype = kt.dtype
    if UPCAST:   # the interpreter's bf16 dot is wrong (triton 3.9): do it in fp32
        sc = tl.dot(q.to(tl.float32), tl.trans(kt.to(tl.float32)), input_precision="ieee")
    else:
        sc = tl.dot(q, tl.trans(kt))
    sc = sc.to(cache_dtype).to(tl.float32) * scale
    pad = tl.load(pad_ptr + b.to(tl.int64) * PAD_L + j, mask=jm, other=0)
    seen = ((pad != 0) & (j <= slot)) | (j == slot)
    if WINDOW:
        seen = seen & (j > slot - window)
    seen = seen & jm
    sc = tl.where(seen[None, :], sc, float("-inf"))
    m_new = tl.maximum(m, tl.max(sc, 1))
    base = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(sc - base[:, None])
    alpha = tl.exp(m - base)
    den = den * alpha + tl.sum(p, 1)
    if UPCAST:
        pv = tl.dot(p.to(cache_dtype).to(tl.float32), vt.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(cache_dtype), vt)
    return m_new, den, acc * alpha[:, None] + pv


@triton.jit
def _attend(qkv_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, eps, k_ptr, v_ptr, pad_ptr, slot_ptr,
            out_ptr, part_ptr, stat_ptr, count_ptr, scale, window, L, PAD_L, HKV, SPLITS,
            QKV_W, G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr,
            BLOCK_L: tl.constexpr, SPLIT: tl.constexpr, MAX_SPLITS: tl.constexpr,
            WINDOW: tl.constexpr, QK_NORM: tl.constexpr, ROPE: tl.constexpr,
            UPCAST: tl.constexpr):
    """Program (row b, KV head h, split s): the G query heads of h (normed and rotated from
    the raw q|k|v projection) against slots [lo + s * SPLIT, +SPLIT) of [lo, slot]; partial
    (max, sum, acc) merged by the last one. The program whose split holds `slot` also norms
    and rotates the new key, attends to it and the new value from registers and writes both
    into the caches at `slot`. Every load that does not need another is issued first (one
    memory round trip for the query, the new key / value and the last cache tile), and the
    last tile (the one holding `slot`, usually the only one) is taken apart from the loop."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    r2 = tl.arange(0, 2)                   # the new key / value: row 0 of a 2-row tile
    gmask = g < G
    row = b.to(tl.int64) * QKV_W
    # loads that need no slot: issued with the slot's
    slot = tl.load(slot_ptr)
    qx, qxp, qnw, qnwp = _head_load(qkv_ptr, row + (h * G + g) * D, d, gmask, qn_ptr, D,
                                    QK_NORM, ROPE)
    cos = tl.zeros((D,), tl.float32)
    sin = tl.zeros((D,), tl.float32)
    if ROPE:
        cos = tl.load(cos_ptr + b.to(tl.int64) * D + d).to(tl.float32)
        sin = tl.load(sin_ptr + b.to(tl.int64) * D + d).to(tl.float32)
    n = slot + 1
    lo = 0
    if WINDOW:
        lo = tl.maximum(slot - window + 1, 0)
    start = lo + s * SPLIT
    if start < n:
        active = tl.cdiv(n - lo, SPLIT)
        cache_dtype = k_ptr.dtype.element_ty
        head = (b * HKV + h).to(tl.int64)
        end = tl.minimum(start + SPLIT, n)
        last = start + ((end - start - 1) // BLOCK_L) * BLOCK_L
        j = last + tl.arange(0, BLOCK_L)
        jm = j < end
        is_new = j == slot
        tile = (head * L + j)[:, None] * D + d[None, :]
        kt = tl.load(k_ptr + tile, mask=(jm & ~is_new)[:, None], other=0.0)
        vt = tl.load(v_ptr + tile, mask=(jm & ~is_new)[:, None], other=0.0)
        r2s = r2 * 0 + slot                # (a vector: the interpreter takes no scalar masks)
        mine = (r2 == 0) & (r2s >= start) & (r2s < start + SPLIT)
        kx, kxp, knw, knwp = _head_load(qkv_ptr, row + (HKV * G + h) * D + r2 * 0, d, mine,
                                        kn_ptr, D, QK_NORM, ROPE)
        vx = tl.load(qkv_ptr + row + (HKV * G + HKV + h) * D + r2[:, None] * 0 + d[None, :],
                     mask=mine[:, None], other=0.0)
        q = _head_math(qx, qxp, qnw, qnwp, cos, sin, d, eps, D, QK_NORM, ROPE).to(cache_dtype)
        k_new = _head_math(kx, kxp, knw, knwp, cos, sin, d, eps, D, QK_NORM, ROPE
                           ).to(cache_dtype)
        v_new = vx.to(cache_dtype)
        m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        den = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, D), tl.float32)
        for j0 in range(start, last, BLOCK_L):          # the tiles before the last (if any)
            jj = j0 + tl.arange(0, BLOCK_L)
            t = (head * L + jj)[:, None] * D + d[None, :]
            m, den, acc = _attend_tile(q, tl.load(k_ptr + t), tl.load(v_ptr + t), jj,
                                       jj < end, slot, pad_ptr, b, PAD_L, scale, window, m,
                                       den, acc, WINDOW, UPCAST)
        # row 0 of the 2-row tiles (the other is zero) into the slot's row of the last tile
        k_row = tl.sum(k_new.to(tl.float32), 0)
        v_row = tl.sum(v_new.to(tl.float32), 0)
        kt = tl.where(is_new[:, None], k_row[None, :].to(cache_dtype), kt)
        vt = tl.where(is_new[:, None], v_row[None, :].to(cache_dtype), vt)
        m, den, acc = _attend_tile(q, kt, vt, j, jm, slot, pad_ptr, b, PAD_L, scale, window, m,
                                   den, acc, WINDOW, UPCAST)
        at_slot = (head * L + slot) * D + r2[:, None] * 0 + d[None, :]
        tl.store(k_ptr + at_slot, k_new, mask=mine[:, None])
        tl.store(v_ptr + at_slot, v_new, mask=mine[:, None])
        orow = (b.to(tl.int64) * HKV * G + h * G + g)[:, None] * D + d[None, :]
        if active == 1:
            tl.store(out_ptr + orow, (acc / den[:, None]).to(out_ptr.dtype.element_ty),
                     mask=gmask[:, None])
        else:
            part = (head * SPLITS + s) * G + g
            tl.store(part_ptr + part[:, None] * D + d[None, :], acc, mask=gmask[:, None])
            tl.store(stat_ptr + part * 2, m, mask=gmask)
            tl.store(stat_ptr + part * 2 + 1, den, mask=gmask)
            tl.debug_barrier()   # every thread's partials written before the counter moves
            done = tl.atomic_add(count_ptr + head, 1, sem="acq_rel", scope="gpu")
            if done == active - 1:       # the last program: merge, then zero the counter
                # unrolled over the splits: every load in flight at once (L2, not L1: the
                # other programs wrote them)
                m_all = tl.full((BLOCK_G,), float("-inf"), tl.float32)
                for i in tl.static_range(MAX_SPLITS):
                    pi = (head * SPLITS + i) * G + g
                    use = gmask & (g * 0 + i < active)
                    mi = tl.load(stat_ptr + pi * 2, mask=use, other=float("-inf"),
                                 cache_modifier=".cg")
                    m_all = tl.maximum(m_all, mi)
                base = tl.where(m_all == float("-inf"), 0.0, m_all)
                den_all = tl.zeros((BLOCK_G,), tl.float32)
                acc_all = tl.zeros((BLOCK_G, D), tl.float32)
                for i in tl.static_range(MAX_SPLITS):
                    pi = (head * SPLITS + i) * G + g
                    use = gmask & (g * 0 + i < active)
                    mi = tl.load(stat_ptr + pi * 2, mask=use, other=float("-inf"),
                                 cache_modifier=".cg")
                    wi = tl.where(use, tl.exp(mi - base), 0.0)
                    den_all += wi * tl.load(stat_ptr + pi * 2 + 1, mask=use, other=0.0,
                                            cache_modifier=".cg")
                    acc_all += wi[:, None] * tl.load(part_ptr + pi[:, None] * D + d[None, :],
                                                     mask=use[:, None], other=0.0,
                                                     cache_modifier=".cg")
                tl.store(out_ptr + orow,
                         (acc_all / den_all[:, None]).to(out_ptr.dtype.element_ty),
                         mask=gmask[:, None])
                tl.atomic_xchg(count_ptr + head, 0)


MAX_ATTENTION_SPLITS = 64   # the merge is unrolled over the splits: bounds its code size


def attention_tiles(max_len: int) -> tuple[int, int, int]:
    """(SPLIT slots a program, BLOCK_L slots a tile, warps); tiny in the interpreter. 32-slot
    splits were the fastest of six tilings on an H100 (5.3 us a layer at 176 slots against
    6.2 us at 64: benchmarks/RESULTS.md, decode kernels); longer caches get longer splits so
    that at most MAX_ATTENTION_SPLITS are merged."""
    if interpreting():
        return 8, 4, 1
    return max(32, triton.next_power_of_2(triton.cdiv(max_len, MAX_ATTENTION_SPLITS))), 32, 4


@torch.library.custom_op("wattkd::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(qkv: Tensor, q_norm: Tensor | None, k_norm: Tensor | None, eps: float,
                     cos: Tensor | None, sin: Tensor | None, k_cache: Tensor, v_cache: Tensor,
                     pad: Tensor, slot: Tensor, count: Tensor, scale: float, window: int,
                     split: int) -> Tensor:
    """One query token per row, from its raw q|k|v projection to the attention output: qkv
    [B, (Hq + 2 Hkv) D] (query heads, then key, then value heads); the q and k heads RMS-normed
    with `q_norm` / `k_norm` (Gemma's 1 + w in fp32; None: no q/k norm) and rotated with
    `cos` / `sin` [B, D] (the model dtype; None: no rope); the new key and value written into
    the caches [B, Hkv, L, D] at `slot` (a 1-element device tensor); attention over the slots
    up to it -> [B, Hq, D]. pad [B, >= L] is 0 on prompt padding; slots after `slot` are not
    read; with window > 0 only the last `window` slots are seen. `count`: int32 zeros
    [B * Hkv], left zero (the split merge's counter). `split`: slots a program (0:
    attention_tiles'; else a multiple of 16). One launch for what the torch ops do in four
    (q/k norm and rope, two cache writes, attention)."""
    b = qkv.shape[0]
    hkv, max_len, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    hq = qkv.shape[1] // d - 2 * hkv
    if hq < hkv or hq % hkv or qkv.shape[1] != (hq + 2 * hkv) * d:
        raise ValueError(f"qkv width {qkv.shape[1]} is not (Hq + 2 x {hkv}) x {d} with Hq a "
                         f"multiple of {hkv}")
    if (q_norm is None) != (k_norm is None) or (cos is None) != (sin is None):
        raise ValueError("q_norm and k_norm, cos and sin: both or neither")
    g = hq // hkv
    split_len, block_l, warps = attention_tiles(max_len)
    if split:   # tiles: the largest power of two dividing it, at most the default's
        split_len, block_l = split, min(block_l, split & -split)
        if block_l < 16 and not interpreting():
            raise ValueError(f"split {split} is not a multiple of 16 (tl.dot's smallest tile "
                             "on the GPU)")
    splits = triton.cdiv(max_len, split_len)
    block_g = max(16, triton.next_power_of_2(g))
    out = torch.empty(b, hq, d, device=qkv.device, dtype=k_cache.dtype)
    part = torch.empty(b * hkv * splits * g, d, device=qkv.device, dtype=torch.float32)
    stat = torch.empty(b * hkv * splits * g, 2, device=qkv.device, dtype=torch.float32)
    anything = qkv  # a valid pointer for the arguments a constexpr switches off
    _attend[(b, hkv, splits)](
        qkv.contiguous(), q_norm if q_norm is not None else anything,
        k_norm if k_norm is not None else anything,
        cos.contiguous() if cos is not None else anything,
        sin.contiguous() if sin is not None else anything, eps, k_cache, v_cache, pad, slot,
        out, part, stat, count, scale, window, max_len, pad.stride(0), hkv, splits,
        qkv.shape[1], G=g, D=d, BLOCK_G=block_g, BLOCK_L=block_l, SPLIT=split_len,
        MAX_SPLITS=triton.next_power_of_2(splits), WINDOW=window > 0,
        QK_NORM=q_norm is not None, ROPE=cos is not None, UPCAST=interpreting(),
        num_warps=warps)
    return out


@decode_attention.register_fake
def _(qkv, q_norm, k_norm, eps, cos, sin, k_cache, v_cache, pad, slot, count, scale, window,
      split):
    hkv, d = k_cache.shape[1], k_cache.shape[3]
    return k_cache.new_empty(qkv.shape[0], qkv.shape[1] // d - 2 * hkv, d)
