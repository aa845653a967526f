"""Mode factory: config method -> the nn.Module that computes its non-logit losses."""

from __future__ import annotations

from torch import nn

from wattkd.config import MethodConfig
from wattkd.models import hidden_size, num_layers


def make_mode(method: MethodConfig, student: nn.Module,
              teacher_dims: tuple[int, int] | None, *, batch_size: int | None = None
              ) -> nn.Module:
    """`teacher_dims` = (number of layers, hidden size) of the teacher, None without one (the
    cached-signal path has no teacher model in memory, only its config)."""
    from wattkd.distill.feature import FeatureMode, check_layer_map
    from wattkd.distill.relation import RelationMode
    from wattkd.distill.response import NoKDMode, ResponseMode

    if method.mode == "none":
        return NoKDMode(method)
    if teacher_dims is None:
        raise ValueError(f"method {method.name!r} ({method.mode}) needs a teacher")
    if method.mode == "response":
        return ResponseMode(method)
    if method.mode == "feature":
        t_layers, t_hidden = teacher_dims
        check_layer_map(method.layer_map or [], num_layers(student), t_layers)
        return FeatureMode(method, hidden_size(student), t_hidden)
    need = max((3 if t.name == "rkd_angle" else 2 for t in method.losses
                if t.name.startswith("rkd_")), default=0)
    if batch_size is not None and batch_size < need:
        raise ValueError(f"method {method.name!r}: relation losses compare sequences within a "
                         f"micro-batch and need train.micro_batch_size >= {need}, got "
                         f"{batch_size}")
    return RelationMode(method)
