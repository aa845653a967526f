"""What the ranks of a DDP / FSDP run agree on: logged losses, stop decisions, RNG, norms.

Each helper is a collective when there is more than one process (every rank calls it at the
same step) and a plain value otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import gather_object

from wattkd import checkpoint


def clip_grad_norm(accelerator: Any, params: list[torch.Tensor], max_norm: float,
                   fsdp: bool) -> float:
    """Clip the global gradient norm; under FSDP the norm of sharded gradients is a DTensor
    whose full value needs a reduction over the ranks."""
    if not fsdp:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def rng_by_rank(accelerator: Any, extra: dict[str, Any] | None = None
                ) -> list[dict[str, Any]]:
    """Every rank's RNG states (a collective: all ranks call it at the same step), with this
    rank's `extra` entries (the on-policy rollout generator)."""
    state = {**checkpoint.rng_state(), **(extra or {})}
    if accelerator.num_processes == 1:
        return [state]
    return gather_object([state])


def mean_over_ranks(accelerator: Any, parts: dict[str, float]) -> dict[str, float]:
    """Logged losses are the global batch's (mean over ranks, equal token counts per rank),
    so a DDP run's log is comparable with a single-process run of the same global batch."""
    if accelerator.num_processes == 1:
        return parts
    keys = sorted(parts)
    t = torch.tensor([parts[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))


def peak_memory_gb(accelerator: Any) -> float | None:
    """Largest peak of allocated GPU memory on any rank since the start (GB), the figure that
    says whether a model fits; None off CUDA."""
    device = accelerator.device
    if device.type != "cuda":
        return None
    t = torch.tensor([torch.cuda.max_memory_allocated(device) / 1e9], device=device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return round(t.item(), 3)


def any_rank(accelerator: Any, flag: bool) -> bool:
    """True on every rank if it is true on any (energy is read on one rank per node, and a
    preemption signal may reach only some ranks): all ranks must stop at the same step."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)
