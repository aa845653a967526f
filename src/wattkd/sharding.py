"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the student objective and the online teacher.

`train.strategy: fsdp` shards the student's parameters, gradients and optimizer state over the
ranks (each decoder layer is one unit, the rest of the objective - embeddings, LM head, final
norm, projectors - the root unit). The objective is the FSDP root, so the fused logit loss, which
reads the student's LM-head weight inside `DistillObjective.forward`, sees it unsharded, and
`lm_loss` (in-loop evaluation, divergence guard) is registered as a second forward method.

The online teacher is frozen: only its decoder layers are sharded (all-gathered one layer at a
time during its forward); its embeddings and LM head stay whole on every rank because the fused
loss multiplies teacher hidden states by the head weight outside the teacher's forward.

Checkpoints hold full (unsharded) state dicts gathered with `torch.distributed.checkpoint`'s
state-dict helpers and written by rank 0, which alone reads them back on resume and broadcasts
them; rank 0 also writes the final HF folder from the gathered state.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from wattkd.errors import InputError

log = logging.getLogger(__name__)


class ShardingError(InputError, RuntimeError):
    """A model that cannot be sharded (no decoder layers found)."""


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of an HF model (its `_no_split_modules` classes), innermost
    first, so nested matches are wrapped before their parents."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ShardingError(f"cannot shard {type(base).__name__}: no module of its "
                            f"_no_split_modules classes {sorted(names)} found")
    return list(reversed(layers))


def _mp_policy(bf16: bool, *, cast_inputs: bool = True) -> Any:
    # bf16 compute on all-gathered params, gradients reduced in fp32, fp32 master shards.
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                reduce_dtype=torch.float32, cast_forward_inputs=cast_inputs)


def shard_objective(objective: nn.Module, student: nn.Module, *, bf16: bool,
                    reshard_after_forward: bool) -> nn.Module:
    """Shard `objective` in place (student layers, then the objective as root)."""
    layers = decoder_layers(student)
    for layer in layers:
        fully_shard(layer, mp_policy=_mp_policy(bf16),
                    reshard_after_forward=reshard_after_forward)
    # The root keeps its parameters (embeddings + LM head) gathered from forward to backward
    # (FSDP's default for a root), and its inputs - masks, teacher log-probs and hidden
    # states - are not cast to bf16: autocast sets the compute dtypes, as under DDP.
    fully_shard(objective, mp_policy=_mp_policy(bf16, cast_inputs=False))
    register_fsdp_forward_method(objective, "lm_loss")
    log.info("FSDP: student sharded in %d layer units + root (reshard_after_forward=%s)",
             len(layers), reshard_after_forward)
    return objective


def shard_teacher(teacher: nn.Module) -> nn.Module:
    """Shard a frozen teacher over the ranks: each decoder layer is all-gathered for its
    forward and freed after it. The teacher is the root unit, which FSDP keeps unsharded after
    its forward (embeddings, final norm, LM head: whole on every rank from the first forward
    on), so the fused loss can read the head weight after the teacher's forward."""
    layers = decoder_layers(teacher)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True)
    # No reshard_after_forward here: a root left at FSDP's default stays gathered after its
    # forward, which the fused loss relies on (a sharded head weight would fail loudly there).
    fully_shard(teacher)
    # The teacher runs its decoder only (no full-vocabulary logits): make that call an FSDP
    # forward of the root, so the root's parameters are gathered for it.
    teacher.wattkd_decoder_forward = types.MethodType(_decoder_only, teacher)
    register_fsdp_forward_method(teacher, "wattkd_decoder_forward")
    log.info("FSDP: teacher sharded in %d layer units + root", len(layers))
    return teacher


def _decoder_only(self: nn.Module, **kwargs: Any) -> Any:
    return self.get_decoder()(**kwargs)


def _options(**kw: Any) -> Any:
    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(module: nn.Module, *, frozen: bool = True) -> dict[str, torch.Tensor]:
    """The whole unsharded state dict on CPU, on rank 0 (empty elsewhere). A collective.
    frozen=False leaves frozen parameters out (LoRA: the base is not gathered at all)."""
    return get_model_state_dict(module, options=_options(cpu_offload=True,
                                                         ignore_frozen_params=not frozen))


def full_states(module: nn.Module, optimizer: torch.optim.Optimizer, *, frozen: bool = True
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Unsharded model and optimizer state dicts (optimizer keyed by parameter names) on
    rank 0. A collective: every rank calls it at the same step."""
    return get_state_dict(module, optimizer, options=_options(
        cpu_offload=True, ignore_frozen_params=not frozen))


def load_full_states(module: nn.Module, optimizer: torch.optim.Optimizer,
                     model_state: dict[str, Any], optim_state: dict[str, Any], *,
                     full: bool) -> tuple[list[str], list[str]]:
    """Load full state dicts (as `full_states` wrote them) into the sharded module and its
    optimizer. Rank 0 passes them (read from the checkpoint), the other ranks empty dicts:
    rank 0 broadcasts tensor by tensor and each rank keeps its shards, so only rank 0 holds
    the whole checkpoint in host memory.

    Returns (missing, unexpected) keys, decided on rank 0 before anything is loaded and the
    same on every rank (set_state_dict itself would fill missing keys with the live values
    silently). `full`: the checkpoint should hold every key (else only the trainable ones)."""
    verdict: list[Any] = [None]
    if dist.get_rank() == 0:
        have = set(module.state_dict())
        want = have if full else {n for n, p in module.named_parameters() if p.requires_grad}
        verdict = [(sorted(want - set(model_state)), sorted(set(model_state) - have))]
    dist.broadcast_object_list(verdict, src=0)
    missing, unexpected = verdict[0]
    if (full and missing) or unexpected:
        return missing, unexpected
    # Two calls: set_state_dict would skip the model on ranks passing an empty model dict.
    opts = _options(broadcast_from_rank0=True, strict=False)
    set_model_state_dict(module, model_state, options=opts)
    set_optimizer_state_dict(module, optimizer, optim_state, options=opts)
    return missing, unexpected


def drop_tied_duplicates(model: nn.Module, state: dict[str, torch.Tensor]
                         ) -> dict[str, torch.Tensor]:
    """A gathered state dict holds a tied LM head twice (as separate copies, which
    `save_pretrained` keeps); drop the tied names. Adapters (peft) carry no tied head."""
    if hasattr(model, "get_base_model"):
        return state
    config = model.config
    if not getattr(config.get_text_config(), "tie_word_embeddings", False):
        return state
    tied = getattr(model, "_tied_weights_keys", None) or []
    return {k: v for k, v in state.items() if k not in set(tied)}
