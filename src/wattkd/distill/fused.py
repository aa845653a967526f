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
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wattkd.distill.losses import IGNORE_INDEX, DenseTeacher, LogitChunk, TopKTeacher, upcast
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
            h = self.hidden[rows].to(self.weight.device, self.weight.dtype)
            z = upcast(F.linear(h, self.weight, self.bias))
            if self.softcap:
                z = torch.tanh(z / self.softcap) * self.softcap
        return DenseTeacher(z.to(self.hidden.device))


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


def _check_teacher(teacher: TeacherSource, n: int, vocab: int, device: torch.device) -> None:
    if not isinstance(teacher, TeacherHidden | DenseTeacher | TopKTeacher):
        raise TypeError(f"teacher must be TeacherHidden, DenseTeacher or TopKTeacher, got "
                        f"{type(teacher).__name__}")
    rows = ("hidden" if isinstance(teacher, TeacherHidden)
            else "logits" if isinstance(teacher, DenseTeacher) else "ids")
    where = getattr(teacher, rows).device
    if where != device:  # (a TeacherHidden's head weight may live on another device)
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


def _run(plan: _Plan, h: Tensor, w: Tensor, b: Tensor | None, need: tuple[bool, bool, bool]
         ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Loop over chunks: (loss, per-term sums, grad_h, grad_w, grad_b)."""
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

    with torch.autocast(dev.type, enabled=False):
        for start in range(0, plan.num_rows, plan.chunk):
            end = min(start + plan.chunk, plan.num_rows)
            rows = slice(start, end) if plan.rows is None else plan.rows[start:end]
            h_c = h[rows].detach().to(mm)
            labels_c = plan.labels[rows]
            teacher_c = plan.teacher.take(rows) if plan.teacher is not None else None
            with torch.no_grad():
                z = upcast(F.linear(h_c, w_mm, b_mm))
            z.requires_grad_(track)
            with torch.set_grad_enabled(track):
                zz = torch.tanh(z / plan.softcap) * plan.softcap if plan.softcap else z
                logits = LogitChunk(zz)
                chunk_loss = torch.zeros((), dtype=torch.float32, device=dev)
                for i, (spec, _, params) in enumerate(plan.terms):
                    s = spec.fn(logits, teacher_c, labels_c, **params).sum()
                    sums[i] += s.detach()
                    chunk_loss = chunk_loss + plan.coef[i] * s
            total += chunk_loss.detach()
            if not track:
                continue
            (dz,) = torch.autograd.grad(chunk_loss, z)
            del logits, zz, chunk_loss, teacher_c  # free this chunk's graph before the matmuls
            if need_b:
                gb += dz.sum(0)
            dz = dz.to(mm)
            if need_h:
                gh[rows] = (dz @ w_mm).to(gh.dtype)
            if need_w:
                gw += _mm_f32(dz.T, h_c)
    return total, sums, gh, gw, gb


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
