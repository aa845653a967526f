"""Models: build from config, init from teacher layers, LoRA, vocabulary checks."""

from __future__ import annotations

import pytest
import torch

from wattkd.config import LoraConfig, StudentConfig, TeacherConfig
from wattkd.models import (
    ModelError,
    build_from_config,
    build_student,
    check_vocab,
    init_from_teacher_layers,
    load_pretrained,
    load_teacher,
    num_layers,
    student_frozen_dtype,
)

LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 64}
GEMMA = {"model_type": "gemma3_text", "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 1,
         "head_dim": 8, "max_position_embeddings": 64, "sliding_window": 16}


def test_build_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_from_config(LLAMA, 100, seed=1)
    b = build_from_config(LLAMA, 100, seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert a.config.vocab_size == 100


def test_build_needs_model_type() -> None:
    with pytest.raises(ModelError, match="model_type"):
        build_from_config({"hidden_size": 8}, 10, seed=0)


@pytest.mark.parametrize("arch", [LLAMA, GEMMA], ids=["llama", "gemma3"])
def test_init_from_teacher_layers_copies_chosen_layers(arch: dict) -> None:
    teacher = build_from_config(arch, 128, seed=0).eval()
    picks = [0, 2, arch["num_hidden_layers"] - 1]
    student = init_from_teacher_layers(teacher, picks).eval()
    assert num_layers(student) == 3
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for new, old in enumerate(picks):
        for key, value in s_sd.items():
            if f"layers.{new}." in key:
                assert torch.equal(value, t_sd[key.replace(f"layers.{new}.", f"layers.{old}.")])
    assert torch.equal(s_sd["model.embed_tokens.weight"], t_sd["model.embed_tokens.weight"])
    if "layer_types" in teacher.config.to_dict():
        assert student.config.layer_types == [teacher.config.layer_types[i] for i in picks]
    ids = torch.randint(0, 128, (2, 10))
    assert student(ids).logits.shape == (2, 10, 128)


def test_init_from_all_layers_reproduces_teacher() -> None:
    teacher = build_from_config(LLAMA, 64, seed=0).eval()
    student = init_from_teacher_layers(teacher, [0, 1, 2, 3]).eval()
    ids = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(student(ids).logits, teacher(ids).logits)


def test_missing_layer_index_refused() -> None:
    teacher = build_from_config(LLAMA, 64, seed=0)
    with pytest.raises(ModelError, match=r"\[7\] out of range: the teacher has 4 layers"):
        init_from_teacher_layers(teacher, [0, 7])
    with pytest.raises(ModelError, match="increasing"):
        init_from_teacher_layers(teacher, [2, 1])


def test_vocab_mismatch_refused_with_both_sizes() -> None:
    teacher = build_from_config(LLAMA, 100, seed=0)
    student = build_from_config(LLAMA, 80, seed=0)
    with pytest.raises(ModelError, match="student head has 80 outputs but the tokenizer has 90"):
        check_vocab(teacher, student, 90)
    with pytest.raises(ModelError, match="teacher head has 80"):
        check_vocab(student, teacher, 90)


def test_padded_vocab_compares_tokenizer_range() -> None:
    teacher = build_from_config(LLAMA, 128, seed=0)  # padded past the tokenizer
    student = build_from_config(LLAMA, 96, seed=0)
    assert check_vocab(teacher, student, 90) == 90


def test_lora_trains_only_adapters_and_saves(tmp_path) -> None:
    teacher = load_teacher(TeacherConfig(build=LLAMA), device=torch.device("cpu"),
                           vocab_size=64, seed=0)
    assert not any(p.requires_grad for p in teacher.parameters())
    cfg = StudentConfig(from_teacher_layers=[0, 3], lora=LoraConfig(r=4, alpha=8))
    student = build_student(cfg, teacher=teacher, vocab_size=64, seed=0,
                            frozen_dtype=torch.float32)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    student.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    # Merging folds the adapters into plain weights of the same architecture.
    merged = student.merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert num_layers(merged) == 2


def test_load_pretrained_refuses_non_model_folder(tmp_path) -> None:
    with pytest.raises(ModelError, match="no config.json"):
        load_pretrained(str(tmp_path), dtype=torch.float32)


def test_bf16_lora_base_stores_only_frozen_decoder_linears_in_bf16() -> None:
    teacher = load_teacher(TeacherConfig(build=LLAMA), device=torch.device("cpu"),
                           vocab_size=64, seed=0)
    cfg = StudentConfig(from_teacher_layers=[0, 3], lora=LoraConfig(r=4, alpha=8),
                        dtype="bfloat16")
    student = build_student(cfg, teacher=teacher, vocab_size=64, seed=0,
                            frozen_dtype=student_frozen_dtype(cfg, bf16=True))
    dtypes = {n: p.dtype for n, p in student.named_parameters()}
    frozen = [n for n, p in student.named_parameters()
              if not p.requires_grad and "layers." in n and n.endswith("proj.base_layer.weight")]
    assert frozen and all(dtypes[n] == torch.bfloat16 for n in frozen)
    others = [n for n in dtypes if n not in frozen]
    assert any("embed_tokens" in n for n in others) and any("lora_A" in n for n in others)
    assert all(dtypes[n] == torch.float32 for n in others)
    # auto follows the training precision; bf16 storage without autocast is refused.
    auto = StudentConfig(from_teacher_layers=[0], lora=LoraConfig())
    assert student_frozen_dtype(auto, bf16=True) == torch.bfloat16
    assert student_frozen_dtype(auto, bf16=False) == torch.float32
    with pytest.raises(ModelError, match="needs bf16 training"):
        student_frozen_dtype(cfg, bf16=False)
    with pytest.raises(ValueError, match="frozen base of a LoRA student"):
        StudentConfig(from_teacher_layers=[0], dtype="bfloat16")
