"""Held-out perplexity on real shards built by wattkd's shard builder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from test_eval_common import build_model, build_tokenizer, one_thread
from wattkd.config import DataConfig, EvalConfig, SourceConfig
from wattkd.eval.perplexity import PerplexityError, in_loop_record, perplexity, run_perplexity
from wattkd.eval.protocol import ProtocolMismatch, compare_protocols

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)
SEQ = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_dir):
    from wattkd.data.shards import build_shards

    root = tmp_path_factory.mktemp("ppl")
    tok = build_tokenizer()
    tok_dir = root / "model"
    tok.save_pretrained(tok_dir)
    model = build_model(tok, seed=1)
    model.save_pretrained(tok_dir)
    verses = (shared_dir / "data/corpus/kjv.txt").read_text().splitlines()[:120]
    text = root / "kjv.txt"
    text.write_text("\n".join(verses) + "\n")
    cfg = DataConfig(sources=[SourceConfig(path=str(text), kind="text")], tokenizer=str(tok_dir),
                     seq_len=SEQ, heldout_fraction=0.0, rows_per_part=4)
    build_shards(cfg, root / "shards", progress=False)
    return model, tok_dir, root / "shards" / "train"


def _stored_rows(shards: Path, n: int) -> torch.Tensor:
    """The first n rows in stored order, read with pyarrow (not through ShardDataset)."""
    import pyarrow.parquet as pq

    manifest = json.loads((shards / "manifest.json").read_text())
    rows = []
    for part in manifest["parts"]:
        rows += pq.read_table(shards / part["file"])["input_ids"].to_pylist()
        if len(rows) >= n:
            break
    return torch.tensor(rows[:n], dtype=torch.long)


def test_uniform_model_has_perplexity_equal_to_vocab_and_exact_token_budget(setup):
    _, _, shards = setup
    uniform = build_model(build_tokenizer(), seed=2)
    with torch.no_grad():
        uniform.lm_head.weight.zero_()  # every logit 0: p = 1/V for every token
    res = perplexity(uniform, shards, max_tokens=50, batch_size=3, device="cpu")
    v = uniform.config.vocab_size
    assert res["tokens"] == 50 and res["sequences"] == 2  # 31 + 19 predicted tokens
    assert res["nll"] == pytest.approx(math.log(v), rel=1e-6)
    assert res["perplexity"] == pytest.approx(v, rel=1e-5)
    assert res["vocab"] == v      # the uniform guess the report's collapse check compares with


def test_matches_a_direct_computation_and_restores_train_mode(setup):
    model, _, shards = setup
    ids = _stored_rows(shards, 3)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                          reduction="none").view(3, SEQ - 1)
    budget = 2 * (SEQ - 1) + 7
    expect = (nll[:2].sum() + nll[2, :7].sum()).item() / budget
    model.train()
    res = perplexity(model, shards, max_tokens=budget, batch_size=2, device="auto")
    assert model.training  # left as it came (the training loop calls this in-loop)
    model.eval()
    assert res["tokens"] == budget and res["sequences"] == 3
    assert res["nll"] == pytest.approx(expect, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(expect), rel=1e-5)


def test_vocabulary_mismatch_and_bad_arguments_are_refused(setup):
    _, _, shards = setup
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(PerplexityError, match="vocabulary has 16 entries: shards and model use "
                                              "different tokenizers"):
        perplexity(small, shards, max_tokens=10, batch_size=1)
    with pytest.raises(PerplexityError, match="must be > 0"):
        perplexity(small, shards, max_tokens=0, batch_size=1)


def test_run_perplexity_writes_result_with_protocol(setup, tmp_path):
    _, model_dir, shards = setup
    cfg = EvalConfig(perplexity_tokens=40, batch_size=2)
    a = run_perplexity(str(model_dir), shards, cfg, tmp_path / "run", device="cpu")
    on_disk = json.loads((tmp_path / "run" / "eval" / "perplexity.json").read_text())
    assert on_disk["schema"] == "wattkd.perplexity/1"
    assert on_disk["tokens"] == 40 and on_disk["perplexity"] == pytest.approx(a["perplexity"])
    assert on_disk["protocol"]["max_tokens"] == 40 and on_disk["protocol"]["seq_len"] == SEQ
    b = run_perplexity(str(model_dir), shards, cfg.model_copy(update={"perplexity_tokens": 31}),
                       tmp_path / "b.json", device="cpu")
    with pytest.raises(ProtocolMismatch, match="max_tokens: 40"):
        compare_protocols(a, b)


def test_in_loop_record_carries_metered_energy(setup):
    from wattkd.config import TelemetryConfig
    from wattkd.energy.ledger import EnergyMeter

    model, _, shards = setup
    with EnergyMeter(TelemetryConfig(cpu_watts_per_core=10.0, idle_seconds=0,
                                     interval_s=0.05), None) as meter:
        rec = in_loop_record(model, shards, step=100, max_tokens=31, batch_size=1, meter=meter)
        after = meter.energy_j()
    assert rec["step"] == 100 and rec["heldout_tokens"] == 31
    assert rec["energy_j"] is not None and 0 <= rec["energy_j"] <= after  # estimated CPU J
    assert rec["heldout_perplexity"] == pytest.approx(math.exp(rec["heldout_nll"]))
    assert in_loop_record(model, shards, step=1, max_tokens=31, batch_size=1)["energy_j"] is None
