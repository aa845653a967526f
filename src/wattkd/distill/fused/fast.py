"""The closed-form fast path of the fused loss: one chunk's loss and d(loss)/d(logits) from the
closed forms registered with the losses (registry.TeacherForm / LabelForm), so no autograd graph
and no [chunk x V] fp32 intermediates once torch.compile fuses it (loop.py compiles and
dispatches). This module owns what is common to every term: temperature, T^2, the softcap's
chain rule and, for top-k teachers, the map from K+1 buckets back to the vocabulary. A plan
with any term without a closed form takes loop.py's generic autograd path; both give the
same numbers within fp32 rounding.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from wattkd.distill.fused.inputs import Plan, TeacherHidden
from wattkd.distill.losses import LOG_FLOOR, TopKTeacher, upcast
from wattkd.distill.registry import LabelForm, TeacherForm

# (closed form, temperature, T^2 factor, the form's other params as (name, value) pairs)
FastTerm = tuple[TeacherForm | LabelForm, float, float, tuple[tuple[str, object], ...]]


@dataclass(frozen=True)
class FastCfg:
    """The static part of a fast chunk computation (compiled once per distinct value)."""

    terms: tuple[FastTerm, ...]
    teacher: str                   # "dense" | "topk" | "none"
    s_cap: float | None
    t_cap: float | None
    grad: bool
    dz_dtype: torch.dtype


def fast_cfg(plan: Plan, track: bool, dz_dtype: torch.dtype) -> FastCfg | None:
    """The fast-path configuration of `plan`, or None when some term has no closed form (or
    WATTKD_FAST_LOSS=0). Params a term leaves out take the registry's defaults; every param
    but temperature and scale_by_t2 goes to the closed form."""
    if os.environ.get("WATTKD_FAST_LOSS", "1") == "0":
        return None
    teacher = plan.teacher
    kind = ("none" if teacher is None else "topk" if isinstance(teacher, TopKTeacher)
            else "dense")
    terms: list[FastTerm] = []
    for spec, _, params in plan.terms:
        form = spec.closed_form
        if form is None:
            return None
        p = {**spec.params, **params}
        if isinstance(form, LabelForm):
            terms.append((form, 1.0, 1.0, tuple(p.items())))
            continue
        t = float(p.pop("temperature"))
        factor = t * t if p.pop("scale_by_t2") else 1.0
        terms.append((form, t, factor, tuple(sorted(p.items()))))
    t_cap = teacher.softcap if isinstance(teacher, TeacherHidden) else None
    return FastCfg(tuple(terms), kind, plan.softcap, t_cap or None, track, dz_dtype)


def _capped(x: Tensor, cap: float | None) -> Tensor:
    return torch.tanh(x / cap) * cap if cap else x


def _cap_grad(z: Tensor, cap: float | None) -> Tensor | float:
    """d(cap * tanh(z / cap))/dz = 1 - tanh^2, for the chain rule through the softcap."""
    if not cap:
        return 1.0
    y = torch.tanh(z / cap)
    return 1.0 - y * y


def _all_cols(x: Tensor) -> Tensor:
    return torch.arange(x.shape[1], device=x.device)[None, :]


def dense_body(z: Tensor, t: Tensor | None, labels: Tensor, coef: Tensor, *,
               terms: tuple[FastTerm, ...], s_cap: float | None, t_cap: float | None,
               grad: bool, dz_dtype: torch.dtype) -> tuple[Tensor | None, Tensor]:
    """One chunk, dense (or no) teacher: (dz in dz_dtype or None, per-term sums [terms]).

    A teacher term's gradient w.r.t. z is c/T times its closed form's (w.r.t. z/T), a label
    term's is its closed form's at every column; c = coef * T^2 (if scaled); times 1 - tanh^2
    under a softcap. Teacher log-probs are clamped at LOG_FLOOR as DenseTeacher.log_probs does."""
    zz = _capped(upcast(z), s_cap)
    tt = None if t is None else _capped(upcast(t), t_cap)
    logq: dict[float, Tensor] = {}
    logp: dict[float, Tensor] = {}

    def student(temp: float) -> Tensor:
        if temp not in logq:
            x = zz if temp == 1.0 else zz / temp
            logq[temp] = x - torch.logsumexp(x, -1, keepdim=True)
        return logq[temp]

    def teacher(temp: float) -> Tensor:
        if temp not in logp:
            assert tt is not None
            x = tt if temp == 1.0 else tt / temp
            logp[temp] = (x - torch.logsumexp(x, -1, keepdim=True)).clamp(min=LOG_FLOOR)
        return logp[temp]

    sums = []
    g: Tensor | None = None
    for i, (form, temp, factor, kw) in enumerate(terms):
        c = coef[i] * factor
        if isinstance(form, LabelForm):
            lq1 = student(1.0)
            value = form.value(lq1, labels, **dict(kw))
            gi = (form.grad(lq1, _all_cols(zz), labels, c, zz.shape[1], **dict(kw)) if grad
                  else None)
        else:
            value, dx = form.pair(student(temp), teacher(temp), grad, **dict(kw))
            gi = dx * (c / temp) if grad else None
        sums.append(value.sum() * factor)
        if gi is not None:
            g = gi if g is None else g + gi
    dz = None
    if grad and g is not None:
        dz = (g * _cap_grad(upcast(z), s_cap)).to(dz_dtype)
    return dz, torch.stack(sums)


def _student_buckets(z: Tensor, ids: Tensor, s_cap: float | None
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(capped z, id membership [N,V], log tail mass, log q at the ids, logsumexp) at T=1.

    The tail is a masked logsumexp with its own max, like losses._TailLogProb: exact however
    small (1 - sum(top-k) would cancel to nothing for a confident student). The [N,V] bool
    membership mask costs 1 byte/entry, fused into the same row passes as the logsumexp."""
    zz = _capped(upcast(z), s_cap)
    member = torch.zeros(zz.shape, dtype=torch.bool, device=zz.device).scatter(1, ids, True)
    m = zz.amax(-1, keepdim=True)
    z_tail = torch.where(member, -torch.inf, zz)
    m_tail = z_tail.amax(-1, keepdim=True)
    m_tail = torch.where(torch.isfinite(m_tail), m_tail, 0.0)   # empty tail (K = V)
    lse = m + (zz - m).exp().sum(-1, keepdim=True).log()
    log_tail = m_tail + (z_tail - m_tail).exp().sum(-1, keepdim=True).log() - lse  # may be -inf
    z_ids = _capped(upcast(z.gather(1, ids)), s_cap)
    lq_ids = z_ids - lse
    return zz, member, log_tail, lq_ids, lse


def topk_body(z: Tensor, ids: Tensor, t_logprobs: Tensor, t_tail: Tensor, labels: Tensor,
              coef: Tensor, *, terms: tuple[FastTerm, ...], s_cap: float | None, grad: bool,
              dz_dtype: torch.dtype) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """One chunk, top-k teacher: (dz, per-term sums, dz at `ids` [N,K] to scatter over dz).

    The student's K+1 bucket log-probs b (the K ids at T=1, then the exact tail mass) carry
    the teacher terms, whose gradient g_b = dL/db is their closed form on K+1 entries (as
    losses._pair tempers the buckets). Back to the full vocab:
    dz_j = q_j (g_tail / Q_tail - G) off the ids, and g_k - G q_{id_k} at id_k (G = sum g_b).
    With forward KL at T=1 that is q_j (1 - p_tail / Q_tail) and q_{id_k} - p_k."""
    zz, member, log_tail, lq_ids, lse = _student_buckets(z, ids, s_cap)
    bs = torch.cat([lq_ids, log_tail.clamp(min=LOG_FLOOR)], dim=1)   # [N, K+1]
    bt = torch.cat([upcast(t_logprobs), upcast(t_tail)[:, None]], dim=1)
    logq1 = zz - lse

    sums = []
    gb: Tensor | None = None
    ce_full: Tensor | None = None
    ce_ids: Tensor | None = None
    for i, (form, temp, factor, kw) in enumerate(terms):
        c = coef[i] * factor
        if isinstance(form, LabelForm):
            value = form.value(logq1, labels, **dict(kw))
            if grad:
                gf = form.grad(logq1, _all_cols(zz), labels, c, zz.shape[1], **dict(kw))
                gk = form.grad(lq_ids, ids, labels, c, zz.shape[1], **dict(kw))
                ce_full = gf if ce_full is None else ce_full + gf
                ce_ids = gk if ce_ids is None else ce_ids + gk
        else:
            lq = F.log_softmax(bs if temp == 1.0 else bs / temp, dim=-1)
            lp = F.log_softmax(bt / temp, dim=-1).clamp(min=LOG_FLOOR)
            # formed even when not `grad` (unused then: the compiler drops it), as before
            value, dx = form.pair(lq, lp, True, **dict(kw))
            gi = dx * (c / temp)
            gb = gi if gb is None else gb + gi
        sums.append(value.sum() * factor)
    if not grad:
        return None, torch.stack(sums), None
    k = ids.shape[1]
    g = torch.zeros_like(logq1) if ce_full is None else ce_full
    g_ids = torch.zeros_like(lq_ids) if ce_ids is None else ce_ids
    if gb is not None:
        big_g = gb.sum(-1, keepdim=True)
        g_tail = gb[:, k:]
        # q_j * g_tail / Q_tail as exp(log q_j - log Q_tail) <= 1 off the ids: no overflow
        # when Q_tail is tiny. The ids get 0 here and their exact value scattered later.
        share = torch.where(member, 0.0, (logq1 - log_tail).exp())
        g = g + g_tail * share - big_g * logq1.exp()
        g_ids = g_ids + gb[:, :k] - big_g * lq_ids.exp()
    dz = (g * _cap_grad(upcast(z), s_cap)).to(dz_dtype)
    dz_ids = g_ids * _cap_grad(upcast(z.gather(1, ids)), s_cap)
    return dz, torch.stack(sums), dz_ids


def body_for(cfg: FastCfg) -> Callable[..., tuple]:
    """The chunk function of `cfg` with its static arguments bound (plain Python constants,
    which dynamo specialises on)."""
    if cfg.teacher == "topk":
        def topk_chunk(z, ids, t_logprobs, t_tail, labels, coef):
            return topk_body(z, ids, t_logprobs, t_tail, labels, coef, terms=cfg.terms,
                             s_cap=cfg.s_cap, grad=cfg.grad, dz_dtype=cfg.dz_dtype)
        return topk_chunk

    def dense_chunk(z, t, labels, coef):
        return dense_body(z, t, labels, coef, terms=cfg.terms, s_cap=cfg.s_cap,
                          t_cap=cfg.t_cap, grad=cfg.grad, dz_dtype=cfg.dz_dtype)
    return dense_chunk
