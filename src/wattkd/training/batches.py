"""Samples -> batches: consecutive samples stacked, in the dataset's (seeded) order."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch


def batches(dataset: Iterable[dict[str, Any]], batch_size: int
            ) -> Iterator[dict[str, torch.Tensor]]:
    """Stack consecutive samples; the dataset's order (seeded, rank-aware) is the data order."""
    buf: list[dict[str, torch.Tensor]] = []
    for sample in dataset:
        buf.append(sample)
        if len(buf) == batch_size:
            yield {k: torch.stack([s[k] for s in buf]) for k in buf[0]
                   if isinstance(buf[0][k], torch.Tensor)}
            buf = []
