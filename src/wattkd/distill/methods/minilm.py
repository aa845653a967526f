"""Self-attention relation KD (MiniLMv2; Wang et al., 2021, "MiniLMv2: Multi-Head
Self-Attention Relation Distillation for Compressing Pretrained Transformers").

For one teacher layer and one student layer, the outputs of q_proj, k_proj and v_proj are
split into `relation_heads` heads of width d_r; each head's Q-Q, K-K and V-V relation is
softmax(X X^T / sqrt(d_r)) over the keys, with the causal mask of a decoder and positions of
loss_mask 0 masked as queries and keys. The loss is KL(teacher || student) per query row,
averaged over heads and counted rows, summed over the three relations. Relations are
[seq x seq], so teacher and student widths (and head counts) may differ: only the number of
relation heads is shared. Teacher Q/K/V come from the `qkv` signal (online hooks or the
teacher cache); the student's from hooks on its own layer.

    - name: minilm
      method: minilm
      params: {teacher_layer: 2, student_layer: -1, relation_heads: 4}
      losses: [{name: attention_relation_kl}, {name: ce}]
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import AutoConfig

from wattkd.distill.methods.registry import method_params, register_method
from wattkd.distill.objective import StepInputs, terms_of
from wattkd.distill.registry import register_loss
from wattkd.distill.signals import (
    PROJECTIONS,
    SignalRequest,
    TeacherSignals,
    hook_projections,
    projection_widths,
)
from wattkd.models import ModelError, decoder_layers, unwrap

if TYPE_CHECKING:
    from wattkd.config import ExperimentConfig, MethodConfig


class MiniLMParams(BaseModel):
    """`params:` of a minilm method."""

    model_config = ConfigDict(extra="forbid")
    teacher_layer: int = Field(ge=0, description="teacher decoder layer (0-based)")
    student_layer: int = Field(default=-1, description="student decoder layer; negative "
                               "counts from the end (-1: the last, as in MiniLMv2)")
    relation_heads: int = Field(gt=0, description="relation heads; must divide the q/k/v "
                                "projection widths of both models")


@register_loss("attention_relation_kl", kind="attention")  # type: ignore[arg-type]
def attention_relation_kl(s: torch.Tensor, t: torch.Tensor,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) of relation distributions: log-probs [B, A, L, L] over the last
    axis (masked keys at a huge negative value); `mask` [B, L] = query rows that count."""
    p = t.exp()
    kl = (p * (t - s)).sum(-1)                                   # [B, A, L]
    if mask is None:
        return kl.mean()
    rows = mask[:, None, :].to(kl.dtype).expand_as(kl)
    return (kl * rows).sum() / rows.sum().clamp(min=1.0)


def relation_logprobs(x: torch.Tensor, heads: int, valid: torch.Tensor) -> torch.Tensor:
    """[B, L, d] projections -> [B, heads, L, L] log-softmax of the scaled dot products over
    causal, valid keys (fp32). A query row with no valid key keeps its diagonal (excluded
    from the loss by the caller's row mask)."""
    b, n, d = x.shape
    dr = d // heads
    xh = x.float().reshape(b, n, heads, dr).transpose(1, 2)      # [B, A, L, dr]
    scores = xh @ xh.transpose(-1, -2) / math.sqrt(dr)
    causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    keys = causal[None] & valid[:, None, :]                      # [B, L, L]
    keys = keys | (torch.eye(n, dtype=torch.bool, device=x.device)[None] & ~keys.any(-1,
                                                                                   keepdim=True))
    scores = scores.masked_fill(~keys[:, None], torch.finfo(scores.dtype).min)
    return torch.log_softmax(scores, dim=-1)


def _dims_problems(p: MiniLMParams, student: Any, teacher: Any) -> list[str]:
    """Named problems of the params for these HF configs (either may be None: unknown)."""
    out = []
    for who, conf, layer in (("teacher", teacher, p.teacher_layer),
                             ("student", student, p.student_layer)):
        if conf is None:
            continue
        n = int(conf.num_hidden_layers)
        if not -n <= layer < n:
            out.append(f"params.{who}_layer: {layer} is out of range: the {who} has {n} "
                       f"decoder layers (0..{n - 1}, or -{n}..-1 from the end)")
        for proj, width in projection_widths(conf).items():
            if width % p.relation_heads:
                out.append(f"params.relation_heads: {p.relation_heads} does not divide the "
                           f"{who}'s {proj}_proj width {width}")
    return out


def _build_conf(build: dict[str, Any] | None, layers: int | None = None) -> Any:
    if not build or "model_type" not in build:
        return None
    kwargs = dict(build)
    conf = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    conf = getattr(conf, "text_config", conf)
    if layers is not None:
        conf.num_hidden_layers = layers
    return conf


@register_method("minilm", loss_kinds={"attention"}, guard=True, params=MiniLMParams,
                 order=4, colour="#9467bd")
class MiniLMMode(nn.Module):
    needs_student_hidden = False

    def __init__(self, method: MethodConfig, student: nn.Module) -> None:
        super().__init__()
        p = method_params(method)
        self.heads = p.relation_heads
        self.teacher_layer = p.teacher_layer
        self.terms = terms_of(method, {"attention"})
        self.request = self.signals(method)
        layer = decoder_layers(student)[p.student_layer]
        self._slots, _ = hook_projections([layer])  # hooks live as long as the student

    @staticmethod
    def signals(method: MethodConfig) -> SignalRequest:
        return SignalRequest(extra=(("qkv", (method_params(method).teacher_layer,)),))

    @staticmethod
    def validate(method: MethodConfig, cfg: ExperimentConfig | None) -> list[str]:
        """At config load: what the configs of models built from `build:` already tell
        (pretrained folders are checked by `check_models` before any weight loads)."""
        if cfg is None:
            return []
        teacher = _build_conf(cfg.teacher.build)
        if cfg.student.from_teacher_layers is not None:
            student = _build_conf(cfg.teacher.build, len(cfg.student.from_teacher_layers))
        else:
            student = _build_conf(cfg.student.build)
        return _dims_problems(method_params(method), student, teacher)

    @staticmethod
    def check_models(method: MethodConfig, student: Any, teacher: Any) -> None:
        problems = _dims_problems(method_params(method), student, teacher)
        if problems:
            raise ModelError("; ".join(problems))

    @classmethod
    def build(cls, method: MethodConfig, student: nn.Module, teacher_dims: Any) -> nn.Module:
        cls.check_models(method, unwrap(student).config, None)
        return cls(method, student)

    def forward(self, inputs: StepInputs, last: torch.Tensor, all_hidden: Any,
                signals: TeacherSignals) -> tuple[torch.Tensor, dict[str, float]]:
        student = self._slots[0]
        teacher = signals.extra["qkv"][self.teacher_layer]
        full = torch.ones_like(inputs.input_ids[:, :1], dtype=inputs.mask.dtype)
        valid = torch.cat([full, inputs.mask], dim=1) > 0            # [B, L] token counts
        total = last.new_zeros(()).float()
        parts: dict[str, float] = {}
        for spec, weight, params in self.terms:
            value = last.new_zeros(()).float()
            for proj in PROJECTIONS:
                t_x = teacher[proj].to(valid.device)
                if t_x.shape[-1] % self.heads:
                    raise ModelError(f"relation_heads {self.heads} does not divide the "
                                     f"teacher's {proj}_proj width {t_x.shape[-1]}")
                value = value + spec.fn(relation_logprobs(student[proj], self.heads, valid),
                                        relation_logprobs(t_x, self.heads, valid),
                                        valid, **params)
            total = total + weight * value
            parts[spec.name] = float(value.detach())
        student.clear()  # do not hold the step's activations until the next forward
        return total, parts
