"""The rollout copy of a student kept in fp32 for training (training/rollouts.DecodeCopy): the
graph engine decodes one dtype, so on CUDA rollouts decode a bf16 copy refreshed from the
student before each rollout. Checked on CPU against the student itself (the CUDA condition is
the only part not run here)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from wattkd.generation import SamplingParams, generate
from wattkd.training.rollouts import DecodeCopy, needs_copy

GEMMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
         "max_position_embeddings": 64, "vocab_size": 96, "sliding_window": 8,
         "query_pre_attn_scalar": 16, "initializer_range": 0.3}


def student() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma3_text", **GEMMA))


def test_the_copy_follows_the_student_and_keeps_its_buffers() -> None:
    s = student()
    dc = DecodeCopy(s, torch.bfloat16, torch.device("cpu"))
    assert all(p.dtype == torch.bfloat16 for p in dc.copy.parameters())
    assert not any(p.requires_grad for p in dc.copy.parameters())
    buffers = dict(s.named_buffers())
    for name, b in dc.copy.named_buffers():   # rotary frequencies stay fp32, as under autocast
        assert b.dtype == buffers[name].dtype
    with torch.no_grad():
        s.model.layers[0].mlp.down_proj.weight.mul_(-3.0)   # a training step changes weights
    storage = [p.data_ptr() for p in dc.copy.parameters()]
    got = dc.refreshed()
    assert [p.data_ptr() for p in got.parameters()] == storage   # captured graphs stay valid
    for (name, p), q in zip(s.named_parameters(), got.parameters(), strict=True):
        assert torch.equal(q, p.detach().to(torch.bfloat16)), name


def test_rollouts_from_the_copy_equal_the_student_in_that_dtype() -> None:
    s = student()
    dc = DecodeCopy(s, torch.bfloat16, torch.device("cpu"))
    with torch.no_grad():
        s.lm_head.weight.add_(0.01)   # tied to the embedding: both change
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    ref = generate(s.to(torch.bfloat16), ids, None, params, engine="eager").sequences
    got = generate(dc.refreshed(), ids, None, params, engine="eager").sequences
    assert torch.equal(got, ref)


def test_a_lora_student_is_copied_with_its_adapters() -> None:
    s = get_peft_model(student(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    dc = DecodeCopy(s, torch.bfloat16, torch.device("cpu"))
    for name, p in s.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_()
    got = dict(dc.refreshed().named_parameters())
    for name, p in s.named_parameters():
        assert torch.equal(got[name], p.detach().to(torch.bfloat16)), name


def test_no_copy_off_cuda_or_when_the_dtype_already_matches() -> None:
    s = student()
    assert not needs_copy(s, torch.bfloat16, torch.device("cpu"))
    assert not needs_copy(s, None, torch.device("cuda"))
    assert not needs_copy(s.to(torch.bfloat16), torch.bfloat16, torch.device("cuda"))
    assert DecodeCopy.maybe(s, torch.bfloat16, torch.device("cpu")) is None


def test_an_fp32_student_on_cuda_gets_a_copy() -> None:
    assert needs_copy(student(), torch.bfloat16, torch.device("cuda"))


def test_the_copy_is_made_on_the_rollout_device_for_a_student_still_on_the_cpu() -> None:
    """The loop builds the student on the CPU and accelerate moves it later: the copy must sit
    where rollouts run from the start ('meta' stands in for the GPU here)."""
    s = student()
    dc = DecodeCopy(s, torch.bfloat16, torch.device("meta"))
    assert {t.device.type for t in [*dc.copy.parameters(), *dc.copy.buffers()]} == {"meta"}
    assert all(p.dtype == torch.bfloat16 for p in dc.copy.parameters())
    assert {p.device.type for p in s.parameters()} == {"cpu"}
