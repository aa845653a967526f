"""The teacher's side of a cache build: one forward, then every requested kind's cache value.

Each kind computes its value as the cache stores it (`SignalKind.cache_value`, distill/signals:
top-k log-probs formed exactly as the online path forms logits, hidden states strided and in
16 bits, pooled fp32, registered kinds in 16 bits).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from wattkd.distill.signals import CacheContext, SignalRequest
from wattkd.distill.teacher import teacher_forward

__all__ = ["teacher_batch"]


@torch.no_grad()
def teacher_batch(model: nn.Module, input_ids: torch.Tensor, spec: SignalRequest,
                  ctx: CacheContext) -> dict[str, Any]:
    """Run the teacher once on [B, L] ids and compute every signal `spec` asks for, as the
    cache stores them (still on the teacher's device): {kind name: value}."""
    kinds = spec.kinds()
    captured, fwd = teacher_forward(model, input_ids, kinds)
    return {kind.name: kind.cache_value(captured[kind.name], params, fwd, ctx)
            for kind, params in kinds}
