"""The no-KD baseline (`method: none`): same student, same data, same loop, CE only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from wattkd.distill.methods.registry import register_method
from wattkd.distill.methods.response import ResponseMode
from wattkd.distill.signals import SignalRequest

if TYPE_CHECKING:
    from wattkd.config import MethodConfig


@register_method("none", loss_kinds=set(), needs_teacher=False, kind="baseline", order=3,
                 colour="#7f7f7f")
class NoKDMode(ResponseMode):
    def __init__(self, method: MethodConfig) -> None:
        nn.Module.__init__(self)
        self.request = self.signals(method)

    @staticmethod
    def signals(method: MethodConfig) -> SignalRequest:
        return SignalRequest()

    @classmethod
    def build(cls, method: MethodConfig, student: nn.Module, teacher_dims: Any) -> nn.Module:
        return cls(method)
