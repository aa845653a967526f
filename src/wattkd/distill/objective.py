"""The student side of one training step: student forward + the method's weighted losses.

`DistillObjective` is an nn.Module so DDP/FSDP wrap the whole step (student and any learned
projector) and every gradient flows inside their forward. A mode adds what it needs on top of
the shared part: next-token targets, and the logit terms fused with the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from wattkd.config import MethodConfig
from wattkd.distill.fused import TeacherHidden, fused_logit_loss
from wattkd.distill.losses import TopKTeacher
from wattkd.distill.registry import LossSpec, get_loss
from wattkd.distill.signals import SignalRequest, TeacherSignals
from wattkd.distill.teacher import logit_softcap
from wattkd.models import unwrap

Term = tuple[LossSpec, float, dict]


@dataclass
class StepInputs:
    """Next-token view of a packed batch: position t predicts token t+1."""

    input_ids: torch.Tensor   # [B, L]
    labels: torch.Tensor      # [B, L-1]
    mask: torch.Tensor        # [B, L-1] float, 1 = counted

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor], device: torch.device) -> StepInputs:
        ids = batch["input_ids"].to(device, non_blocking=True)
        loss_mask = batch.get("loss_mask")
        mask = (loss_mask.to(device)[:, 1:] if loss_mask is not None
                else torch.ones_like(ids[:, 1:])).float()
        return cls(ids, ids[:, 1:], mask)


def head_slice(model: nn.Module, vocab: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of the LM head over the compared vocabulary (padding rows dropped)."""
    head = unwrap(model).get_output_embeddings()
    bias = getattr(head, "bias", None)
    return head.weight[:vocab], None if bias is None else bias[:vocab]


def teacher_source(signals: TeacherSignals | None, vocab: int):
    """Teacher logits for positions 0..L-2 (each predicting the next token) as the fused loss
    takes them: cached top-k, or the teacher's hidden state + head (logits made per chunk)."""
    if signals is None:
        raise ValueError("this method needs teacher logits but no teacher signals were given")
    if signals.topk is not None:
        t = signals.topk
        return TopKTeacher(t.ids[:, :-1], t.logprobs[:, :-1], t.tail_logprob[:, :-1]).flat_tokens()
    if signals.last_hidden is None or signals.head is None:
        raise ValueError("teacher signals carry neither top-k logits nor hidden state + head")
    head = signals.head
    bias = getattr(head, "bias", None)
    return TeacherHidden.from_head(signals.last_hidden[:, :-1],
                                   (head.weight[:vocab], None if bias is None else bias[:vocab]),
                                   signals.softcap)


def terms_of(method: MethodConfig, kinds: set[str]) -> list[Term]:
    out: list[Term] = []
    for term in method.losses:
        spec = get_loss(term.name)
        if spec.kind in kinds:
            out.append((spec, term.weight, dict(term.params)))
    return out


class DistillObjective(nn.Module):
    """student + mode-specific modules; forward returns (loss, detached loss parts)."""

    def __init__(self, student: nn.Module, mode: nn.Module, method: MethodConfig, *,
                 vocab: int, chunk_tokens: int) -> None:
        super().__init__()
        self.student = student
        self.mode = mode
        self.vocab = vocab
        self.chunk_tokens = chunk_tokens
        self.logit_terms = terms_of(method, {"logit"})
        self.softcap = logit_softcap(student)

    @property
    def request(self) -> SignalRequest:
        return self.mode.request

    def student_forward(self, inputs: StepInputs, hidden: bool):
        decoder = unwrap(self.student).get_decoder()
        out = decoder(input_ids=inputs.input_ids, output_hidden_states=hidden, use_cache=False)
        return out.last_hidden_state, (out.hidden_states if hidden else None)

    def forward(self, inputs: StepInputs, signals: TeacherSignals | None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        last, all_hidden = self.student_forward(inputs, self.mode.needs_student_hidden)
        loss, parts = self.mode(inputs, last, all_hidden, signals)
        if self.logit_terms:
            logit_loss, logit_parts = self.logit_loss(inputs, last, signals)
            loss = loss + logit_loss
            parts.update(logit_parts)
        parts["loss"] = float(loss.detach())
        return loss, parts

    def logit_loss(self, inputs: StepInputs, last: torch.Tensor,
                   signals: TeacherSignals | None) -> tuple[torch.Tensor, dict[str, float]]:
        h = last[:, :-1].reshape(-1, last.shape[-1])
        source = teacher_source(signals, self.vocab) if self.needs_teacher_logits else None
        return fused_logit_loss(
            h, head_slice(self.student, self.vocab), source, inputs.labels.reshape(-1),
            inputs.mask.reshape(-1), self.logit_terms, chunk_tokens=self.chunk_tokens,
            s_softcap=self.softcap)

    @property
    def needs_teacher_logits(self) -> bool:
        return any(spec.needs_teacher for spec, _, _ in self.logit_terms)

    @torch.no_grad()
    def lm_loss(self, inputs: StepInputs) -> float:
        """Plain next-token cross-entropy, for the divergence guard and held-out checks."""
        last, _ = self.student_forward(inputs, False)
        h = last[:, :-1].reshape(-1, last.shape[-1])
        loss, _ = fused_logit_loss(h, head_slice(self.student, self.vocab), None,
                                   inputs.labels.reshape(-1),
                                   inputs.mask.reshape(-1), [(get_loss("ce"), 1.0, {})],
                                   chunk_tokens=self.chunk_tokens, s_softcap=self.softcap)
        return float(loss)
