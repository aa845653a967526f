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

Supported: forward_kl, reverse_kl and jsd(beta) (one shared temperature, T^2 scaling as
losses.py), ce (label smoothing, -100 ignored), any weighted sum of them, student and teacher
softcaps, biases; a dense teacher given as (teacher hidden, teacher head) or a top-k teacher
with tail mass (the teacher cache).

jsd(beta) = beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q (losses.jsd, TRL's
generalized_jsd_loss; beta 0 / 1 are forward / reverse KL by definition). Its value and its
gradient c/T (1-beta) q (log q - log m - KL(q||m)) need both normalisers first, so a dense jsd
adds a third sweep (`_jsd_kernel`: KL(p||m), KL(q||m) per row) between the two.

Top-k teacher (losses._pair's K+1 buckets): no teacher matmul. The stats sweep gives the
student's log-normaliser at T=1 and its exact mass outside the K ids (an online logsumexp over
the columns not in the row's ids, read from a [rows x V/32] bitmap: exact however small); the
student logits at the ids are a [rows x K] gather-matmul in torch; the bucket terms and their
gradient g_b on K+1 entries are closed-form in torch; the gradient sweep writes the off-ids
gradient q_j (g_tail / Q_tail - sum g_b) and the ids' exact values are scattered over it.

Teacher log-probs are not clamped at LOG_FLOOR (exact whenever they are > -1e4, i.e. for any
finite logits of spread < 1e4 T). Anything else (tv, dense-logit teachers, other temperatures
per term, jsd terms with different betas) is refused by `kernel_spec`, and distill/fused/loop.py takes its
compiled/generic path. Runs on CUDA, and on CPU under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

IGNORE_INDEX = -100
LOG_FLOOR = -1.0e4   # as losses.LOG_FLOOR: the top-k buckets' clamp
_IGNORE = tl.constexpr(IGNORE_INDEX)   # (kernels may read globals only as constexpr)
N_STATS = 12  # ms, ls, mt, lt, a, b, m1, l1, zl, zsum, m_tail, l_tail
TEACHER_TERMS = ("forward_kl", "reverse_kl", "jsd")


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
def _logaddexp(a, b):
    hi = tl.maximum(a, b)
    return hi + tl.log(1.0 + tl.exp(tl.minimum(a, b) - hi))


@triton.jit
def _stats_kernel(h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tb_ptr, lab_ptr, bits_ptr, out_ptr,
                  M, V, K, KT, shm, swv, sthm, stwv, n_words, v_per_split, inv_t, s_cap,
                  t_cap,
                  HAS_T: tl.constexpr, HAS_B: tl.constexpr, HAS_TB: tl.constexpr,
                  S_CAP: tl.constexpr, T_CAP: tl.constexpr, NEED_ONE: tl.constexpr,
                  HAS_CE: tl.constexpr, SMOOTH: tl.constexpr, TOPK: tl.constexpr,
                  BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
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
    mtl = tl.full((BM,), neg, tl.float32)
    ltl = tl.zeros((BM,), tl.float32)
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
        if TOPK:  # logsumexp over the columns outside the row's top-k ids (bitmap bit = 0)
            word = tl.load(bits_ptr + rows[:, None] * n_words + cols[None, :] // 32,
                           mask=(rows[:, None] < M) & valid, other=0)
            member = ((word >> (cols[None, :] % 32)) & 1) != 0
            zt = tl.where(valid & (member == 0), z, neg)
            mtl_new = tl.maximum(mtl, tl.max(zt, 1))
            safe = tl.where(mtl_new == neg, 0.0, mtl_new)
            ltl = ltl * tl.exp(mtl - safe) + tl.sum(tl.exp(zt - safe[:, None]), 1)
            mtl = mtl_new
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
    tl.store(base + 10 * step, mtl, mask=keep)
    tl.store(base + 11 * step, ltl, mask=keep)


@triton.jit
def _jsd_kernel(h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tb_ptr, row_ptr, out_ptr,
                M, V, K, KT, shm, swv, sthm, stwv, v_per_split, inv_t, s_cap, t_cap,
                log_b, log_1b,
                HAS_B: tl.constexpr, HAS_TB: tl.constexpr, S_CAP: tl.constexpr,
                T_CAP: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Per row and vocab split: KL(p||m) and KL(q||m) partial sums, m = beta p + (1-beta) q,
    from the normalisers of the stats sweep (rows 0, 1 of row_ptr)."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < M
    lse_s = tl.load(row_ptr + rows, mask=rmask, other=0.0)
    lse_t = tl.load(row_ptr + M + rows, mask=rmask, other=0.0)
    kp = tl.zeros((BM,), tl.float32)
    kq = tl.zeros((BM,), tl.float32)
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BV):
        cols = v0 + tl.arange(0, BV)
        valid = cols[None, :] < v_end
        z, _ = _tile(h_ptr, w_ptr, b_ptr, rows, cols, M, V, K, shm, swv, HAS_B, S_CAP, s_cap,
                     BM, BV, BK, PREC, UPCAST)
        t, _ = _tile(th_ptr, tw_ptr, tb_ptr, rows, cols, M, V, KT, sthm, stwv, HAS_TB, T_CAP,
                     t_cap, BM, BV, BK, PREC, UPCAST)
        lq = z * inv_t - lse_s[:, None]
        lp = t * inv_t - lse_t[:, None]
        lm = _logaddexp(lp + log_b, lq + log_1b)
        kp += tl.sum(tl.where(valid, tl.exp(lp) * (lp - lm), 0.0), 1)
        kq += tl.sum(tl.where(valid, tl.exp(lq) * (lq - lm), 0.0), 1)
    base = out_ptr + split * M + rows
    tl.store(base, kp, mask=rmask)
    tl.store(base + n_splits * M, kq, mask=rmask)


@triton.jit
def _grad_kernel(h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tb_ptr, lab_ptr, row_ptr, dz_ptr,
                 M, V, K, KT, shm, swv, sthm, stwv, sdz, inv_t, s_cap, t_cap,
                 c_fkl, c_rkl, c_jsd, c_ce, eps, log_b, log_1b,
                 HAS_T: tl.constexpr, HAS_B: tl.constexpr, HAS_TB: tl.constexpr,
                 S_CAP: tl.constexpr, T_CAP: tl.constexpr, HAS_CE: tl.constexpr,
                 HAS_JSD: tl.constexpr, TOPK: tl.constexpr,
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
    # per-row inputs (see `_ROW`): lse_s (at T), lse_t, lse_1, rkl, KL(q||m), and for a top-k
    # teacher log Q_tail, g_tail, sum g_b
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
        if HAS_JSD:
            kqm = tl.load(row_ptr + 4 * M + rows, mask=rmask, other=0.0)
            lm = _logaddexp(lp + log_b, lq + log_1b)
            g += c_jsd * q * (lq - lm - kqm[:, None])
    if TOPK:  # off the ids: q_j (g_tail / Q_tail - G); the ids are overwritten afterwards
        log_tail = tl.load(row_ptr + 5 * M + rows, mask=rmask, other=0.0)
        g_tail = tl.load(row_ptr + 6 * M + rows, mask=rmask, other=0.0)
        g_all = tl.load(row_ptr + 7 * M + rows, mask=rmask, other=0.0)
        share = tl.exp(tl.minimum(lq - log_tail[:, None], 0.0))   # <= 1 off the ids
        g += g_tail[:, None] * share - g_all[:, None] * tl.exp(lq)
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
_ROW = ("lse_s", "lse_t", "lse_1", "rkl", "kl_qm", "log_tail", "g_tail", "g_sum")


@dataclass(frozen=True)
class KernelSpec:
    """What the kernels compute for one loss: per-term kinds and the shared temperature."""

    terms: tuple[tuple[str, float, float], ...]  # (name, T^2 factor or 1, smoothing or beta)
    temperature: float
    has_teacher: bool            # a dense teacher given as (teacher hidden, teacher head)
    s_cap: float | None
    t_cap: float | None
    topk: bool = False           # a top-k teacher with tail mass (the teacher cache)


def kernel_spec(terms: list[tuple[str, dict]], teacher_kind: str, s_cap: float | None,
                t_cap: float | None) -> tuple[KernelSpec | None, str]:
    """(spec, "") when the kernels can compute `terms` ((registered name, params) pairs, the
    loss functions already checked to be the registered ones) for a teacher of
    `teacher_kind` ("none", "hidden", "top-k", ...), else (None, why not)."""
    temps = set()
    out = []
    for name, params in terms:
        if name == "ce":
            out.append(("ce", 1.0, float(params.get("label_smoothing", 0.0))))
            continue
        if name not in TEACHER_TERMS:
            return None, f"loss {name!r} has no Triton kernel"
        t = float(params.get("temperature", 1.0))
        temps.add(t)
        factor = t * t if params.get("scale_by_t2", True) else 1.0
        beta = float(params.get("beta", 0.5)) if name == "jsd" else 0.0
        if name == "jsd" and beta in (0.0, 1.0):   # by definition (losses.jsd)
            name, beta = ("forward_kl" if beta == 0.0 else "reverse_kl"), 0.0
        out.append((name, factor, beta))
    if len({eps for name, _, eps in out if name == "ce"}) > 1:
        return None, "ce terms with different label smoothing"
    if len({beta for name, _, beta in out if name == "jsd"}) > 1:
        return None, "jsd terms with different beta"
    if len(temps) > 1:
        return None, f"teacher terms use different temperatures {sorted(temps)}"
    has_teacher = bool(temps)
    if has_teacher and teacher_kind not in ("hidden", "top-k"):
        return None, (f"teacher given as {teacher_kind} (the kernel takes teacher hidden states "
                      f"+ head, or top-k log-probs + tail)")
    dense = has_teacher and teacher_kind == "hidden"
    return KernelSpec(tuple(out), temps.pop() if temps else 1.0, dense, s_cap,
                      t_cap if dense else None, topk=has_teacher and not dense), ""


# (BM, BV, BK, num_warps, num_stages) per kernel; benchmarks/lm_head_kd_check.py measures
# candidates on the GPU and may set these. The interpreter uses tiny tiles (numpy per op).
BLOCKS = {"stats": (128, 128, 64, 8, 3), "grad": (128, 128, 64, 8, 4)}
# fp32 inputs (fp32 training, the fp64-checked tests) take `tl.dot(..., "ieee")`: no tensor
# cores, the dot unrolled into per-thread FMAs. At 128 x 128 x 64 that is 4,096 FMAs and 64
# fp32 accumulators per thread per tile, twice for a dense teacher: register spills and a
# compile that can take minutes (the suspected cause of the JSD case not finishing on a GPU in
# 120 s; benchmarks/kernel_tests_cuda.py times the compiles). Small tiles keep it fast.
BLOCKS_FP32 = {"stats": (64, 64, 32, 4, 2), "grad": (64, 64, 32, 4, 2)}
_INTERPRET_BLOCKS = (16, 32, 16, 1, 1)
TILES_PER_PROGRAM = [4]


def blocks(which: str, dtype: torch.dtype, interpret: bool) -> tuple[int, int, int, int, int]:
    """(BM, BV, BK, num_warps, num_stages) of kernel `which` ("stats" also serves the jsd
    sweep) for inputs of `dtype`: tiny tiles in the interpreter (numpy per op), small ones for
    fp32 (see BLOCKS_FP32), else BLOCKS."""
    if interpret:
        return _INTERPRET_BLOCKS
    return (BLOCKS_FP32 if dtype == torch.float32 else BLOCKS)[which]


def _merge(mx: Tensor, sx: Tensor, extra: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Partial online-softmax statistics [splits, rows] -> (logsumexp, weighted mean of
    `extra`); a row whose every split is empty (-inf) gets -inf."""
    top = mx.amax(0)
    top = torch.where(torch.isfinite(top), top, 0.0)
    wgt = torch.exp(mx - top)
    tot = (sx * wgt).sum(0)
    mean = None if extra is None else (extra * wgt).sum(0) / tot
    return top + torch.log(tot), mean


def _bitmap(ids: Tensor, vocab: int) -> Tensor:
    """[rows, ceil(V/32)] int32 words, bit j % 32 of word j // 32 set for each id j of the row
    (ids distinct within a row, so adding the bits is or-ing them)."""
    ids = ids.long()
    bit = ids % 32
    value = torch.where(bit == 31, -(2 ** 31), torch.ones_like(bit) << bit).to(torch.int32)
    words = torch.zeros((ids.shape[0], triton.cdiv(vocab, 32)), dtype=torch.int32,
                        device=ids.device)
    return words.scatter_add_(1, ids // 32, value)


def _cap(x: Tensor, cap: float | None) -> tuple[Tensor, Tensor | float]:
    """(cap * tanh(x / cap), its derivative), or (x, 1) without a cap."""
    if not cap:
        return x, 1.0
    y = torch.tanh(x / cap)
    return cap * y, 1.0 - y * y


def _bucket_terms(spec: KernelSpec, coef: list[float], bs: Tensor, bt: Tensor
                  ) -> tuple[dict[int, Tensor], Tensor | None]:
    """The teacher terms on K+1 buckets as losses._pair builds them (each side divided by T
    and renormalised; the teacher's clamped at LOG_FLOOR): per-row values by term index, and
    d(loss)/d bs (None without teacher terms). bs are the student's bucket log-probs at T=1."""
    inv_t = 1.0 / spec.temperature
    lq = torch.log_softmax(bs * inv_t, dim=-1)
    lp = torch.log_softmax(bt * inv_t, dim=-1).clamp(min=LOG_FLOOR)
    q, p = lq.exp(), lp.exp()
    values, gb = {}, None
    for i, ((name, factor, beta), c) in enumerate(zip(spec.terms, coef)):
        c = c * factor * inv_t
        if name == "forward_kl":
            values[i] = (p * (lp - lq)).sum(-1)
            gi = (q - p) * c
        elif name == "reverse_kl":
            values[i] = (q * (lq - lp)).sum(-1)
            gi = q * (lq - lp - values[i][:, None]) * c
        elif name == "jsd":
            lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
            kq = (q * (lq - lm)).sum(-1)
            values[i] = beta * (p * (lp - lm)).sum(-1) + (1.0 - beta) * kq
            gi = q * (lq - lm - kq[:, None]) * (c * (1.0 - beta))
        else:
            continue
        gb = gi if gb is None else gb + gi
    return values, gb


def _topk_side(spec: KernelSpec, coef: list[float], h: Tensor, w: Tensor, b: Tensor | None,
               topk: tuple[Tensor, Tensor, Tensor], labels: Tensor, lse_1: Tensor,
               log_tail: Tensor, grad: bool
               ) -> tuple[dict[int, Tensor], Tensor | None, dict[str, Tensor]]:
    """The top-k teacher's part of a chunk, on [rows x K] tensors in torch: (per-row values of
    the teacher terms by term index, d loss/d logits at the ids (incl. ce; None without
    teacher terms or `grad`), the grad sweep's per-row inputs for the off-ids columns)."""
    ids = topk[0].long()
    with torch.no_grad():   # student logits at the ids: a [rows x K] gather-matmul
        raw_ids = torch.bmm(w[ids].float(), h.float()[:, :, None])[:, :, 0]
        if b is not None:
            raw_ids = raw_ids + b.float()[ids]
    z_ids, cap_ids = _cap(raw_ids, spec.s_cap)
    lq_ids = z_ids - lse_1[:, None]
    bs = torch.cat([lq_ids, log_tail.clamp(min=LOG_FLOOR)[:, None]], dim=1)
    bt = torch.cat([topk[1].float(), topk[2].float()[:, None]], dim=1)
    values, gb = _bucket_terms(spec, coef, bs, bt)
    if gb is None or not grad:
        return values, None, {}
    g_sum = gb.sum(-1)
    g_ids = gb[:, :-1] - g_sum[:, None] * lq_ids.exp()
    valid = labels != IGNORE_INDEX
    for (name, _, smooth), c in zip(spec.terms, coef):
        if name == "ce":   # the sweep's ce gradient is overwritten at the ids: add it here
            hot = (ids == labels[:, None]).float()
            g_ids = g_ids + torch.where(valid, c, 0.0)[:, None] * (
                lq_ids.exp() - (1.0 - smooth) * hot - smooth / w.shape[0])
    return values, g_ids * cap_ids, {"log_tail": log_tail, "g_tail": gb[:, -1],
                                     "g_sum": g_sum}


def chunk(spec: KernelSpec, coef: list[float], h: Tensor, w: Tensor, b: Tensor | None,
          th: Tensor | None, tw: Tensor | None, tb: Tensor | None, labels: Tensor,
          grad: bool, dz_dtype: torch.dtype,
          topk: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor | None, Tensor]:
    """One chunk: (d loss/d logits [rows, V] in dz_dtype or None, per-term sums [terms] fp32),
    with the conventions of fused/fast.dense_body (sums include the T^2 factor; loss = coef . sums).

    h [M,K] and w [V,K] share a dtype (bf16/fp16/fp32), as do th [M,KT] and tw [V,KT]. A
    top-k teacher (spec.topk) comes as `topk` = (ids [M,k], log-probs [M,k], tail [M]) of the
    chunk's rows, as TopKTeacher holds them."""
    import os

    m, k = h.shape
    v = w.shape[0]
    dev = h.device
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    bm, bv, bk, warps, stages = blocks("stats", h.dtype, interpret)
    prec = "ieee" if h.dtype == torch.float32 else "tf32"
    h, w = h.contiguous(), w.contiguous()
    has_t = spec.has_teacher
    if has_t:
        th, tw = th.contiguous(), tw.contiguous()
    else:
        th, tw, tb = h, w, None
    if spec.topk and topk is None:
        raise ValueError("chunk: a top-k spec needs topk=(ids, log-probs, tail)")
    # a top-k teacher's buckets hold the student at T=1: the sweep's normaliser is lse_1
    inv_t = 1.0 if spec.topk else 1.0 / spec.temperature
    has_ce = any(name == "ce" for name, _, _ in spec.terms)
    need_one = has_ce and inv_t != 1.0
    labels = labels.contiguous()
    bits = _bitmap(topk[0], v) if spec.topk else labels
    n_m = triton.cdiv(m, bm)
    # Vocab splits of TILES_PER_PROGRAM tiles: many short programs, so several are resident
    # per SM and one's softmax arithmetic overlaps another's matmul (measured on an H200).
    v_per = TILES_PER_PROGRAM[0] * bv
    splits = triton.cdiv(v, v_per)
    part = torch.empty((N_STATS, splits, m), dtype=torch.float32, device=dev)
    dummy = h
    common = (m, v, k, th.shape[1], h.stride(0), w.stride(0), th.stride(0), tw.stride(0))
    caps = (spec.s_cap or 1.0, spec.t_cap or 1.0)
    ptrs = (h, w, b if b is not None else dummy, th, tw, tb if tb is not None else dummy)
    flags = {"HAS_B": b is not None, "HAS_TB": tb is not None, "S_CAP": bool(spec.s_cap),
             "T_CAP": bool(spec.t_cap), "PREC": prec, "UPCAST": interpret}
    _stats_kernel[(n_m, splits)](
        *ptrs, labels, bits, part, *common, bits.shape[-1] if spec.topk else 0, v_per, inv_t,
        *caps, HAS_T=has_t, NEED_ONE=need_one, HAS_CE=has_ce,
        SMOOTH=has_ce and any(eps for n, _, eps in spec.terms if n == "ce"), TOPK=spec.topk,
        BM=bm, BV=bv, BK=bk, num_warps=warps, num_stages=stages, **flags)

    ms, ls, mt, lt, a, bb, m1, l1, zl, zsum, mtl, ltl = part.unbind(0)
    lse_s, e_q = _merge(ms, ls, bb)                  # e_q = E_q[(z - t)/T]
    if has_t:
        lse_t, e_p = _merge(mt, lt, a)               # e_p = E_p[(t - z)/T]
        fkl = e_p - lse_t + lse_s
        rkl = e_q - lse_s + lse_t
    else:
        lse_t = fkl = rkl = torch.zeros_like(lse_s)
    lse_1 = _merge(m1, l1)[0] if need_one else lse_s
    zero = torch.zeros_like(lse_s)
    rowbuf = {"lse_s": lse_s, "lse_t": lse_t, "lse_1": lse_1, "rkl": rkl}
    jsd_beta = next((beta for name, _, beta in spec.terms if name == "jsd"), None)
    log_b = log_1b = 0.0
    kl_pm = kl_qm = zero
    if jsd_beta is not None and has_t:   # third sweep: KL(p||m), KL(q||m)
        log_b, log_1b = math.log(jsd_beta), math.log1p(-jsd_beta)
        jpart = torch.empty((2, splits, m), dtype=torch.float32, device=dev)
        _jsd_kernel[(n_m, splits)](
            *ptrs, torch.stack([lse_s, lse_t]).contiguous(), jpart, *common, v_per, inv_t,
            *caps, log_b, log_1b, BM=bm, BV=bv, BK=bk, num_warps=warps, num_stages=stages,
            **flags)
        kl_pm, kl_qm = jpart.sum(1).unbind(0)
        rowbuf["kl_qm"] = kl_qm
    bucket_values, dz_ids = {}, None
    if spec.topk:
        log_tail = _merge(mtl, ltl)[0] - lse_1       # exact log mass outside the ids
        bucket_values, dz_ids, rows = _topk_side(spec, coef, h, w, b, topk, labels, lse_1,
                                                 log_tail, grad)
        rowbuf.update(rows)
    valid = labels != IGNORE_INDEX
    nll = lse_1 - zl.sum(0)
    row_sum = zsum.sum(0)
    sums = []
    c_fkl = c_rkl = c_jsd = c_ce = 0.0
    eps = 0.0
    for i, ((name, factor, extra), c) in enumerate(zip(spec.terms, coef)):
        if i in bucket_values:
            value = bucket_values[i]
        elif name == "forward_kl":
            value, c_fkl = fkl, c_fkl + c * factor * inv_t
        elif name == "reverse_kl":
            value, c_rkl = rkl, c_rkl + c * factor * inv_t
        elif name == "jsd":
            value = extra * kl_pm + (1.0 - extra) * kl_qm
            c_jsd += c * factor * inv_t * (1.0 - extra)
        else:
            smooth = extra
            value = (1.0 - smooth) * nll - smooth * (row_sum / v - lse_1) if smooth else nll
            value = torch.where(valid, value, 0.0)
            c_ce, eps = c_ce + c, smooth
        sums.append(value.sum() * factor)
    sums_t = torch.stack(sums).float()
    if not grad:
        return None, sums_t
    rowbuf = torch.stack([rowbuf.get(key, zero) for key in _ROW]).contiguous()
    bm, bv, bk, warps, stages = blocks("grad", h.dtype, interpret)
    n_m = triton.cdiv(m, bm)
    dz = torch.empty((m, v), dtype=dz_dtype, device=dev)
    _grad_kernel[(n_m * triton.cdiv(v, bv),)](
        *ptrs, labels, rowbuf, dz, *common, dz.stride(0), inv_t, *caps,
        c_fkl, c_rkl, c_jsd, c_ce, eps, log_b, log_1b,
        HAS_T=has_t, HAS_CE=has_ce, HAS_JSD=c_jsd != 0.0, TOPK=dz_ids is not None,
        BM=bm, BV=bv, BK=bk, num_warps=warps, num_stages=stages, **flags)
    if dz_ids is not None:   # the ids' exact gradient over the sweep's off-ids formula
        dz.scatter_(1, topk[0].long(), dz_ids.to(dz.dtype))
    return dz, sums_t


def flops(rows: int, vocab: int, hidden: int, teacher_hidden: int | None, grad: bool,
          sweeps: int = 2) -> float:
    """Matmul FLOPs of one chunk, for MFU arithmetic: every vocab sweep recomputes the tiles
    (2 sweeps; 3 for a dense jsd; the gradient sweep only when `grad`), plus the two head
    gradient GEMMs. A top-k teacher has no teacher matmul (teacher_hidden None)."""
    per = 2.0 * rows * vocab * (hidden + (teacher_hidden or 0))
    head_grads = 2 * 2.0 * rows * vocab * hidden if grad else 0.0
    return per * (sweeps if grad else sweeps - 1) + head_grads
