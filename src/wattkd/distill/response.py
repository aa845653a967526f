"""Response-based KD: the student matches the teacher's next-token distribution.

All of its losses are logit terms, which `DistillObjective` fuses with the LM head in chunks;
this mode only declares that the teacher's logits (online head or cached top-k) are needed.
"""

from __future__ import annotations

import torch
from torch import nn

from wattkd.config import MethodConfig
from wattkd.distill.registry import get_loss
from wattkd.distill.teacher import SignalRequest


class ResponseMode(nn.Module):
    needs_student_hidden = False

    def __init__(self, method: MethodConfig) -> None:
        super().__init__()
        needs = any(get_loss(t.name).needs_teacher for t in method.losses)
        self.request = SignalRequest(logits=needs)

    def forward(self, inputs, last, all_hidden, signals) -> tuple[torch.Tensor, dict[str, float]]:
        return last.new_zeros(()).float(), {}


class NoKDMode(ResponseMode):
    """The baseline: same student, same data, same loop, CE only."""

    def __init__(self, method: MethodConfig) -> None:
        nn.Module.__init__(self)
        self.request = SignalRequest()
