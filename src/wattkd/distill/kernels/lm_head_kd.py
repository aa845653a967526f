"""LM-head KD loss as Triton kernels that never write logits to HBM.

One chunk of rows, dense teacher given as (teacher hidden, teacher head), in two vocab sweeps:

1. `_stats_kernel` (grid: row blocks x vocab splits): for each [BM x BV] tile it computes the
   student logits h @ W^T and the teacher logits th @ TW^T with `tl.dot` (fp32 accumulation),
   applies the softcaps, and folds the tile into online-softmax statistics per row: running
   max and sum of exp for student and teacher at temperature T (and the student at T=1 when CE
   needs it), the cross sums E_p[t - z] and E_q[z - t] that give forward/reverse KL without a
   second pass, the label logit and the row sum of logits (CE, label smoothing). Splitting the
   vocabulary over programs (flash-decoding style) fills the GPU even for a small chunk; the
   partial statistics [stat, split, rows] are merged in torch (a few KB).
2. `_grad_kernel` (grid: row blocks x vocab tiles): recomputes both tiles and writes
   d(loss)/d(logits) (closed form: forward KL c/T (q_T - p_T), reverse KL c/T q_T (log q_T -
   log p_T - KL), CE c (q_1 - (1-eps) onehot - eps/V), times 1 - tanh^2 under a softcap).

Logits never reach HBM; the chunk's gradient does, once, in bf16, because grad_hidden = dz @ W
and grad_W += dz^T @ h are then two cuBLAS GEMMs at full speed (accumulating them inside the
kernel would need [BM x H] + [BV x H] fp32 accumulators per tile, or fp32 atomics over
grad_W once per row block: both far slower at H = 640..2048 than one bf16 write + two GEMMs).

Supported: forward_kl and reverse_kl (one shared temperature, T^2 scaling as losses.py), ce
(label smoothing, -100 ignored), any weighted sum of them, student and teacher softcaps,
biases. Teacher log-probs are not clamped at LOG_FLOOR (exact whenever they are > -1e4, i.e.
for any finite logits of spread < 1e4 T). Anything else (jsd, tv, top-k or dense-logit
teachers, other temperatures per term) is refused by `kernel_spec`, and fused.py takes its
compiled/generic path. Runs on CUDA, and on CPU under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

IGNORE_INDEX = -100
_IGNORE = tl.constexpr(IGNORE_INDEX)   # (kernels may read globals only as constexpr)
N_STATS = 10  # ms, ls, mt, lt, a, b, m1, l1, zl, zsum


@triton.jit
def _tanh(x):
    # tanh without libdevice (also runs in the interpreter); saturates cleanly to +-1.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _tile(x_ptr, w_ptr, b_ptr, rows, cols, M, V, K, sxm, swv,
          HAS_BIAS: tl.constexpr, CAP: tl.constexpr, cap,
          BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
          UPCAST: tl.constexpr):
    """fp32 logits tile x[rows] @ w[cols]^T (+ bias), soft-capped when CAP; also the raw
    (pre-cap) tile for the cap's chain rule."""
    acc = tl.zeros((BM, BV), dtype=tl.float32)
    ks = tl.arange(0, BK)
    for k0 in range(0, K, BK):
        kk = k0 + ks
        a = tl.load(x_ptr + rows[:, None] * sxm + kk[None, :],
                    mask=(rows[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(w_ptr + cols[None, :] * swv + kk[:, None],
                    mask=(cols[None, :] < V) & (kk[:, None] < K), other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong (triton 3.9): do it in fp32
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    raw = acc
    if CAP:
        acc = cap * _tanh(acc / cap)
    return acc, raw


@triton.jit
def _stats_kernel(h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tb_ptr, lab_ptr, out_ptr,
                  M, V, K, KT, shm, swv, sthm, stwv, v_per_split, inv_t, s_cap, t_cap,
                  HAS_T: tl.constexpr, HAS_B: tl.constexpr, HAS_TB: tl.constexpr,
                  S_CAP: tl.constexpr, T_CAP: tl.constexpr, NEED_ONE: tl.constexpr,
                  HAS_CE: tl.constexpr, SMOOTH: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                  UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_m * BM + tl.arange(0, BM)
    labels = tl.load(lab_ptr + rows, mask=rows < M, other=_IGNORE)
    neg = float("-inf")
    ms = tl.full((BM,), neg, tl.float32)
    ls = tl.zeros((BM,), tl.float32)
    mt = tl.full((BM,), neg, tl.float32)
    lt = tl.zeros((BM,), tl.float32)
    a_acc = tl.zeros((BM,), tl.float32)
    b_acc = tl.zeros((BM,), tl.float32)
    m1 = tl.full((BM,), neg, tl.float32)
    l1 = tl.zeros((BM,), tl.float32)
    zl = tl.zeros((BM,), tl.float32)
    zsum = tl.zeros((BM,), tl.float32)
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BV):
        cols = v0 + tl.arange(0, BV)
        valid = cols[None, :] < v_end
        z, _ = _tile(h_ptr, w_ptr, b_ptr, rows, cols, M, V, K, shm, swv, HAS_B, S_CAP, s_cap,
                     BM, BV, BK, PREC, UPCAST)
        zs = tl.where(valid, z * inv_t, neg)
        m_new = tl.maximum(ms, tl.max(zs, 1))
        e_s = tl.exp(zs - m_new[:, None])            # 0 off the vocab
        alpha = tl.exp(ms - m_new)
        if HAS_T:
            t, _ = _tile(th_ptr, tw_ptr, tb_ptr, rows, cols, M, V, KT, sthm, stwv, HAS_TB,
                         T_CAP, t_cap, BM, BV, BK, PREC, UPCAST)
            ts = tl.where(valid, t * inv_t, neg)
            mt_new = tl.maximum(mt, tl.max(ts, 1))
            e_t = tl.exp(ts - mt_new[:, None])
            beta = tl.exp(mt - mt_new)
            d = tl.where(valid, (z - t) * inv_t, 0.0)
            b_acc = b_acc * alpha + tl.sum(e_s * d, 1)
            a_acc = a_acc * beta - tl.sum(e_t * d, 1)
            lt = lt * beta + tl.sum(e_t, 1)
            mt = mt_new
        ls = ls * alpha + tl.sum(e_s, 1)
        ms = m_new
        if NEED_ONE:
            z1 = tl.where(valid, z, neg)
            m1_new = tl.maximum(m1, tl.max(z1, 1))
            l1 = l1 * tl.exp(m1 - m1_new) + tl.sum(tl.exp(z1 - m1_new[:, None]), 1)
            m1 = m1_new
        if HAS_CE:
            zl += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), 1)
        if SMOOTH:
            zsum += tl.sum(tl.where(valid, z, 0.0), 1)
    base = out_ptr + split * M + rows
    step = n_splits * M
    keep = rows < M
    tl.store(base, ms, mask=keep)
    tl.store(base + step, ls, mask=keep)
    tl.store(base + 2 * step, mt, mask=keep)
    tl.store(base + 3 * step, lt, mask=keep)
    tl.store(base + 4 * step, a_acc, mask=keep)
    tl.store(base + 5 * step, b_acc, mask=keep)
    tl.store(base + 6 * step, m1, mask=keep)
    tl.store(base + 7 * step, l1, mask=keep)
    tl.store(base + 8 * step, zl, mask=keep)
    tl.store(base + 9 * step, zsum, mask=keep)


@triton.jit
def _grad_kernel(h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tb_ptr, lab_ptr, row_ptr, dz_ptr,
                 M, V, K, KT, shm, swv, sthm, stwv, sdz, inv_t, s_cap, t_cap,
                 c_fkl, c_rkl, c_ce, eps,
                 HAS_T: tl.constexpr, HAS_B: tl.constexpr, HAS_TB: tl.constexpr,
                 S_CAP: tl.constexpr, T_CAP: tl.constexpr, HAS_CE: tl.constexpr,
                 BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                 UPCAST: tl.constexpr):
    # Row blocks vary fastest: programs running together share one W tile (read from HBM
    # once) while the chunk's hidden rows stay in L2.
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    pid_m = pid % n_m
    pid_v = pid // n_m
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_v * BV + tl.arange(0, BV)
    rmask = rows < M
    # per-row inputs: lse_s (at T), lse_t (at T), lse_1, rkl value
    lse_s = tl.load(row_ptr + rows, mask=rmask, other=0.0)
    z, z_raw = _tile(h_ptr, w_ptr, b_ptr, rows, cols, M, V, K, shm, swv, HAS_B, S_CAP, s_cap,
                     BM, BV, BK, PREC, UPCAST)
    lq = z * inv_t - lse_s[:, None]
    g = tl.zeros((BM, BV), tl.float32)
    if HAS_T:
        lse_t = tl.load(row_ptr + M + rows, mask=rmask, other=0.0)
        rkl = tl.load(row_ptr + 3 * M + rows, mask=rmask, other=0.0)
        t, _ = _tile(th_ptr, tw_ptr, tb_ptr, rows, cols, M, V, KT, sthm, stwv, HAS_TB, T_CAP,
                     t_cap, BM, BV, BK, PREC, UPCAST)
        lp = t * inv_t - lse_t[:, None]
        q = tl.exp(lq)
        g += c_fkl * (q - tl.exp(lp)) + c_rkl * q * (lq - lp - rkl[:, None])
    if HAS_CE:
        lse_1 = tl.load(row_ptr + 2 * M + rows, mask=rmask, other=0.0)
        labels = tl.load(lab_ptr + rows, mask=rmask, other=_IGNORE)
        c_row = tl.where(labels != _IGNORE, c_ce, 0.0)
        hot = tl.where(cols[None, :] == labels[:, None], 1.0 - eps, 0.0)
        g += c_row[:, None] * (tl.exp(z - lse_1[:, None]) - hot - eps / V)
    if S_CAP:
        y = _tanh(z_raw / s_cap)
        g = g * (1.0 - y * y)
    tl.store(dz_ptr + rows[:, None] * sdz + cols[None, :], g.to(dz_ptr.dtype.element_ty),
             mask=rmask[:, None] & (cols[None, :] < V))


# ------------------------------------------------------------------------------ host side
@dataclass(frozen=True)
class KernelSpec:
    """What the kernels compute for one loss: per-term kinds and the shared temperature."""

    terms: tuple[tuple[str, float, float], ...]  # (name, T^2 factor or 1, label smoothing)
    temperature: float
    has_teacher: bool
    s_cap: float | None
    t_cap: float | None


def kernel_spec(terms: list[tuple[str, dict]], teacher_kind: str, s_cap: float | None,
                t_cap: float | None) -> tuple[KernelSpec | None, str]:
    """(spec, "") when the kernels can compute `terms` ((registered name, params) pairs, the
    loss functions already checked to be the registered ones), else (None, why not)."""
    temps = set()
    out = []
    for name, params in terms:
        if name == "ce":
            out.append(("ce", 1.0, float(params.get("label_smoothing", 0.0))))
        elif name in ("forward_kl", "reverse_kl"):
            t = float(params.get("temperature", 1.0))
            temps.add(t)
            out.append((name, t * t if params.get("scale_by_t2", True) else 1.0, 0.0))
        else:
            return None, f"loss {name!r} has no Triton kernel"
    if len({eps for name, _, eps in out if name == "ce"}) > 1:
        return None, "ce terms with different label smoothing"
    if len(temps) > 1:
        return None, f"teacher terms use different temperatures {sorted(temps)}"
    has_teacher = bool(temps)
    if has_teacher and teacher_kind != "hidden":
        return None, (f"teacher given as {teacher_kind} (the kernel takes teacher hidden states "
                      f"+ head)")
    return KernelSpec(tuple(out), temps.pop() if temps else 1.0, has_teacher, s_cap,
                      t_cap if has_teacher else None), ""


# (BM, BV, BK, num_warps, num_stages) per kernel; benchmarks/lm_head_kd_check.py measures
# candidates on the GPU and may set these. The interpreter uses tiny tiles (numpy per op).
BLOCKS = {"stats": (128, 128, 64, 8, 3), "grad": (128, 128, 64, 8, 4)}
_INTERPRET_BLOCKS = (16, 32, 16, 1, 1)
TILES_PER_PROGRAM = [4]


def chunk(spec: KernelSpec, coef: list[float], h: Tensor, w: Tensor, b: Tensor | None,
          th: Tensor | None, tw: Tensor | None, tb: Tensor | None, labels: Tensor,
          grad: bool, dz_dtype: torch.dtype) -> tuple[Tensor | None, Tensor]:
    """One chunk: (d loss/d logits [rows, V] in dz_dtype or None, per-term sums [terms] fp32),
    with the conventions of fused._dense_body (sums include the T^2 factor; loss = coef . sums).

    h [M,K] and w [V,K] share a dtype (bf16/fp16/fp32), as do th [M,KT] and tw [V,KT]."""
    import os

    m, k = h.shape
    v = w.shape[0]
    dev = h.device
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    bm, bv, bk, warps, stages = _INTERPRET_BLOCKS if interpret else BLOCKS["stats"]
    prec = "ieee" if h.dtype == torch.float32 else "tf32"
    h, w = h.contiguous(), w.contiguous()
    has_t = spec.has_teacher
    if has_t:
        th, tw = th.contiguous(), tw.contiguous()
    else:
        th, tw, tb = h, w, None
    inv_t = 1.0 / spec.temperature
    has_ce = any(name == "ce" for name, _, _ in spec.terms)
    need_one = has_ce and spec.temperature != 1.0
    labels = labels.contiguous()
    n_m = triton.cdiv(m, bm)
    # Vocab splits of TILES_PER_PROGRAM tiles: many short programs, so several are resident
    # per SM and one's softmax arithmetic overlaps another's matmul (measured on an H200).
    v_per = TILES_PER_PROGRAM[0] * bv
    splits = triton.cdiv(v, v_per)
    part = torch.empty((N_STATS, splits, m), dtype=torch.float32, device=dev)
    dummy = h
    _stats_kernel[(n_m, splits)](
        h, w, b if b is not None else dummy, th, tw, tb if tb is not None else dummy, labels,
        part, m, v, k, th.shape[1], h.stride(0), w.stride(0), th.stride(0), tw.stride(0),
        v_per, inv_t, spec.s_cap or 1.0, spec.t_cap or 1.0,
        HAS_T=has_t, HAS_B=b is not None, HAS_TB=tb is not None, S_CAP=bool(spec.s_cap),
        T_CAP=bool(spec.t_cap), NEED_ONE=need_one, HAS_CE=has_ce,
        SMOOTH=any(eps for _, _, eps in spec.terms), BM=bm, BV=bv, BK=bk, PREC=prec,
        UPCAST=interpret,
        num_warps=warps, num_stages=stages)

    ms, ls, mt, lt, a, bb, m1, l1, zl, zsum = part.unbind(0)

    def merge(mx: Tensor, sx: Tensor, extra: Tensor | None = None) -> tuple[Tensor, Tensor]:
        top = mx.amax(0)
        wgt = torch.exp(mx - top)
        tot = (sx * wgt).sum(0)
        mean = None if extra is None else (extra * wgt).sum(0) / tot
        return top + torch.log(tot), mean

    lse_s, e_q = merge(ms, ls, bb)                   # e_q = E_q[(z - t)/T]
    if has_t:
        lse_t, e_p = merge(mt, lt, a)                # e_p = E_p[(t - z)/T]
        fkl = e_p - lse_t + lse_s
        rkl = e_q - lse_s + lse_t
    else:
        lse_t = fkl = rkl = torch.zeros_like(lse_s)
    lse_1 = merge(m1, l1)[0] if need_one else lse_s
    valid = labels != IGNORE_INDEX
    nll = lse_1 - zl.sum(0)
    row_sum = zsum.sum(0)
    sums = []
    c_fkl = c_rkl = c_ce = 0.0
    eps = 0.0
    for (name, factor, smooth), c in zip(spec.terms, coef):
        if name == "forward_kl":
            value, c_fkl = fkl, c_fkl + c * factor * inv_t
        elif name == "reverse_kl":
            value, c_rkl = rkl, c_rkl + c * factor * inv_t
        else:
            value = (1.0 - smooth) * nll - smooth * (row_sum / v - lse_1) if smooth else nll
            value = torch.where(valid, value, 0.0)
            c_ce, eps = c_ce + c, smooth
        sums.append(value.sum() * factor)
    sums_t = torch.stack(sums).float()
    if not grad:
        return None, sums_t
    rowbuf = torch.stack([lse_s, lse_t, lse_1, rkl]).contiguous()
    bm, bv, bk, warps, stages = _INTERPRET_BLOCKS if interpret else BLOCKS["grad"]
    n_m = triton.cdiv(m, bm)
    dz = torch.empty((m, v), dtype=dz_dtype, device=dev)
    _grad_kernel[(n_m * triton.cdiv(v, bv),)](
        h, w, b if b is not None else dummy, th, tw, tb if tb is not None else dummy, labels,
        rowbuf, dz, m, v, k, th.shape[1], h.stride(0), w.stride(0), th.stride(0),
        tw.stride(0), dz.stride(0), inv_t, spec.s_cap or 1.0, spec.t_cap or 1.0,
        c_fkl, c_rkl, c_ce, eps,
        HAS_T=has_t, HAS_B=b is not None, HAS_TB=tb is not None, S_CAP=bool(spec.s_cap),
        T_CAP=bool(spec.t_cap), HAS_CE=has_ce, BM=bm, BV=bv, BK=bk, PREC=prec,
        UPCAST=interpret,
        num_warps=warps, num_stages=stages)
    return dz, sums_t


def flops(rows: int, vocab: int, hidden: int, teacher_hidden: int | None, grad: bool) -> float:
    """Matmul FLOPs of one chunk (both sweeps recompute the tiles), for MFU arithmetic."""
    per = 2.0 * rows * vocab * (hidden + (teacher_hidden or 0))
    return per * (2 if grad else 1) + (2 * 2.0 * rows * vocab * hidden if grad else 0.0)

