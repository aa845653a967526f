"""Feature-based KD (FitNets): student hidden states, projected, match the teacher's.

Each (student layer, teacher layer) pair has a learned linear projector; projectors train with
the student, are saved in checkpoints and beside the final student (projector.pt).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from wattkd.distill.methods.registry import register_method
from wattkd.distill.objective import StepInputs, terms_of
from wattkd.distill.signals import SignalRequest, TeacherSignals
from wattkd.models import ModelError, hidden_size, num_layers

if TYPE_CHECKING:
    from wattkd.config import ExperimentConfig, MethodConfig


def check_layer_map(layer_map: list[tuple[int, int]], student_layers: int,
                    teacher_layers: int) -> None:
    """Hidden-state index i is the output of layer i (0 = embeddings), so 0..num_layers."""
    for s, t in layer_map:
        if not 0 <= s <= student_layers:
            raise ModelError(f"layer_map pair ({s}, {t}): the student has {student_layers} layers, "
                             f"so its hidden-state indices are 0..{student_layers}")
        if not 0 <= t <= teacher_layers:
            raise ModelError(f"layer_map pair ({s}, {t}): the teacher has {teacher_layers} layers, "
                             f"so its hidden-state indices are 0..{teacher_layers}")


@register_method("feature", loss_kinds={"feature"}, guard=True, order=1, colour="#ff7f0e")
class FeatureMode(nn.Module):
    needs_student_hidden = True

    @staticmethod
    def signals(method: MethodConfig) -> SignalRequest:
        return SignalRequest(hidden_layers=tuple(sorted({t for _, t in method.layer_map or []})))

    @staticmethod
    def validate(method: MethodConfig, cfg: ExperimentConfig | None) -> list[str]:
        return [] if method.layer_map else ["feature mode needs layer_map"]

    @staticmethod
    def check_models(method: MethodConfig, student: Any, teacher: Any) -> None:
        """`student`/`teacher`: HF configs (num_hidden_layers)."""
        check_layer_map(method.layer_map or [], int(student.num_hidden_layers),
                        int(teacher.num_hidden_layers))

    @classmethod
    def build(cls, method: MethodConfig, student: nn.Module, teacher_dims: tuple[int, int]
              ) -> nn.Module:
        t_layers, t_hidden = teacher_dims
        check_layer_map(method.layer_map or [], num_layers(student), t_layers)
        return cls(method, hidden_size(student), t_hidden)

    def __init__(self, method: MethodConfig, student_hidden: int, teacher_hidden: int) -> None:
        super().__init__()
        assert method.layer_map
        self.pairs = [tuple(p) for p in method.layer_map]
        self.terms = terms_of(method, {"feature"})
        self.subsample = method.token_subsample
        self.projectors = nn.ModuleList(
            nn.Linear(student_hidden, teacher_hidden, bias=False) for _ in self.pairs)
        for proj in self.projectors:
            nn.init.xavier_uniform_(proj.weight)
        self.request = self.signals(method)

    def forward(self, inputs: StepInputs, last: torch.Tensor, all_hidden, signals: TeacherSignals
                ) -> tuple[torch.Tensor, dict[str, float]]:
        # Positions that count (loss mask of the token itself), optionally subsampled. A
        # strided teacher cache holds every S-th position: those are the candidates, and
        # token_subsample (a fraction of all positions) picks among them, so the loss sees
        # as many positions as it would online (all stored ones when S >= 1 / subsample).
        stride = signals.hidden_stride
        full = torch.ones_like(inputs.input_ids[:, :1], dtype=inputs.mask.dtype)
        token_mask = torch.cat([full, inputs.mask], dim=1)[:, ::stride].reshape(-1) > 0
        idx = token_mask.nonzero().squeeze(1)
        fraction = min(1.0, self.subsample * stride)
        if fraction < 1.0 and idx.numel() > 1:
            keep = max(1, int(idx.numel() * fraction))
            idx = idx[torch.randperm(idx.numel(), device=idx.device)[:keep]].sort().values
        total = last.new_zeros(()).float()
        parts: dict[str, float] = {}
        for (s, t), proj in zip(self.pairs, self.projectors):
            s_h = all_hidden[s][:, ::stride].reshape(-1, all_hidden[s].shape[-1])[idx]
            t_h = signals.hidden[t].reshape(-1, signals.hidden[t].shape[-1])[idx]
            s_p = proj(s_h.to(proj.weight.dtype)).float()
            for spec, weight, params in self.terms:
                value = spec.fn(s_p, t_h.float(), **params)
                total = total + weight * value / len(self.pairs)
                key = spec.name
                parts[key] = parts.get(key, 0.0) + float(value.detach()) / len(self.pairs)
        return total, parts
