"""Relation-based KD (RKD): the student keeps the teacher's geometry between sequences.

Distances and angles between pooled sequence embeddings of a batch are compared, so student and
teacher widths may differ without a projector.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from wattkd.distill.methods.registry import register_method
from wattkd.distill.objective import StepInputs, terms_of
from wattkd.distill.signals import SignalRequest, TeacherSignals, pool

if TYPE_CHECKING:
    from wattkd.config import MethodConfig


@register_method("relation", loss_kinds={"relation"}, guard=True, order=2, colour="#2ca02c")
class RelationMode(nn.Module):
    needs_student_hidden = False

    def __init__(self, method: MethodConfig) -> None:
        super().__init__()
        self.pooling = method.pooling
        self.terms = terms_of(method, {"relation"})
        self.request = self.signals(method)

    @staticmethod
    def signals(method: MethodConfig) -> SignalRequest:
        return SignalRequest(pooled=method.pooling)

    @staticmethod
    def min_batch(method: MethodConfig) -> int:
        """Distances compare two sequences of a micro-batch, angles three."""
        return max((3 if t.name == "rkd_angle" else 2 for t in method.losses
                    if t.name.startswith("rkd_")), default=0)

    @classmethod
    def build(cls, method: MethodConfig, student: nn.Module, teacher_dims: Any) -> nn.Module:
        return cls(method)

    def forward(self, inputs: StepInputs, last: torch.Tensor, all_hidden, signals: TeacherSignals
                ) -> tuple[torch.Tensor, dict[str, float]]:
        s_emb = pool(last, self.pooling)
        t_emb = signals.pooled[self.pooling].float()
        total = last.new_zeros(()).float()
        parts: dict[str, float] = {}
        for spec, weight, params in self.terms:
            value = spec.fn(s_emb, t_emb, **params)
            total = total + weight * value
            parts[spec.name] = float(value.detach())
        return total, parts
