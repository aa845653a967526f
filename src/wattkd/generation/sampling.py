"""Choosing the next token from logits: greedy, temperature, top-p (nucleus), seeded."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How to decode. temperature 0 = greedy (argmax); top_p 1.0 = no nucleus cut.
    `ignore_eos` decodes exactly max_new_tokens (EPT windows); otherwise a sequence stops at
    its first `eos_token_id` and later positions hold `pad_token_id`."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    eos_token_id: int | None = None
    pad_token_id: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample_next(logits: Tensor, params: SamplingParams,
                generator: torch.Generator | None = None, *, uniform: Tensor | None = None
                ) -> Tensor:
    """[B, V] logits of the last position -> [B] next token ids (int64).

    Sampling inverts the (top-p cut) CDF at one uniform per row: `uniform` [B, 1] if given (a
    CUDA graph reads them from a buffer filled before each replay), else drawn from
    `generator`. No host sync, so the step is capturable."""
    if params.greedy:
        return blocked_argmax(logits)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = (sorted_p.cumsum(dim=-1) - sorted_p) < params.top_p   # always keeps the first
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    cdf = probs.cumsum(dim=-1)
    if uniform is None:
        uniform = torch.rand((logits.shape[0], 1), generator=generator, device=logits.device,
                             dtype=cdf.dtype)
    u = uniform.to(cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


ARGMAX_BLOCK = 512


def blocked_argmax(logits: Tensor, block: int = ARGMAX_BLOCK) -> Tensor:
    """argmax over the last dim in two reductions (within blocks of `block`, then over the
    blocks' maxima): the same index as `argmax` (the first maximum: the first block holding it,
    its first position there). Why: compiled, one argmax over a 262,144-entry row is a single
    program's loop, 54 us per batch-1 decode step on an H100; split, the first pass runs in
    parallel over the blocks."""
    rows, n = logits.shape
    if n <= 4 * block:
        return logits.argmax(dim=-1)
    pad = (-n) % block
    x = torch.nn.functional.pad(logits, (0, pad), value=float("-inf")).view(rows, -1, block)
    best, where = x.max(dim=-1)
    first = best.argmax(dim=-1, keepdim=True)
    return (first * block + where.gather(-1, first)).squeeze(-1)
