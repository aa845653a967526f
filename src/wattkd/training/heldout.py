"""Held-out loss during training: mean next-token CE over a fixed slice of the held-out shards."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from wattkd.data.loader import ShardDataset
from wattkd.distill.objective import StepInputs
from wattkd.training.batches import batches


def heldout_loss(objective: Any, path: Path, *, tokens: int, batch_size: int,
                 device: torch.device, autocast: Any = nullcontext) -> dict[str, float]:
    """Mean next-token CE over the first `tokens` of the held-out shards (fixed order).
    `autocast` is a factory of the context each forward runs in (the trainer's precision)."""
    ds = ShardDataset(path, shuffle=False, verify="size")
    n_rows = max(1, min(len(ds), math.ceil(tokens / ds.seq_len)))
    total, count = 0.0, 0
    was_training = objective.training
    objective.eval()
    rows = 0
    for batch in batches(ds, min(batch_size, n_rows)):
        inputs = StepInputs.from_batch(batch, device)
        with autocast():
            loss = objective.lm_loss(inputs)
        n = float(inputs.mask.sum())
        total += loss * n
        count += n
        rows += batch["input_ids"].shape[0]
        if rows >= n_rows:
            break
    objective.train(was_training)
    mean = total / max(count, 1.0)
    return {"heldout_loss": mean, "heldout_ppl": math.exp(min(mean, 50.0)),
            "heldout_tokens": int(count)}
