"""Mode factory: config method -> the nn.Module that computes its non-logit losses."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from wattkd.distill.methods import get_method

if TYPE_CHECKING:
    from wattkd.config import MethodConfig


def make_mode(method: MethodConfig, student: nn.Module,
              teacher_dims: tuple[int, int] | None, *, batch_size: int | None = None
              ) -> nn.Module:
    """`teacher_dims` = (number of layers, hidden size) of the teacher, None without one (the
    cached-signal path has no teacher model in memory, only its config). The method's
    declaration (distill/methods/<name>.py) builds it."""
    spec = get_method(method.method)
    if spec.needs_teacher and teacher_dims is None:
        raise ValueError(f"method {method.name!r} ({method.method}) needs a teacher")
    need = spec.min_batch(method)
    if batch_size is not None and batch_size < need:
        raise ValueError(f"method {method.name!r}: relation losses compare sequences within a "
                         f"micro-batch and need train.micro_batch_size >= {need}, got "
                         f"{batch_size}")
    return spec.cls.build(method, student, teacher_dims)
