"""The online teacher: `signals(batch)` like the cached one (teacher_cache.CachedTeacher).

A method declares what it needs in a `SignalRequest` (distill/signals.py); the provider
returns exactly that in `TeacherSignals`. The online provider runs the teacher under no_grad
and hands back its final hidden state plus head, so logits are only ever formed chunk by
chunk inside the fused loss; every requested signal kind captures its part during that one
forward (`teacher_forward`, which a cache build runs too).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from wattkd.distill.signals import (
    SignalKind,
    SignalRequest,
    TeacherForward,
    TeacherSignals,
    logit_softcap,
)
from wattkd.models import unwrap

__all__ = ["OnlineTeacher", "decoder_forward", "logit_softcap", "teacher_forward"]


def decoder_forward(model: nn.Module, input_ids: torch.Tensor,
                    hidden: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Run the decoder stack only (no LM head): final hidden state and optional all layers.
    A teacher sharded by `wattkd.sharding` runs it through its FSDP-registered method."""
    sharded = getattr(model, "wattkd_decoder_forward", None)
    decoder = sharded if sharded is not None else unwrap(model).get_decoder()
    out = decoder(input_ids=input_ids, output_hidden_states=hidden, use_cache=False)
    return out.last_hidden_state, (out.hidden_states if hidden else None)


def teacher_forward(model: nn.Module, input_ids: torch.Tensor,
                    kinds: list[tuple[SignalKind, Any]]
                    ) -> tuple[dict[str, dict[str, Any]], TeacherForward]:
    """One decoder forward with every kind's capture active: (captured per kind, forward)."""
    with contextlib.ExitStack() as stack:
        captured = {kind.name: stack.enter_context(kind.capture(model, params))
                    for kind, params in kinds}
        last, hidden = decoder_forward(model, input_ids,
                                       any(k.needs_hidden_states(p) for k, p in kinds))
    return captured, TeacherForward(model, last, hidden)


class OnlineTeacher:
    """Teacher forward under no_grad, in the teacher's own dtype and device placement."""

    def __init__(self, model: nn.Module, request: SignalRequest) -> None:
        self.model = model
        self.request = request
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def signals(self, batch: dict[str, torch.Tensor]) -> TeacherSignals:
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        kinds = self.request.kinds()
        captured, fwd = teacher_forward(self.model, input_ids, kinds)
        sig = TeacherSignals()
        for kind, params in kinds:
            kind.put(sig, kind.answer(captured[kind.name], params, fwd))
        return sig
