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
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wattkd.distill import fused_path
from wattkd.distill.losses import (
    IGNORE_INDEX,
    LOG_FLOOR,
    DenseTeacher,
    LogitChunk,
    TopKTeacher,
    upcast,
)
from wattkd.distill.registry import LossSpec, check_params

log = logging.getLogger(__name__)

Terms = list[tuple[LossSpec, float, dict[str, Any]]]


@dataclass(eq=False)
class TeacherHidden:
    """Teacher final hidden states [N,Ht] + its LM head: teacher logits are made per chunk
    under no_grad, so the teacher's [N,V] logits never exist either."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    softcap: float | None = None

    @classmethod
    def from_head(cls, hidden: Tensor, head: nn.Module | Tensor,
                  softcap: float | None = None) -> TeacherHidden:
        weight, bias = head_params(head, "teacher head")
        return cls(hidden.reshape(-1, hidden.shape[-1]), weight, bias, softcap)

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[0]

    def take(self, rows: slice | Tensor) -> DenseTeacher:
        with torch.no_grad():
            z = upcast(self.raw_logits(rows))
            if self.softcap:
                z = torch.tanh(z / self.softcap) * self.softcap
        return DenseTeacher(z)

    def raw_logits(self, rows: slice | Tensor) -> Tensor:
        """The chunk's logits in the head's dtype, before the softcap (the fast path upcasts
        and caps them inside its fused computation)."""
        with torch.no_grad():
            h = self.hidden[rows].to(self.weight.device, self.weight.dtype)
            return F.linear(h, self.weight, self.bias).to(self.hidden.device)


TeacherSource = TeacherHidden | DenseTeacher | TopKTeacher


def head_params(head: nn.Module | Tensor | tuple[Tensor, Tensor | None],
                what: str = "student head") -> tuple[Tensor, Tensor | None]:
    """(weight [V,H], bias [V] | None) of an LM head given as nn.Linear, weight, or a pair.

    Anything else (e.g. a LoRA-wrapped head) is refused: using its `.weight` would silently drop
    the adapter's contribution.
    """
    if isinstance(head, tuple):
        weight, bias = head
    elif isinstance(head, Tensor):
        weight, bias = head, None
    elif isinstance(head, nn.Linear):
        weight, bias = head.weight, head.bias
    else:
        raise TypeError(f"{what} must be an nn.Linear, a weight tensor [vocab, hidden] or a "
                        f"(weight, bias) pair; got {type(head).__name__} (a LoRA/wrapped head "
                        f"cannot be fused: merge it or keep it frozen and pass its weight)")
    if weight.dim() != 2:
        raise ValueError(f"{what} weight must be [vocab, hidden], got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{what} bias must be [vocab]={weight.shape[0]}, got {tuple(bias.shape)}")
    return weight, bias


# ------------------------------------------------------------------------------ preparation
@dataclass
class _Plan:
    """Everything the chunk loop needs, validated once (one host sync) before the loop."""

    terms: Terms
    keys: list[str]
    coef: list[float]        # weight / number of counted tokens, per term
    counts: list[int]        # counted tokens, per term
    labels: Tensor
    teacher: TeacherSource | None
    rows: Tensor | None      # compacted masked-in rows, or None when all rows count
    num_rows: int
    chunk: int
    softcap: float | None


def _prepare(n: int, vocab: int, device: torch.device, teacher: TeacherSource | None,
             labels: Tensor, mask: Tensor | None, terms: Terms, chunk_tokens: int,
             softcap: float | None) -> _Plan:
    if not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"s_softcap must be > 0 or None, got {softcap!r}")
    if not terms:
        raise ValueError("fused_logit_loss: terms must not be empty")
    for spec, weight, params in terms:
        if spec.kind != "logit":
            raise ValueError(f"loss {spec.name!r} is a {spec.kind} loss; only logit losses can "
                             f"be fused with the LM head")
        if not weight >= 0:
            raise ValueError(f"loss {spec.name!r}: weight must be >= 0, got {weight!r}")
        msg = check_params(spec, params)
        if msg:
            raise ValueError(msg)
        if spec.needs_teacher and teacher is None:
            raise ValueError(f"loss {spec.name!r} needs teacher signals, but teacher is None")
    if labels.shape != (n,) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an integer tensor [tokens]={n}, got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    if mask is None:
        mask = torch.ones(n, dtype=torch.bool, device=device)
    if mask.shape != (n,):
        raise ValueError(f"mask must be [tokens]={n}, got {tuple(mask.shape)}")
    mask = mask.to(device) != 0
    labels = labels.to(device)
    if teacher is not None:
        _check_teacher(teacher, n, vocab, device)

    # One host sync for counts and index range checks (an out-of-range index is a device
    # assert on CUDA, which kills the process without saying which tensor was wrong).
    labelled = mask & (labels != IGNORE_INDEX)
    probes = [mask.sum(), labelled.sum(),
              (labelled & ((labels < 0) | (labels >= vocab))).sum()]
    if isinstance(teacher, TopKTeacher):
        ids = teacher.ids.to(device)
        probes.append((mask[:, None] & ((ids < 0) | (ids >= vocab))).sum())
    got = torch.stack(probes).tolist()
    n_mask, n_labelled, bad_labels = got[:3]
    needs_labels = any(spec.needs_labels for spec, _, _ in terms)
    if needs_labels and bad_labels:
        raise ValueError(f"labels: {bad_labels} masked-in labels are outside [0, {vocab}) "
                         f"and not {IGNORE_INDEX}")
    if len(got) > 3 and got[3]:
        raise ValueError(f"TopKTeacher.ids: {got[3]} ids are outside [0, {vocab}) (student vocab)")

    counts = [n_labelled if spec.needs_labels else n_mask for spec, _, _ in terms]
    keys, seen = [], {}
    for spec, _, _ in terms:
        seen[spec.name] = seen.get(spec.name, 0) + 1
        keys.append(spec.name if seen[spec.name] == 1 else f"{spec.name}#{seen[spec.name]}")
    rows = None if n_mask == n else mask.nonzero().squeeze(1)
    if not any(spec.needs_teacher for spec, _, _ in terms):
        teacher = None  # never compute teacher logits nobody reads
    return _Plan(terms=terms, keys=keys,
                 coef=[float(w) / max(c, 1) for (_, w, _), c in zip(terms, counts)],
                 counts=counts, labels=labels, teacher=teacher, rows=rows, num_rows=n_mask,
                 chunk=chunk_tokens, softcap=softcap)


def same_device(a: torch.device, b: torch.device) -> bool:
    """`cuda` and `cuda:0` are the same device when 0 is the current one."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    if a.index is not None and b.index is not None:
        return False
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def _check_teacher(teacher: TeacherSource, n: int, vocab: int, device: torch.device) -> None:
    if not isinstance(teacher, TeacherHidden | DenseTeacher | TopKTeacher):
        raise TypeError(f"teacher must be TeacherHidden, DenseTeacher or TopKTeacher, got "
                        f"{type(teacher).__name__}")
    rows = ("hidden" if isinstance(teacher, TeacherHidden)
            else "logits" if isinstance(teacher, DenseTeacher) else "ids")
    where = getattr(teacher, rows).device
    if not same_device(where, device):  # (a TeacherHidden's head weight may be elsewhere)
        raise ValueError(f"teacher {rows} are on {where}, the student hidden states on {device}: "
                         f"move the teacher signals to the student's device first")
    if teacher.num_tokens != n:
        raise ValueError(f"teacher has {teacher.num_tokens} tokens, student hidden has {n}")
    if isinstance(teacher, DenseTeacher) and teacher.logits.shape[1] != vocab:
        raise ValueError(f"teacher logits vocab {teacher.logits.shape[1]} != student head "
                         f"vocab {vocab}")
    if isinstance(teacher, TeacherHidden):
        if teacher.weight.dim() != 2 or teacher.weight.shape[0] != vocab:
            raise ValueError(f"teacher head weight {tuple(teacher.weight.shape)} must be "
                             f"[vocab={vocab}, teacher hidden]")
        if teacher.hidden.dim() != 2 or teacher.hidden.shape[1] != teacher.weight.shape[1]:
            raise ValueError(f"teacher hidden {tuple(teacher.hidden.shape)} does not match its "
                             f"head weight {tuple(teacher.weight.shape)}")
        if teacher.softcap is not None and not teacher.softcap > 0:
            raise ValueError(f"teacher softcap must be > 0 or None, got {teacher.softcap!r}")
    if isinstance(teacher, TopKTeacher) and teacher.ids.shape[1] > vocab:
        raise ValueError(f"TopKTeacher has k={teacher.ids.shape[1]} > student vocab {vocab}")


# ------------------------------------------------------------------------------- chunk loop
_MM_OUT_DTYPE_OK = True
_ADDMM_OUT_DTYPE_OK = True


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 result; low-precision inputs keep their fast matmul where torch can
    write fp32 out directly (CUDA `out_dtype`), else the product is rounded then upcast."""
    global _MM_OUT_DTYPE_OK
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _MM_OUT_DTYPE_OK:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            _MM_OUT_DTYPE_OK = False
    return (a @ b).float()


def _addmm_f32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32) += a @ b in place. On CUDA with bf16/fp16 inputs cuBLAS accumulates straight
    into acc (beta = 1): no [V x H] fp32 temporary per chunk (671 MB at Gemma-3's vocab)."""
    global _ADDMM_OUT_DTYPE_OK
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _ADDMM_OUT_DTYPE_OK:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError):
            _ADDMM_OUT_DTYPE_OK = False
    acc += _mm_f32(a, b)


def _generic_chunk(plan: _Plan, z: Tensor, teacher_c: Any, labels_c: Tensor, track: bool
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


# ------------------------------------------------------------------------- fast (analytic) path
# forward_kl, reverse_kl and ce have closed-form gradients w.r.t. the logits, so one chunk's loss
# and d(loss)/d(logits) are a few row reductions and one elementwise pass over the low-precision
# logits: no autograd graph, no [chunk x V] fp32 intermediates (once torch.compile fuses it).
# Everything else takes `_generic_chunk`; both give the same numbers within fp32 rounding.
_FAST_TEACHER_TERMS = {"forward_kl", "reverse_kl"}
_MIN_COMPILED_ROWS = 16   # smaller (last) chunks run eagerly: no 0/1-size specialisation
_COMPILED: dict[Any, Any] = {}
_COMPILE_BROKEN: list[str] = []   # non-empty once a compile failed: eager from then on


@dataclass(frozen=True)
class _FastCfg:
    """The static part of a fast chunk computation (compiled once per distinct value)."""

    terms: tuple[tuple[str, float, float, float], ...]  # (name, temperature, T^2 factor, eps)
    teacher: str                   # "dense" | "topk" | "none"
    s_cap: float | None
    t_cap: float | None
    grad: bool
    dz_dtype: torch.dtype


def _fast_cfg(plan: _Plan, track: bool, dz_dtype: torch.dtype) -> _FastCfg | None:
    """The fast-path configuration of `plan`, or None when some term needs the generic path."""
    if os.environ.get("WATTKD_FAST_LOSS", "1") == "0":
        return None
    from wattkd.distill import losses

    known = {"forward_kl": losses.forward_kl, "reverse_kl": losses.reverse_kl, "ce": losses.ce}
    teacher = plan.teacher
    kind = ("none" if teacher is None else "topk" if isinstance(teacher, TopKTeacher)
            else "dense")
    terms = []
    for spec, _, params in plan.terms:
        if known.get(spec.name) is not spec.fn:
            return None
        if spec.name == "ce":
            terms.append(("ce", 1.0, 1.0, float(params.get("label_smoothing", 0.0))))
            continue
        t = float(params.get("temperature", 1.0))
        factor = t * t if params.get("scale_by_t2", True) else 1.0
        terms.append((spec.name, t, factor, 0.0))
    t_cap = teacher.softcap if isinstance(teacher, TeacherHidden) else None
    return _FastCfg(tuple(terms), kind, plan.softcap, t_cap or None, track, dz_dtype)


def _capped(x: Tensor, cap: float | None) -> Tensor:
    return torch.tanh(x / cap) * cap if cap else x


def _cap_grad(z: Tensor, cap: float | None) -> Tensor | float:
    """d(cap * tanh(z / cap))/dz = 1 - tanh^2, for the chain rule through the softcap."""
    if not cap:
        return 1.0
    y = torch.tanh(z / cap)
    return 1.0 - y * y


def _ce_value(logq1: Tensor, labels: Tensor, eps: float) -> Tensor:
    """ce per row, as losses.ce computes it (0 where label = -100)."""
    valid = labels != IGNORE_INDEX
    nll = -logq1.gather(1, torch.where(valid, labels, 0).long()[:, None])[:, 0]
    if eps:
        nll = (1.0 - eps) * nll - eps * logq1.mean(-1)
    return torch.where(valid, nll, 0.0)


def _ce_grad(logq1: Tensor, cols: Tensor, labels: Tensor, eps: float, c: Tensor,
             vocab: int) -> Tensor:
    """c * d ce/d logits at columns `cols` ([1,V] = all, or [N,K]) whose student log-probs
    are `logq1`: q - (1-eps) onehot(label) - eps/V, 0 where label = -100."""
    valid = labels != IGNORE_INDEX
    hot = (cols == labels[:, None]).to(logq1.dtype)
    scale = torch.where(valid, c, 0.0)[:, None]
    return (logq1.exp() - (1.0 - eps) * hot - eps / vocab) * scale


def _all_cols(x: Tensor) -> Tensor:
    return torch.arange(x.shape[1], device=x.device)[None, :]


def _dense_body(z: Tensor, t: Tensor | None, labels: Tensor, coef: Tensor, *,
                terms: tuple, s_cap: float | None, t_cap: float | None, grad: bool,
                dz_dtype: torch.dtype) -> tuple[Tensor | None, Tensor]:
    """One chunk, dense (or no) teacher: (dz in dz_dtype or None, per-term sums [terms]).

    forward_kl: d/dz = c/T (q_T - p_T); reverse_kl: c/T q_T (log q_T - log p_T - KL);
    ce: c (q_1 - (1-eps) onehot - eps/V); c = coef * T^2 (if scaled); times 1 - tanh^2 under a
    softcap. Teacher log-probs are clamped at LOG_FLOOR as DenseTeacher.log_probs does."""
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
    for i, (name, temp, factor, eps) in enumerate(terms):
        c = coef[i] * factor
        if name == "ce":
            lq1 = student(1.0)
            value = _ce_value(lq1, labels, eps)
            gi = _ce_grad(lq1, _all_cols(zz), labels, eps, c, zz.shape[1]) if grad else None
        else:
            lq, lp = student(temp), teacher(temp)
            if name == "forward_kl":
                p = lp.exp()
                value = (p * (lp - lq)).sum(-1)
                gi = (lq.exp() - p) * (c / temp) if grad else None
            else:  # reverse_kl
                q = lq.exp()
                diff = lq - lp
                value = (q * diff).sum(-1)
                gi = q * (diff - value[:, None]) * (c / temp) if grad else None
        sums.append(value.sum() * factor)
        if gi is not None:
            g = gi if g is None else g + gi
    dz = None
    if grad and g is not None:
        dz = (g * _cap_grad(upcast(z), s_cap)).to(dz_dtype)
    return dz, torch.stack(sums)


def _topk_body(z: Tensor, ids: Tensor, t_logprobs: Tensor, t_tail: Tensor, labels: Tensor,
               coef: Tensor, *, terms: tuple, s_cap: float | None, grad: bool,
               dz_dtype: torch.dtype) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """One chunk, top-k teacher: (dz, per-term sums, dz at `ids` [N,K] to scatter over dz).

    The student's K+1 bucket log-probs b (the K ids at T=1, then the exact tail mass) carry
    the teacher terms, whose gradient g_b = dL/db is closed-form on K+1 entries (the same
    formulas as the dense case, as losses._pair tempers the buckets). Back to the full vocab:
    dz_j = q_j (g_tail / Q_tail - G) off the ids, and g_k - G q_{id_k} at id_k (G = sum g_b).
    With forward KL at T=1 that is q_j (1 - p_tail / Q_tail) and q_{id_k} - p_k."""
    zz = _capped(upcast(z), s_cap)
    # The tail is a masked logsumexp with its own max, like losses._TailLogProb: exact however
    # small (1 - sum(top-k) would cancel to nothing for a confident student). The [N,V] bool
    # membership mask costs 1 byte/entry, fused into the same row passes as the logsumexp.
    member = torch.zeros(zz.shape, dtype=torch.bool, device=zz.device).scatter(1, ids, True)
    m = zz.amax(-1, keepdim=True)
    z_tail = torch.where(member, -torch.inf, zz)
    m_tail = z_tail.amax(-1, keepdim=True)
    m_tail = torch.where(torch.isfinite(m_tail), m_tail, 0.0)   # empty tail (K = V)
    lse = m + (zz - m).exp().sum(-1, keepdim=True).log()
    log_tail = m_tail + (z_tail - m_tail).exp().sum(-1, keepdim=True).log() - lse  # may be -inf
    z_ids = _capped(upcast(z.gather(1, ids)), s_cap)
    lq_ids = z_ids - lse
    bs = torch.cat([lq_ids, log_tail.clamp(min=LOG_FLOOR)], dim=1)   # [N, K+1]
    bt = torch.cat([upcast(t_logprobs), upcast(t_tail)[:, None]], dim=1)
    logq1 = zz - lse

    sums = []
    gb: Tensor | None = None
    ce_full: Tensor | None = None
    ce_ids: Tensor | None = None
    for i, (name, temp, factor, eps) in enumerate(terms):
        c = coef[i] * factor
        if name == "ce":
            value = _ce_value(logq1, labels, eps)
            if grad:
                gf = _ce_grad(logq1, _all_cols(zz), labels, eps, c, zz.shape[1])
                gk = _ce_grad(lq_ids, ids, labels, eps, c, zz.shape[1])
                ce_full = gf if ce_full is None else ce_full + gf
                ce_ids = gk if ce_ids is None else ce_ids + gk
        else:
            lq = F.log_softmax(bs if temp == 1.0 else bs / temp, dim=-1)
            lp = F.log_softmax(bt / temp, dim=-1).clamp(min=LOG_FLOOR)
            if name == "forward_kl":
                p = lp.exp()
                value = (p * (lp - lq)).sum(-1)
                gi = (lq.exp() - p) * (c / temp)
            else:  # reverse_kl
                q = lq.exp()
                diff = lq - lp
                value = (q * diff).sum(-1)
                gi = q * (diff - value[:, None]) * (c / temp)
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


def _body_for(cfg: _FastCfg):
    """The chunk function of `cfg` with its static arguments bound (plain Python constants,
    which dynamo specialises on)."""
    if cfg.teacher == "topk":
        def topk_chunk(z, ids, t_logprobs, t_tail, labels, coef):
            return _topk_body(z, ids, t_logprobs, t_tail, labels, coef, terms=cfg.terms,
                              s_cap=cfg.s_cap, grad=cfg.grad, dz_dtype=cfg.dz_dtype)
        return topk_chunk

    def dense_chunk(z, t, labels, coef):
        return _dense_body(z, t, labels, coef, terms=cfg.terms, s_cap=cfg.s_cap,
                           t_cap=cfg.t_cap, grad=cfg.grad, dz_dtype=cfg.dz_dtype)
    return dense_chunk


def _compile_wanted(device: torch.device) -> bool:
    return (device.type == "cuda" and not _COMPILE_BROKEN
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
    if forced == "compiled" and not _COMPILE_BROKEN:
        return True, "inductor"
    if device.type != "cuda":
        return True, None
    if _compile_wanted(device):
        return True, "inductor"
    return False, None


def _compiled(cfg: _FastCfg, backend: str = "inductor"):
    key = (cfg, backend)
    if key not in _COMPILED:
        # One graph for every chunk length: the row dim is marked dynamic at each call.
        _COMPILED[key] = torch.compile(_body_for(cfg), backend=backend, fullgraph=True)
    return _COMPILED[key]


def _fast_chunk(cfg: _FastCfg, args: tuple, compile_backend: str | None
                ) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """Run one fast chunk, compiled when asked (falling back to eager, once, on failure)."""
    rows = args[0].shape[0]
    if compile_backend is not None and rows >= _MIN_COMPILED_ROWS and not _COMPILE_BROKEN:
        try:
            for a in args:
                if isinstance(a, Tensor) and a.dim() >= 1 and a.shape[0] == rows:
                    torch._dynamo.maybe_mark_dynamic(a, 0)
            out = _compiled(cfg, compile_backend)(*args)
            return out if cfg.teacher == "topk" else (*out, None)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any compiler failure: eager is still right
            _COMPILE_BROKEN.append(f"{type(exc).__name__}: {exc}")
            log.warning("torch.compile of the fused logit loss failed; not compiling from now "
                        "on (uncompiled path; WATTKD_COMPILE=0 skips compiling): %s",
                        _COMPILE_BROKEN[-1][:2000])
    out = _body_for(cfg)(*args)
    return out if cfg.teacher == "topk" else (*out, None)


def _run(plan: _Plan, h: Tensor, w: Tensor, b: Tensor | None, need: tuple[bool, bool, bool],
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
        kspec = _kernel_spec(plan, dev, w)
        auto_fast, compile_backend = _auto_path(dev)
        fast = fast and auto_fast
    cfg = _fast_cfg(plan, track, torch.float32 if need_b else mm) if fast else None
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
                dz, s = _kernel_chunk(kspec, plan, rows, h_c, w_mm, b_mm, labels_c, track,
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


def _kernel_spec(plan: _Plan, dev: torch.device, w: Tensor) -> Any:
    """The Triton kernel's spec for `plan` when the requested path allows it and the kernel
    supports the terms/teacher/device, else None (the decision and its reason are recorded;
    a forced `triton` that cannot apply is an error naming why)."""
    want = fused_path.requested()
    if want != "triton" and not (want == "auto" and fused_path.AUTO_USES_TRITON):
        return None
    why = fused_path.triton_usable(dev.type, forced=want == "triton")
    spec = None
    if not why:
        from wattkd.distill import losses
        from wattkd.distill.kernels.lm_head_kd import kernel_spec

        known = {"forward_kl": losses.forward_kl, "reverse_kl": losses.reverse_kl,
                 "jsd": losses.jsd, "ce": losses.ce}
        teacher = plan.teacher
        kind = ("none" if teacher is None else "hidden" if isinstance(teacher, TeacherHidden)
                else "top-k" if isinstance(teacher, TopKTeacher) else "dense logits")
        other = [s.name for s, _, _ in plan.terms if known.get(s.name) is not s.fn]
        if other:
            why = f"loss {other[0]!r} has no Triton kernel"
        elif kind == "hidden" and not same_device(teacher.weight.device, dev):
            why = "teacher head on another device"
        else:
            spec, why = kernel_spec([(s.name, p) for s, _, p in plan.terms], kind,
                                    plan.softcap,
                                    teacher.softcap if isinstance(teacher, TeacherHidden)
                                    else None)
    if spec is None and want == "triton":
        raise ValueError(f"fused_kernel=triton was forced but the Triton kernel cannot "
                         f"compute this loss: {why}")
    if spec is not None:
        fused_path.record("triton", "forced" if want == "triton" else "auto")
    elif dev.type == "cuda":
        fused_path.record("triton-unavailable", why)
    return spec


def _kernel_chunk(spec: Any, plan: _Plan, rows: slice | Tensor, h_c: Tensor, w_mm: Tensor,
                  b_mm: Tensor | None, labels_c: Tensor, track: bool, dz_dtype: torch.dtype
                  ) -> tuple[Tensor | None, Tensor]:
    """One chunk through the Triton kernels: (dz or None, per-term sums)."""
    from wattkd.distill.kernels.lm_head_kd import chunk

    th = tw = tb = None
    teacher = plan.teacher
    if spec.has_teacher:
        tw = teacher.weight.detach()
        th = teacher.hidden[rows].detach().to(tw.device, tw.dtype)
        tb = None if teacher.bias is None else teacher.bias.detach().to(tw.dtype)
    topk = None
    if spec.topk:
        topk = (teacher.ids[rows], teacher.logprobs[rows], teacher.tail_logprob[rows])
    with torch.no_grad():
        return chunk(spec, plan.coef, h_c, w_mm, b_mm, th, tw, tb, labels_c, track, dz_dtype,
                     topk)


def _fast_chunk_inputs(cfg: _FastCfg, plan: _Plan, rows: slice | Tensor, z: Tensor,
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
    def forward(ctx: Any, h: Tensor, w: Tensor, b: Tensor | None, plan: _Plan,
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
    plan = _prepare(n, weight.shape[0], h.device, teacher, labels.reshape(-1),
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


def masked_logit_loss(s_logits: Tensor, teacher: DenseTeacher | TopKTeacher | None,
                      labels: Tensor, mask: Tensor | None, terms: Terms
                      ) -> tuple[Tensor, dict[str, float]]:
    """The same reduction on logits that already exist (no head, no chunking): for heads that
    cannot be fused and for small vocabularies. Plain autograd; memory O(N x V)."""
    z = s_logits.reshape(-1, s_logits.shape[-1])
    plan = _prepare(z.shape[0], z.shape[1], z.device, teacher, labels.reshape(-1),
                    None if mask is None else mask.reshape(-1), terms, z.shape[0] or 1, None)
    rows = slice(None) if plan.rows is None else plan.rows
    logits = LogitChunk(upcast(z[rows]))
    teacher_c = None if teacher is None else teacher.take(rows)
    loss = torch.zeros((), dtype=torch.float32, device=z.device)
    stats = {}
    for key, coef, count, (spec, _, params) in zip(plan.keys, plan.coef, plan.counts, plan.terms):
        s = spec.fn(logits, teacher_c, plan.labels[rows], **params).sum()
        loss = loss + coef * s
        stats[key] = s.detach() / max(count, 1)
    return loss, {k: float(v) for k, v in stats.items()}


# ------------------------------------------------------------------------------- self-check
def _selfcheck(argv: list[str] | None = None) -> int:
    """Fast path (eager and compiled) vs the generic autograd path on random data of the
    benchmark's shapes; prints errors, per-chunk times and peak memory. Exit status: 0 ok,
    1 mismatch, 2 torch.compile failed (the eager fast path was used; still correct)."""
    import argparse
    import math
    import time

    from wattkd.distill.registry import get_loss

    ap = argparse.ArgumentParser(prog="python -m wattkd.distill.fused")
    ap.add_argument("--selfcheck", action="store_true", required=True)
    ap.add_argument("--vocab", type=int, default=None, help="default 262144 (CUDA), 4096 (CPU)")
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--chunk", type=int, default=None, help="default 1024 (CUDA), 64 (CPU)")
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backend", default=None,
                    help="torch.compile backend of the compiled mode (default: inductor on "
                         "CUDA; on CPU no compiled mode unless given)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    vocab = args.vocab or (262144 if cuda else 4096)
    chunk = args.chunk or (1024 if cuda else 64)
    n, hid = 2 * chunk - 37, args.hidden  # a full chunk and a partial one
    g = torch.Generator(device="cpu").manual_seed(0)

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
        lp, ids = logp.topk(args.topk, dim=-1)
        tail = torch.log1p(-lp.exp().sum(-1).clamp(max=1 - 1e-6))
        topk = TopKTeacher(ids.int(), lp.half(), tail.half())
        del logp

    def terms(*items: tuple[str, float, dict]) -> Terms:
        return [(get_loss(name), wt, params) for name, wt, params in items]

    cases = [
        ("dense forward_kl T=1 (benchmark)", TeacherHidden(th, tw),
         terms(("forward_kl", 1.0, {"temperature": 1.0})), None),
        ("dense fkl T=2 + rkl + ce(ls=0.1), softcaps", TeacherHidden(th, tw, softcap=30.0),
         terms(("forward_kl", 1.0, {"temperature": 2.0}), ("reverse_kl", 0.5, {}),
               ("ce", 0.3, {"label_smoothing": 0.1})), 30.0),
        (f"top-{args.topk} forward_kl T=1 + ce", topk,
         terms(("forward_kl", 1.0, {}), ("ce", 0.5, {})), None),
    ]
    modes = [("generic", False, None), ("fast eager", True, None)]
    backend = args.backend or ("inductor" if cuda else None)
    if backend:
        modes.append(("fast compiled", True, backend))
    status = 0
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__},"
          f" tokens {n}, chunk {chunk}, vocab {vocab}, hidden {hid}")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for name, teacher, ts, cap in cases:
        plan = _prepare(n, vocab, dev, teacher, labels, mask, ts, chunk, cap)
        chunks = math.ceil(plan.num_rows / chunk)
        results = {}
        print(f"\n== {name}")
        for mode, fast, backend in modes:
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                _run(plan, h, w, None, (True, True, False), fast=fast,
                     compile_backend=backend)  # warm-up (compiles)
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    out = _run(plan, h, w, None, (True, True, False), fast=fast,
                               compile_backend=backend)
                sync()
            ms = (time.perf_counter() - t0) * 1e3 / (args.reps * chunks)
            peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
            results[mode] = out
            print(f"  {mode:14s} {ms:9.2f} ms/chunk (incl. matmuls)  peak {peak:6.2f} GB")
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
    if cuda:  # in-place fp32 accumulation of grad_W
        a, b_ = rnd(chunk, 64).bfloat16(), rnd(chunk, hid).bfloat16()
        acc = rnd(64, hid)
        want = acc + a.float().T @ b_.float()
        _addmm_f32_(acc, a.T, b_)
        rel = ((acc - want).norm() / want.norm()).item()
        print(f"\naddmm fp32 accumulate: rel err {rel:.2e} (out_dtype path "
              f"{'on' if _ADDMM_OUT_DTYPE_OK else 'off'})")
        status = status or (0 if rel < 1e-5 else 1)
    if _COMPILE_BROKEN:
        print(f"\ntorch.compile FAILED (eager fast path used): {_COMPILE_BROKEN[0][:2000]}")
        status = status or 2
    print("\nselfcheck", "OK" if status == 0 else f"FAILED (exit {status})")
    return status


if __name__ == "__main__":
    import sys

    from wattkd.distill import fused as _canonical  # noqa: PLW0406 - one copy of the classes

    sys.exit(_canonical._selfcheck())
