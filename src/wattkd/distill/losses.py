"""The KD losses: small pure tensor functions, registered by name (see registry.py).

Three kinds, three call shapes:

* **logit** (per token, unreduced; the caller masks and averages, usually `distill/fused`):
  ``fn(s_logits [N,V], teacher: DenseTeacher | TopKTeacher | None, labels [N], *, params)
  -> Tensor[N]``. Student logits may be a plain tensor or a `LogitChunk`, which memoises the
  log-softmax so several terms on one chunk share it.
* **feature**: ``fn(s [N,H], t [N,H], mask=None, *, params) -> scalar`` (already projected).
* **relation**: ``fn(s [B,Ds], t [B,Dt], mask=None, *, params) -> scalar`` (Ds may differ from Dt).

Conventions for the divergences. p_t is the teacher, q_s the student, both at temperature T:
``forward_kl = KL(p_t || q_s)`` (mass-covering), ``reverse_kl = KL(q_s || p_t)`` (mode-seeking).
With ``scale_by_t2`` the value is multiplied by T^2 so gradient magnitudes do not shrink as T
grows (Hinton et al. 2015). Teacher log-probs of 0-probability entries (-inf) are floored at
LOG_FLOOR; student logits must be finite (a linear head's are).

Top-k teachers (the teacher cache) give log-probs of K ids under the FULL softmax at T=1 plus
the log of the mass outside them. Both distributions are then compared on K+1 buckets: the K
ids and one tail bucket; the student's tail is its exact mass outside the K ids (a masked
logsumexp, not 1 - sum, so it stays accurate when tiny). With K = V this equals the dense loss.
Temperature on buckets (an approximation, exact at T=1 and for K=V): each side's K+1 bucket
log-probs are divided by T and renormalised, i.e. the tail is tempered as if it were one token.
For T > 1 this under-weights the tail relative to tempering every tail token (sum p_i^(1/T) >=
(sum p_i)^(1/T)); it is applied identically to student and teacher, so a student equal to the
teacher still has zero loss and the minimiser is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from wattkd.distill.registry import (
    HALF_OPEN_UNIT,
    POSITIVE,
    UNIT_INTERVAL,
    LabelForm,
    TeacherForm,
    register_loss,
)

# Log-probabilities are clamped here before entering a divergence: p = 0 (log p = -inf, e.g. an
# empty tail bucket or a masked vocab entry) is treated as p = e^-10000. Below ~-104 (fp32) the
# probability is exactly 0 anyway, so forward terms are unchanged; reverse terms stay finite and
# gradients stay free of NaN (0 * -inf) and of optimiser-breaking 1e38 values.
LOG_FLOOR = -1.0e4
IGNORE_INDEX = -100
MAX_ANGLE_ROWS = 1024  # rkd_angle builds a [B,B,B] tensor


# ------------------------------------------------------------------------------ logit inputs
class LogitChunk:
    """Student logits [N,V] whose log-softmax (per temperature) and top-k buckets are computed
    once and shared by every loss term evaluated on this chunk."""

    __slots__ = ("_buckets", "_logp", "logits")

    def __init__(self, logits: Tensor):
        if logits.dim() != 2:
            raise ValueError(f"student logits must be [tokens, vocab], got {tuple(logits.shape)}")
        self.logits = logits
        self._logp: dict[float, Tensor] = {}
        self._buckets: dict[int, tuple[Tensor, Tensor]] = {}

    def log_probs(self, temperature: float = 1.0) -> Tensor:
        t = float(temperature)
        if t not in self._logp:
            z = self.logits if t == 1.0 else self.logits / t
            self._logp[t] = F.log_softmax(z, dim=-1)
        return self._logp[t]

    def buckets(self, ids: Tensor) -> Tensor:
        """[N, K+1] log-probs at T=1: the K ids, then the exact mass outside them."""
        hit = self._buckets.get(id(ids))
        if hit is not None and hit[0] is ids:  # the memo holds `ids`, so its id is not reused
            return hit[1]
        logp = self.log_probs(1.0)
        idx = ids.long()
        value = torch.cat([logp.gather(1, idx), _TailLogProb.apply(logp, idx)[:, None]], dim=1)
        self._buckets[id(ids)] = (ids, value)
        return value


class _TailLogProb(torch.autograd.Function):
    """log of the mass outside `ids` = logsumexp of logp over the other entries. Exact even when
    tiny (1 - sum(top) would round to 0), and unlike autograd through a masked copy it keeps no
    extra [N,V] tensor for backward: d tail / d logp_j = exp(logp_j - tail) off the ids, else 0."""

    @staticmethod
    def forward(ctx: Any, logp: Tensor, ids: Tensor) -> Tensor:
        tail = torch.logsumexp(logp.scatter(1, ids, LOG_FLOOR), dim=-1)
        ctx.save_for_backward(logp, ids, tail)
        return tail

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        logp, ids, tail = ctx.saved_tensors
        # <= 0 off the ids; the clamp only tames the ids' entries, which are zeroed next.
        g = (logp - tail[:, None]).clamp_(max=0.0).exp_().mul_(grad[:, None])
        return g.scatter_(1, ids, 0.0), None


def upcast(x: Tensor) -> Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 stay as they are (fp64 is what gradcheck needs)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def as_chunk(s_logits: Tensor | LogitChunk) -> LogitChunk:
    return s_logits if isinstance(s_logits, LogitChunk) else LogitChunk(s_logits)


@dataclass(eq=False)
class DenseTeacher:
    """Full teacher logits [N,V] (any float dtype; used in fp32)."""

    logits: Tensor
    _logp: dict[float, Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.logits.dim() != 2:
            raise ValueError(f"DenseTeacher.logits must be [tokens, vocab], "
                             f"got {tuple(self.logits.shape)}")

    @property
    def num_tokens(self) -> int:
        return self.logits.shape[0]

    def take(self, rows: slice | Tensor) -> DenseTeacher:
        return DenseTeacher(upcast(self.logits[rows]))

    def log_probs(self, temperature: float = 1.0) -> Tensor:
        """Clamped at LOG_FLOOR (in place when no gradient is needed: one [N,V] less)."""
        t = float(temperature)
        if t not in self._logp:
            z = upcast(self.logits)
            logp = F.log_softmax(z if t == 1.0 else z / t, dim=-1)
            self._logp[t] = (logp.clamp(min=LOG_FLOOR) if logp.requires_grad
                             else logp.clamp_(min=LOG_FLOOR))
        return self._logp[t]


@dataclass(eq=False)
class TopKTeacher:
    """Teacher logits as top-k, the one top-k type (online, cached, decoded): ids [..., K],
    log-probs [..., K] under the full softmax at T=1 (not renormalised over the K), and
    tail_logprob [...] = log of the probability outside the K. The fused loss takes it per
    token ([N, K], `flat_tokens`). Ids must be distinct within a row (as torch.topk gives)."""

    ids: Tensor
    logprobs: Tensor
    tail_logprob: Tensor

    def __post_init__(self) -> None:
        if self.ids.dim() < 2 or self.logprobs.shape != self.ids.shape:
            raise ValueError(f"TopKTeacher: ids and logprobs must both be [..., k], got "
                             f"{tuple(self.ids.shape)} and {tuple(self.logprobs.shape)}")
        if self.tail_logprob.shape != self.ids.shape[:-1]:
            raise ValueError(f"TopKTeacher: tail_logprob must be {tuple(self.ids.shape[:-1])} "
                             f"(ids without k), got {tuple(self.tail_logprob.shape)}")
        if self.ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"TopKTeacher: ids must be an integer tensor, got {self.ids.dtype}")

    def flat_tokens(self) -> TopKTeacher:
        """[B, L, K] per sequence -> [B*L, K] per token (what the fused loss takes)."""
        k = self.ids.shape[-1]
        return TopKTeacher(self.ids.reshape(-1, k), self.logprobs.reshape(-1, k),
                           self.tail_logprob.reshape(-1))

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[0]

    def take(self, rows: slice | Tensor) -> TopKTeacher:
        return TopKTeacher(self.ids[rows].long(), upcast(self.logprobs[rows]),
                           upcast(self.tail_logprob[rows]))

    def buckets(self) -> Tensor:
        """[N, K+1] log-probs: the K ids, then the tail."""
        return torch.cat([upcast(self.logprobs), upcast(self.tail_logprob)[:, None]], dim=1)


TeacherChunk = DenseTeacher | TopKTeacher


def _pair(s_logits: Tensor | LogitChunk, teacher: TeacherChunk | None, temperature: float,
          loss: str) -> tuple[Tensor, Tensor]:
    """(student, teacher) log-probs at `temperature` on a common support.

    The teacher's are clamped at LOG_FLOOR; the student's are not (a clamp would keep another
    [N,V] copy alive for backward): student logits must be finite, as a linear head gives."""
    s = as_chunk(s_logits)
    if isinstance(teacher, DenseTeacher):
        if teacher.logits.shape != s.logits.shape:
            raise ValueError(f"{loss}: teacher logits {tuple(teacher.logits.shape)} do not match "
                             f"student logits {tuple(s.logits.shape)}")
        logq, logp = s.log_probs(temperature), teacher.log_probs(temperature)
    elif isinstance(teacher, TopKTeacher):
        if teacher.ids.shape[0] != s.logits.shape[0]:
            raise ValueError(f"{loss}: teacher has {teacher.ids.shape[0]} tokens, student "
                             f"{s.logits.shape[0]}")
        bs, bt = s.buckets(teacher.ids), teacher.buckets()
        if temperature != 1.0:
            bs = bs / temperature
        # The teacher side is always renormalised: fp16 cache rounding must not leave mass != 1.
        logq = F.log_softmax(bs, dim=-1)
        logp = F.log_softmax(bt / temperature, dim=-1).clamp(min=LOG_FLOOR)
    else:
        raise TypeError(f"{loss} needs a DenseTeacher or TopKTeacher, got {type(teacher).__name__}")
    return logq, logp


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) over the last dim, from finite log-probs."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _t2(value: Tensor, temperature: float, scale_by_t2: bool) -> Tensor:
    return value * (temperature * temperature) if scale_by_t2 else value


# ----------------------------------------------------------------------------- logit losses
# A closed form beside a loss (registered with it) lets the fused loss's fast path compute the value
# and d(value)/d(logits) without autograd: no graph, no [chunk x V] fp32 copies once compiled.
# It must compute exactly what the loss computes (tests/test_fused_fast.py checks each).
_T_CHECK = {"temperature": POSITIVE}


def _forward_kl_pair(lq: Tensor, lp: Tensor, grad: bool) -> tuple[Tensor, Tensor | None]:
    """KL(p || q) per row and its gradient w.r.t. the student's tempered logits: q - p."""
    p = lp.exp()
    value = (p * (lp - lq)).sum(-1)
    return value, (lq.exp() - p) if grad else None


def _reverse_kl_pair(lq: Tensor, lp: Tensor, grad: bool) -> tuple[Tensor, Tensor | None]:
    """KL(q || p) per row and its gradient w.r.t. the student's tempered logits:
    q (log q - log p - KL)."""
    q = lq.exp()
    diff = lq - lp
    value = (q * diff).sum(-1)
    return value, q * (diff - value[:, None]) if grad else None


@register_loss("forward_kl", kind="logit", checks=_T_CHECK,
               closed_form=TeacherForm(_forward_kl_pair))
def forward_kl(s_logits: Tensor | LogitChunk, teacher: TeacherChunk | None, labels: Tensor | None,
               *, temperature: float = 1.0, scale_by_t2: bool = True) -> Tensor:
    """KL(p_t || q_s) per token: the student covers every mode of the teacher."""
    logq, logp = _pair(s_logits, teacher, temperature, "forward_kl")
    return _t2(_kl(logp, logq), temperature, scale_by_t2)


@register_loss("reverse_kl", kind="logit", checks=_T_CHECK,
               closed_form=TeacherForm(_reverse_kl_pair))
def reverse_kl(s_logits: Tensor | LogitChunk, teacher: TeacherChunk | None, labels: Tensor | None,
               *, temperature: float = 1.0, scale_by_t2: bool = True) -> Tensor:
    """KL(q_s || p_t) per token: the student seeks the teacher's main mode (MiniLLM)."""
    logq, logp = _pair(s_logits, teacher, temperature, "reverse_kl")
    return _t2(_kl(logq, logp), temperature, scale_by_t2)


def _jsd_pair(lq: Tensor, lp: Tensor, grad: bool, *, beta: float
              ) -> tuple[Tensor, Tensor | None]:
    """JSD(beta) per row (forward KL at beta = 0, reverse KL at 1, as `jsd`) and its gradient
    w.r.t. the student's tempered logits: d/dq = (1 - beta)(log q - log m), so
    (1 - beta) q (d - sum q d) with d = log q - log m (the p-terms cancel through m)."""
    if beta == 0.0:
        return _forward_kl_pair(lq, lp, grad)
    if beta == 1.0:
        return _reverse_kl_pair(lq, lp, grad)
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    value = beta * _kl(lp, lm) + (1.0 - beta) * _kl(lq, lm)
    if not grad:
        return value, None
    q = lq.exp()
    d = lq - lm
    return value, (1.0 - beta) * q * (d - (q * d).sum(-1, keepdim=True))


def _tv_pair(lq: Tensor, lp: Tensor, grad: bool) -> tuple[Tensor, Tensor | None]:
    """0.5 sum |p - q| per row and its gradient w.r.t. the student's tempered logits:
    0.5 q (s - sum q s) with s = sign(q - p) (0 where they are equal, as autograd's abs)."""
    q = lq.exp()
    diff = lp.exp() - q
    value = 0.5 * diff.abs().sum(-1)
    if not grad:
        return value, None
    sign = torch.sign(-diff)
    return value, 0.5 * q * (sign - (q * sign).sum(-1, keepdim=True))


@register_loss("jsd", kind="logit", checks={**_T_CHECK, "beta": UNIT_INTERVAL},
               closed_form=TeacherForm(_jsd_pair))
def jsd(s_logits: Tensor | LogitChunk, teacher: TeacherChunk | None, labels: Tensor | None,
        *, beta: float = 0.5, temperature: float = 1.0, scale_by_t2: bool = True) -> Tensor:
    """Generalised JSD of GKD (Agarwal et al. 2024, Eq. 1; TRL `generalized_jsd_loss`).

    M = beta * p_t + (1 - beta) * q_s;  JSD(beta) = beta * KL(p_t || M) + (1 - beta) * KL(q_s || M).
    By definition (as in TRL) beta = 0 is forward KL(p_t || q_s) and beta = 1 is reverse
    KL(q_s || p_t). In between the value vanishes at both ends like beta*(1-beta) (JSD/beta ->
    forward KL as beta -> 0, JSD/(1-beta) -> reverse KL as beta -> 1), so it is discontinuous at
    exactly 0 and 1: compare weights across beta with that in mind. beta = 0.5 is the classic JSD.
    """
    if beta == 0.0:
        return forward_kl(s_logits, teacher, labels, temperature=temperature,
                          scale_by_t2=scale_by_t2)
    if beta == 1.0:
        return reverse_kl(s_logits, teacher, labels, temperature=temperature,
                          scale_by_t2=scale_by_t2)
    logq, logp = _pair(s_logits, teacher, temperature, "jsd")
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
    value = beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)
    return _t2(value, temperature, scale_by_t2)


@register_loss("tv", kind="logit", checks=_T_CHECK, closed_form=TeacherForm(_tv_pair))
def tv(s_logits: Tensor | LogitChunk, teacher: TeacherChunk | None, labels: Tensor | None,
       *, temperature: float = 1.0, scale_by_t2: bool = True) -> Tensor:
    """Total variation 0.5 * sum |p_t - q_s| per token (bounded in [0, 1] before T^2)."""
    logq, logp = _pair(s_logits, teacher, temperature, "tv")
    return _t2(0.5 * (logp.exp() - logq.exp()).abs().sum(-1), temperature, scale_by_t2)


def _ce_value(logp: Tensor, labels: Tensor, *, label_smoothing: float) -> Tensor:
    """ce per row from the student's log-probs; 0 where label = -100."""
    valid = labels != IGNORE_INDEX
    nll = -logp.gather(1, torch.where(valid, labels, 0).long()[:, None])[:, 0]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    return torch.where(valid, nll, 0.0)


def _ce_grad(logq1: Tensor, cols: Tensor, labels: Tensor, c: Tensor, vocab: int, *,
             label_smoothing: float) -> Tensor:
    """c * d ce/d logits at columns `cols` ([1,V] = all, or [N,K]) whose student log-probs
    are `logq1`: q - (1-eps) onehot(label) - eps/V, 0 where label = -100."""
    eps = label_smoothing
    valid = labels != IGNORE_INDEX
    hot = (cols == labels[:, None]).to(logq1.dtype)
    scale = torch.where(valid, c, 0.0)[:, None]
    return (logq1.exp() - (1.0 - eps) * hot - eps / vocab) * scale


@register_loss("ce", kind="logit", needs_teacher=False, needs_labels=True,
               checks={"label_smoothing": HALF_OPEN_UNIT},
               closed_form=LabelForm(_ce_value, _ce_grad))
def ce(s_logits: Tensor | LogitChunk, teacher: TeacherChunk | None, labels: Tensor,
       *, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy on labels per token; label -100 gives 0 (and no gradient)."""
    s = as_chunk(s_logits)
    if labels is None or labels.shape != s.logits.shape[:1]:
        got = None if labels is None else tuple(labels.shape)
        raise ValueError(f"ce: labels must be [tokens]={s.logits.shape[0]}, got {got}")
    return _ce_value(s.log_probs(1.0), labels, label_smoothing=label_smoothing)


# ---------------------------------------------------------------------------- feature losses
def _rows(name: str, s: Tensor, t: Tensor, mask: Tensor | None, same_dim: bool
          ) -> tuple[Tensor, Tensor]:
    """Flatten leading dims to rows, check shapes, keep masked rows, compute in fp32 (or fp64)."""
    if s.dim() < 2 or t.dim() < 2:
        raise ValueError(f"{name}: inputs must be [rows, dim] (or [..., dim]), got "
                         f"{tuple(s.shape)} and {tuple(t.shape)}")
    if s.shape[:-1] != t.shape[:-1] or (same_dim and s.shape[-1] != t.shape[-1]):
        want = "the same shape" if same_dim else "the same leading shape"
        raise ValueError(f"{name}: student {tuple(s.shape)} and teacher {tuple(t.shape)} must "
                         f"have {want}" + (" (project the student first)" if same_dim else ""))
    dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
    s2, t2 = s.reshape(-1, s.shape[-1]).to(dtype), t.reshape(-1, t.shape[-1]).to(dtype)
    if mask is not None:
        if mask.shape != s.shape[:-1]:
            raise ValueError(f"{name}: mask {tuple(mask.shape)} must match the rows of the "
                             f"inputs {tuple(s.shape[:-1])}")
        keep = mask.reshape(-1) != 0
        s2, t2 = s2[keep], t2[keep]
    return s2, t2


def _mean_or_zero(per_row: Tensor) -> Tensor:
    # An empty selection gives 0 (connected to the graph), never NaN.
    return per_row.sum() / max(per_row.shape[0], 1)


@register_loss("hidden_mse", kind="feature")
def hidden_mse(s: Tensor, t: Tensor, mask: Tensor | None = None, *,
               normalize: bool = False) -> Tensor:
    """Mean squared error per element over masked tokens; `normalize` compares unit vectors,
    which ignores the (often large, layer-dependent) scale of hidden states."""
    s2, t2 = _rows("hidden_mse", s, t, mask, same_dim=True)
    if normalize:
        s2, t2 = F.normalize(s2, dim=-1), F.normalize(t2, dim=-1)
    return _mean_or_zero((s2 - t2).pow(2).mean(-1))


@register_loss("hidden_cosine", kind="feature")
def hidden_cosine(s: Tensor, t: Tensor, mask: Tensor | None = None) -> Tensor:
    """1 - cosine similarity, averaged over masked tokens: aligns directions, not scale."""
    s2, t2 = _rows("hidden_cosine", s, t, mask, same_dim=True)
    return _mean_or_zero(1.0 - F.cosine_similarity(s2, t2, dim=-1, eps=1e-8))


# --------------------------------------------------------------------------- relation losses
def _pairwise_dist(e: Tensor) -> Tensor:
    """[B,B] Euclidean distances. Centred first: distances are translation invariant and the
    Gram form |a|^2 + |b|^2 - 2ab loses less precision around the origin."""
    e = e - e.mean(0, keepdim=True)
    sq = e.pow(2).sum(-1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * e @ e.T).clamp(min=1e-12)
    return d2.sqrt()


@register_loss("rkd_distance", kind="relation", checks={"delta": POSITIVE})
def rkd_distance(s: Tensor, t: Tensor, mask: Tensor | None = None, *,
                 delta: float = 1.0) -> Tensor:
    """RKD distance (Park et al. 2019): pairwise distances, each set divided by its mean over
    pairs i != j, compared with smooth L1 (Huber, `delta`) averaged over pairs i < j.
    (Park averages over all B^2 entries incl. the zero diagonal: a constant factor (B-1)/B.)"""
    s2, t2 = _rows("rkd_distance", s, t, mask, same_dim=False)
    b = s2.shape[0]
    if b < 2:
        raise ValueError(f"rkd_distance needs at least 2 rows (embeddings), got {b}")
    iu = torch.triu_indices(b, b, offset=1, device=s2.device)
    ds, dt = _pairwise_dist(s2)[iu[0], iu[1]], _pairwise_dist(t2)[iu[0], iu[1]]
    ds = ds / ds.mean().clamp(min=1e-12)
    dt = dt / dt.mean().clamp(min=1e-12)
    return F.smooth_l1_loss(ds, dt, beta=delta)


def _angles(e: Tensor) -> tuple[Tensor, Tensor]:
    """[B,B,B] cosines of the angle at vertex j between e_i - e_j and e_k - e_j, from the Gram
    matrix (no [B,B,D] tensor): <e_i-e_j, e_k-e_j> = G_ik - G_ij - G_jk + G_jj; and the [B,B]
    mask of (near-)coincident pairs, where the angle is undefined. The Gram form loses about
    sqrt(eps) of the largest distance to rounding, so pairs closer than that are coincident:
    their "cosine" would be rounding noise (values up to 3 were seen)."""
    e = e - e.mean(0, keepdim=True)
    g = e @ e.T
    diag = g.diagonal()
    d2 = diag[:, None] + diag[None, :] - 2.0 * g
    d = d2.clamp(min=1e-12).sqrt()  # d[i, j]
    tol = 16.0 * math.sqrt(torch.finfo(e.dtype).eps) * d.max().detach()
    close = d.detach() <= tol
    inner = g[:, None, :] - g[:, :, None] - g.T[None, :, :] + diag[None, :, None]
    return inner / (d[:, :, None] * d.T[None, :, :]), close


@register_loss("rkd_angle", kind="relation", checks={"delta": POSITIVE})
def rkd_angle(s: Tensor, t: Tensor, mask: Tensor | None = None, *, delta: float = 1.0) -> Tensor:
    """RKD angle (Park et al. 2019): cosines of the angles of all triplets of distinct rows,
    smooth L1 (`delta`) averaged over those B(B-1)(B-2) triplets. O(B^3) memory: use pooled
    embeddings or subsample tokens (at most MAX_ANGLE_ROWS rows)."""
    s2, t2 = _rows("rkd_angle", s, t, mask, same_dim=False)
    b = s2.shape[0]
    if b < 3:
        raise ValueError(f"rkd_angle needs at least 3 rows (embeddings), got {b}")
    if b > MAX_ANGLE_ROWS:
        raise ValueError(f"rkd_angle got {b} rows; its [B,B,B] tensor needs B <= "
                         f"{MAX_ANGLE_ROWS}: pool or subsample tokens (method.token_subsample)")
    ar = torch.arange(b, device=s2.device)
    i, j, k = ar[:, None, None], ar[None, :, None], ar[None, None, :]
    distinct = (i != j) & (k != j) & (i != k)
    a_s, close_s = _angles(s2)
    a_t, close_t = _angles(t2)
    # an angle at j needs e_i and e_k apart from e_j, in the student and in the teacher
    close = close_s | close_t
    keep = distinct & ~close[:, :, None] & ~close.T[None, :, :]   # close[i,j], close[j,k]
    if not bool(keep.any()):
        return (s2.sum() + t2.sum()) * 0.0   # every row coincides: no angle is defined
    return F.smooth_l1_loss(a_s[keep], a_t[keep], beta=delta)
