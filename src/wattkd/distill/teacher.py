"""Teacher signal providers: one method, `signals(batch)`, for the online and cached teacher.

A mode declares what it needs in a `SignalRequest`; the provider returns exactly that in
`TeacherSignals`. The online provider runs the teacher under no_grad and hands back its final
hidden state plus head, so logits are only ever formed chunk by chunk inside the fused loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from wattkd.models import unwrap


@dataclass(frozen=True)
class SignalRequest:
    logits: bool = False                      # response KD
    hidden_layers: tuple[int, ...] = ()       # feature KD: HF hidden_states indices (0 = embeddings)
    pooled: str | None = None                 # relation KD: "mean" | "last"

    def merge(self, other: SignalRequest) -> SignalRequest:
        return SignalRequest(self.logits or other.logits,
                             tuple(sorted(set(self.hidden_layers) | set(other.hidden_layers))),
                             self.pooled or other.pooled)

    @property
    def empty(self) -> bool:
        return not (self.logits or self.hidden_layers or self.pooled)


@dataclass
class TopK:
    """Cached teacher logits: top-k ids and log-probs under the full softmax, plus tail mass."""

    ids: torch.Tensor           # [B, L, K] int
    logprobs: torch.Tensor      # [B, L, K]
    tail_logprob: torch.Tensor  # [B, L]


@dataclass
class TeacherSignals:
    last_hidden: torch.Tensor | None = None     # [B, L, Ht] after the final norm (online)
    head: nn.Module | None = None               # teacher output embeddings (online)
    softcap: float | None = None                # final logit soft-capping of the teacher
    topk: TopK | None = None                    # cached alternative to last_hidden + head
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # index -> [B, L, Ht]
    hidden_stride: int = 1    # a strided cache holds positions 0, S, 2S, ...: [B, ceil(L/S), Ht]
    pooled: torch.Tensor | None = None          # [B, Ht]


class TeacherProvider(Protocol):
    request: SignalRequest

    def signals(self, batch: dict[str, torch.Tensor]) -> TeacherSignals: ...


def pool(hidden: torch.Tensor, how: str) -> torch.Tensor:
    """Sequence embedding from token states: mean over positions, or the last position."""
    if how == "mean":
        return hidden.float().mean(dim=1)
    if how == "last":
        return hidden[:, -1].float()
    raise ValueError(f"unknown pooling {how!r}; expected mean or last")


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
        last, all_hidden = decoder_forward(self.model, input_ids, want_hidden)
        sig = TeacherSignals()
        if self.request.logits:
            sig.last_hidden = last
            sig.head = unwrap(self.model).get_output_embeddings()
            sig.softcap = logit_softcap(self.model)
        if want_hidden:
            assert all_hidden is not None
            sig.hidden = {i: all_hidden[i] for i in self.request.hidden_layers}
        if self.request.pooled:
            sig.pooled = pool(last, self.request.pooled)
        return sig
