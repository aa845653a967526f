"""Mode factory: config method -> the nn.Module that computes its non-logit losses."""

from __future__ import annotations

from torch import nn

from wattkd.config import MethodConfig
from wattkd.models import hidden_size, num_layers


def make_mode(method: MethodConfig, student: nn.Module, teacher: nn.Module | None) -> nn.Module:
    from wattkd.distill.feature import FeatureMode, check_layer_map
    from wattkd.distill.relation import RelationMode
    from wattkd.distill.response import NoKDMode, ResponseMode

    if method.mode == "none":
        return NoKDMode(method)
    if teacher is None:
        raise ValueError(f"method {method.name!r} ({method.mode}) needs a teacher")
    if method.mode == "response":
        return ResponseMode(method)
    if method.mode == "feature":
        check_layer_map(method.layer_map or [], num_layers(student), num_layers(teacher))
        return FeatureMode(method, hidden_size(student), hidden_size(teacher))
    return RelationMode(method)
