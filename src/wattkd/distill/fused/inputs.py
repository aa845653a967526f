"""The inputs of the fused logit loss and their validation: everything is checked once, with
one host sync, before the chunk loop (an out-of-range index inside it would be a CUDA device
assert that names no tensor), and becomes a `Plan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wattkd.distill.losses import IGNORE_INDEX, DenseTeacher, TopKTeacher, upcast
from wattkd.distill.registry import LossSpec, check_params

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
class Plan:
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


def prepare(n: int, vocab: int, device: torch.device, teacher: TeacherSource | None,
             labels: Tensor, mask: Tensor | None, terms: Terms, chunk_tokens: int,
             softcap: float | None) -> Plan:
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
        check_teacher(teacher, n, vocab, device)

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
    return Plan(terms=terms, keys=keys,
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


def check_teacher(teacher: TeacherSource, n: int, vocab: int, device: torch.device) -> None:
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
    if isinstance(teacher, TopKTeacher) and teacher.ids.dim() != 2:
        raise ValueError(f"TopKTeacher ids {tuple(teacher.ids.shape)} must be [tokens, k] "
                         "here (TopKTeacher.flat_tokens)")
    if isinstance(teacher, TopKTeacher) and teacher.ids.shape[1] > vocab:
        raise ValueError(f"TopKTeacher has k={teacher.ids.shape[1]} > student vocab {vocab}")
