"""The decoder-body Triton kernels (distill/kernels/body.py: RMSNorm, GeGLU/SwiGLU) against fp64
references, values and gradients, and `train.body_kernels` applied to real (tiny) Gemma 3 and
Llama models: same outputs and gradients as the models as shipped. Compiled on CUDA when a GPU
is present, else Triton's interpreter on CPU."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

ON_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before the kernels are decorated
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")

pytest.importorskip("triton", reason="triton not installed (pip install -e '.[dev]')")

from wattkd.body_kernels import apply_body_kernels
from wattkd.distill.kernels import body
from wattkd.errors import ConfigError
from wattkd.models import build_from_config


def _close(got, want, rel):
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert err <= rel, f"relative error {err:.2e} > {rel}"


def _rms_reference(x, w, eps, gemma):
    """The two Hugging Face conventions, written out in fp64."""
    x64, w64 = x.double(), w.double()
    xh = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    return xh * (1.0 + w64) if gemma else w64 * xh


@pytest.mark.parametrize("gemma", [True, False], ids=["gemma", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_matches_fp64(gemma, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 48, generator=g) * 3).to(DEVICE, dtype).requires_grad_(True)
    w = (torch.randn(48, generator=g) * 0.5).to(DEVICE).requires_grad_(True)  # fp32 master
    dy = torch.randn(3, 5, 48, generator=g).to(DEVICE)   # 15 rows: a ragged last program
    y = body.rms_norm(x, w, 1e-6, 1.0 if gemma else 0.0, not gemma)
    assert y.dtype == (dtype if gemma else torch.float32)   # as the HF modules return
    ref = _rms_reference(x, w, 1e-6, gemma)
    rel = 1e-5 if dtype == torch.float32 else 1e-2
    _close(y, ref, rel)
    gx, gw = torch.autograd.grad(y, [x, w], dy.to(y.dtype))
    rx, rw = torch.autograd.grad(ref, [x, w], dy.double())
    assert gx.dtype == dtype and gw.dtype == torch.float32
    _close(gx, rx, 1e-5 if dtype == torch.float32 else 1e-2)
    _close(gw, rw, 1e-5 if dtype == torch.float32 else 1e-2)


def _act_reference(gate, up, act):
    g = gate.double()
    if act == body.GELU_TANH:
        a = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
    else:
        a = g * torch.sigmoid(g)
    return a * up.double()


@pytest.mark.parametrize("act", [body.GELU_TANH, body.SILU], ids=["geglu", "swiglu"])
def test_gated_activation_matches_fp64(act):
    g = torch.Generator().manual_seed(1)
    gate = (torch.randn(3, 5, 70, generator=g) * 4).to(DEVICE).requires_grad_(True)
    up = torch.randn(3, 5, 70, generator=g).to(DEVICE).requires_grad_(True)
    dy = torch.randn(3, 5, 70, generator=g).to(DEVICE)
    y = body.gated_act(gate, up, act)
    ref = _act_reference(gate, up, act)
    _close(y, ref, 1e-5)
    for got, want in zip(torch.autograd.grad(y, [gate, up], dy),
                         torch.autograd.grad(ref, [gate, up], dy.double())):
        _close(got, want, 1e-5)


TINY = {
    "gemma3_text": {"model_type": "gemma3_text", "hidden_size": 32, "intermediate_size": 48,
                    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                    "head_dim": 16, "max_position_embeddings": 64, "sliding_window": 8,
                    "query_pre_attn_scalar": 16},
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
              "max_position_embeddings": 64},
}


@pytest.mark.parametrize("arch", list(TINY))
def test_triton_body_gives_the_models_outputs_and_gradients(arch):
    """The patched model against the same model as shipped (same weights): logits and every
    parameter's gradient. Gemma 3: 6 norms a block (incl. q/k norms) + the final one."""
    def build():
        return build_from_config(TINY[arch], 128, seed=0).to(DEVICE)

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    plain, patched = build(), build()
    done = apply_body_kernels(patched, "triton", DEVICE)
    norms = 2 * 6 + 1 if arch == "gemma3_text" else 2 * 2 + 1
    assert done == f"Triton kernels in {norms} RMSNorms and 2 gated MLPs"
    outs = []
    for model in (plain, patched):
        logits = model(ids).logits
        logits.float().pow(2).mean().backward()
        outs.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    _close(outs[1][0], outs[0][0], 1e-5)
    assert outs[0][1].keys() == outs[1][1].keys()
    for name, grad in outs[0][1].items():
        _close(outs[1][1][name], grad, 1e-4)


def test_compile_keeps_parameter_names_and_bad_settings_are_refused(monkeypatch):
    model = build_from_config(TINY["llama"], 128, seed=0)
    keys = list(model.state_dict())
    assert apply_body_kernels(model, "compile", torch.device("cpu")) == \
        "torch.compile of 2 decoder blocks"
    assert list(model.state_dict()) == keys   # checkpoints unchanged (no _orig_mod.)
    assert apply_body_kernels(model, "none", torch.device("cpu")) == ""
    with pytest.raises(ConfigError, match="train.body_kernels must be one of none, compile"):
        apply_body_kernels(model, "fast", torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="body_kernels=triton needs a CUDA device"):
        apply_body_kernels(model, "triton", torch.device("cpu"))


def test_triton_body_refuses_a_model_without_known_blocks():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ConfigError, match="no RMSNorm or gated MLP of a known class"):
        apply_body_kernels(gpt2, "triton", DEVICE)


def test_reference_conventions_are_the_hf_modules():
    """The fp64 references above are the HF modules' own formulas (checked once, in fp32)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(4, 16)
    for cls, gemma in ((Gemma3RMSNorm, True), (LlamaRMSNorm, False)):
        mod = cls(16, eps=1e-6)
        with torch.no_grad():
            mod.weight.normal_()
        _close(mod(x), _rms_reference(x, mod.weight, 1e-6, gemma), 1e-6)
    gate = torch.randn(50) * 3
    _close(F.gelu(gate, approximate="tanh"), _act_reference(gate, torch.ones(50),
                                                            body.GELU_TANH), 1e-6)


def test_config_key_defaults_to_none_and_refuses_compile_under_fsdp():
    from pydantic import ValidationError

    from wattkd.config import TrainConfig

    assert TrainConfig().body_kernels == "none"
    assert TrainConfig(body_kernels="triton", strategy="fsdp").body_kernels == "triton"
    with pytest.raises(ValidationError, match="body_kernels=compile is not supported with "
                                              "strategy=fsdp"):
        TrainConfig(body_kernels="compile", strategy="fsdp")
    with pytest.raises(ValidationError, match="body_kernels"):
        TrainConfig(body_kernels="fast")
