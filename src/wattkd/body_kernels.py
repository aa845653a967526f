"""Opt-in speed-ups of a model's decoder blocks (`train.body_kernels`), the one place they are
applied: `none` (as the model ships), `compile` (torch.compile of each decoder block, in place:
parameter names and checkpoints unchanged) or `triton` (the RMSNorms and the gated MLP
activation of each block through distill/kernels/body.py: one fused pass forward and one
backward instead of ~8 and ~9 elementwise kernels).

Why: in a KD step the bodies (online teacher forward, student forward and backward) are most
of the time, and every peer pays for them; the loss kernels cannot win that part back.
Applied to the student and to the online teacher alike. Modules of other classes are left as
they are (the patch is by class name: the Gemma, Llama, Qwen and Mistral families).
"""

from __future__ import annotations

import logging
import os
import types

import torch
from torch import nn

from wattkd.errors import ConfigError
from wattkd.models import decoder_layers

__all__ = ["BODY_KERNELS", "apply_body_kernels"]

log = logging.getLogger(__name__)

BODY_KERNELS = ("none", "compile", "triton")
# RMSNorm classes by convention: Gemma's (x_hat * (1 + w)).to(x) vs Llama's w * x_hat.to(x)
_GEMMA_NORMS = {"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"}
_LLAMA_NORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"}
_ACTS = {"GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "SiLUActivation": "silu",
         "SiLU": "silu"}


def apply_body_kernels(model: nn.Module, how: str, device: torch.device) -> str:
    """Apply `how` (one of BODY_KERNELS) to `model`'s decoder blocks, in place; returns a line
    saying what was changed (logged; empty for `none`)."""
    if how not in BODY_KERNELS:
        raise ConfigError(f"train.body_kernels must be one of {', '.join(BODY_KERNELS)}, "
                          f"got {how!r}")
    if how == "none":
        return ""
    layers = decoder_layers(model)
    if how == "compile":
        for layer in layers:
            layer.compile()
        done = f"torch.compile of {len(layers)} decoder blocks"
    else:
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(f"train.body_kernels=triton needs a CUDA device (the model runs "
                              f"on {device.type}); use none or compile")
        norms, mlps = patch_triton(model)
        if not norms and not mlps:
            raise ConfigError(f"train.body_kernels=triton: no RMSNorm or gated MLP of a known "
                              f"class in {type(model).__name__}'s blocks; use compile")
        done = f"Triton kernels in {norms} RMSNorms and {mlps} gated MLPs"
    log.info("body kernels (%s): %s", type(model).__name__, done)
    return done


def patch_triton(module: nn.Module) -> tuple[int, int]:
    """Route every RMSNorm and gated MLP of a known class under `module` through the Triton
    kernels (instance forward replaced; parameters untouched): (norms, mlps) patched."""
    from wattkd.distill.kernels import body  # lazy: triton is optional

    norms = mlps = 0
    for sub in module.modules():
        name = type(sub).__name__
        if name in _GEMMA_NORMS or name in _LLAMA_NORMS:
            gemma = name in _GEMMA_NORMS
            eps = float(getattr(sub, "eps", getattr(sub, "variance_epsilon", 1e-6)))

            def norm_forward(self, x, _eps=eps, _offset=1.0 if gemma else 0.0,
                             _cast=not gemma):
                return body.rms_norm(x, self.weight, _eps, _offset, _cast)

            sub.forward = types.MethodType(norm_forward, sub)
            norms += 1
        elif all(hasattr(sub, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            act = _ACTS.get(type(sub.act_fn).__name__)
            if act is None:
                continue
            code = body.GELU_TANH if act == "gelu_tanh" else body.SILU

            def mlp_forward(self, x, _code=code):
                return self.down_proj(body.gated_act(self.gate_proj(x), self.up_proj(x), _code))

            sub.forward = types.MethodType(mlp_forward, sub)
            mlps += 1
    return norms, mlps
