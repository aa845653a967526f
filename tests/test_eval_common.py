"""Shared helpers for the eval tests: a tiny real HF model + tokenizer built locally.

No tests here; the test_eval_* modules import these builders.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import require_shared

SHARED_EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"


def training_text(limit: int = 400) -> list[str]:
    """A few hundred lines of the eval data: enough for a 512-token BPE to cover it."""
    require_shared(SHARED_EVAL)
    lines = []
    with open(SHARED_EVAL / "mmlu_test.jsonl", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i >= limit:
                break
            row = json.loads(line)
            lines.append(row["question"] + " " + " ".join(row["choices"]))
    for task in ("sports_understanding", "date_understanding", "object_counting"):
        spec = json.loads((SHARED_EVAL / "bigbench" / task / "task.json").read_text())
        lines += [ex["input"] for ex in spec["examples"][:100]]
    return lines


def build_tokenizer(vocab_size: int = 512):
    """Byte-level BPE trained on eval text, wrapped as an HF fast tokenizer (bos/eos/pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(training_text(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=2048)


def build_model(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                      intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


def save_model_dir(path: Path, seed: int = 0) -> Path:
    tok = build_tokenizer()
    model = build_model(tok, seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def one_thread():
    """Generator for a module fixture: tiny models run faster on one thread, and a 2-core
    machine shared with other test processes makes multi-threaded torch spin (30x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
