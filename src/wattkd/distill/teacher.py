"""The online teacher: `signals(batch)` like the cached one (teacher_cache.CachedTeacher).

A method declares what it needs in a `SignalRequest` (distill/signals.py); the provider
returns exactly that in `TeacherSignals`. The online provider runs the teacher under no_grad
and hands back its final hidden state plus head, so logits are only ever formed chunk by
chunk inside the fused loss; registered signal kinds capture their part during that forward.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from wattkd.distill.signals import SIGNALS, SignalRequest, TeacherSignals, pool
from wattkd.models import unwrap


def logit_softcap(model: nn.Module) -> float | None:
    return getattr(unwrap(model).config, "final_logit_softcapping", None)


def decoder_forward(model: nn.Module, input_ids: torch.Tensor,
                    hidden: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Run the decoder stack only (no LM head): final hidden state and optional all layers.
    A teacher sharded by `wattkd.sharding` runs it through its FSDP-registered method."""
    sharded = getattr(model, "wattkd_decoder_forward", None)
    decoder = sharded if sharded is not None else unwrap(model).get_decoder()
    out = decoder(input_ids=input_ids, output_hidden_states=hidden, use_cache=False)
    return out.last_hidden_state, (out.hidden_states if hidden else None)


class OnlineTeacher:
    """Teacher forward under no_grad, in the teacher's own dtype and device placement."""

    def __init__(self, model: nn.Module, request: SignalRequest) -> None:
        self.model = model
        self.request = request
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def signals(self, batch: dict[str, torch.Tensor]) -> TeacherSignals:
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        want_hidden = bool(self.request.hidden_layers)
        with contextlib.ExitStack() as stack:
            captured = {name: stack.enter_context(SIGNALS[name].capture(self.model, params))
                        for name, params in self.request.extra}
            last, all_hidden = decoder_forward(self.model, input_ids, want_hidden)
        sig = TeacherSignals()
        for name, params in self.request.extra:
            sig.extra[name] = SIGNALS[name].online(captured[name], params)
        if self.request.logits:
            sig.last_hidden = last
            sig.head = unwrap(self.model).get_output_embeddings()
            sig.softcap = logit_softcap(self.model)
        if want_hidden:
            assert all_hidden is not None
            sig.hidden = {i: all_hidden[i] for i in self.request.hidden_layers}
        for how in self.request.pooled:
            sig.pooled[how] = pool(last, how)
        return sig
