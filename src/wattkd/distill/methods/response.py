"""Response-based KD: the student matches the teacher's next-token distribution.

All of its losses are logit terms, which `DistillObjective` fuses with the LM head in chunks;
this method only declares that the teacher's logits (online head or cached top-k) are needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from wattkd.distill.methods.registry import register_method
from wattkd.distill.registry import get_loss
from wattkd.distill.signals import SignalRequest

if TYPE_CHECKING:
    from wattkd.config import MethodConfig


@register_method("response", loss_kinds={"logit"}, order=0, colour="#1f77b4")
class ResponseMode(nn.Module):
    needs_student_hidden = False

    def __init__(self, method: MethodConfig) -> None:
        super().__init__()
        self.request = self.signals(method)

    @staticmethod
    def signals(method: MethodConfig) -> SignalRequest:
        return SignalRequest(logits=any(get_loss(t.name).needs_teacher for t in method.losses))

    @classmethod
    def build(cls, method: MethodConfig, student: nn.Module, teacher_dims: Any) -> nn.Module:
        return cls(method)

    def forward(self, inputs, last, all_hidden, signals) -> tuple[torch.Tensor, dict[str, float]]:
        return last.new_zeros(()).float(), {}
