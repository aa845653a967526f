"""Relation-based KD (RKD): the student keeps the teacher's geometry between sequences.

Distances and angles between pooled sequence embeddings of a batch are compared, so student and
teacher widths may differ without a projector.
"""

from __future__ import annotations

import torch
from torch import nn

from wattkd.config import MethodConfig
from wattkd.distill.objective import StepInputs, terms_of
from wattkd.distill.teacher import SignalRequest, TeacherSignals, pool


class RelationMode(nn.Module):
    needs_student_hidden = False

    def __init__(self, method: MethodConfig) -> None:
        super().__init__()
        self.pooling = method.pooling
        self.terms = terms_of(method, {"relation"})
        self.request = SignalRequest(pooled=self.pooling)

    def forward(self, inputs: StepInputs, last: torch.Tensor, all_hidden, signals: TeacherSignals
                ) -> tuple[torch.Tensor, dict[str, float]]:
        s_emb = pool(last, self.pooling)
        t_emb = signals.pooled.float()
        total = last.new_zeros(()).float()
        parts: dict[str, float] = {}
        for spec, weight, params in self.terms:
            value = spec.fn(s_emb, t_emb, **params)
            total = total + weight * value
            parts[spec.name] = float(value.detach())
        return total, parts
