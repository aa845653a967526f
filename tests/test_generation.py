"""The generation engines (wattkd.generation): the eager reference against HF's own greedy
`generate`, the graph engine's static-cache step against the eager reference token for token
(uncaptured on CPU, captured on CUDA when present), and sampling against its distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from wattkd.generation import SamplingParams, generate, sample_next
from wattkd.generation.graph_engine import (
    BUCKETS,
    EngineUnavailable,
    GraphDecoder,
    bucket_for,
    check_servable,
)
from wattkd.generation.sampling import blocked_argmax

ARCHS = ("llama", "qwen2", "gemma3_text")


def _model(arch: str, window: int = 16) -> torch.nn.Module:
    kw = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
          "max_position_embeddings": 256}
    if arch == "gemma3_text":
        kw.update(sliding_window=window, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **kw)).eval()


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0          # left padding
    mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_eager_engine_matches_hf_greedy_generate(arch):
    m = _model(arch)
    ids, mask = _prompts()
    got = generate(m, ids, mask, SamplingParams(max_new_tokens=9, ignore_eos=True),
                   engine="eager")
    ref = m.generate(ids, attention_mask=mask, generation_config=GenerationConfig(
        do_sample=False, max_new_tokens=9, min_new_tokens=9, pad_token_id=0))
    assert torch.equal(got.sequences, ref)
    assert got.new_tokens == 27 and got.prompt_len == 7
    assert torch.equal(got.attention_mask[:, :7], mask)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("eos", [None, 5])
def test_graph_step_matches_eager_token_for_token(arch, eos):
    """The static-cache decode step (what the CUDA graph holds), run uncaptured: same tokens
    and the same stop positions as the eager loop, across replay-chunk boundaries and past
    Gemma's sliding window (16 < 7 + 21)."""
    m = _model(arch)
    ids, mask = _prompts()
    params = SamplingParams(max_new_tokens=21, eos_token_id=eos, ignore_eos=eos is None)
    ref = generate(m, ids, mask, params, engine="eager")
    dec = GraphDecoder(m, batch=4, max_len=64, params=params, steps=8, capture=False,
                       compile=False)
    for _ in range(2):   # a decoder is reused: the second request starts clean
        new, live = dec.decode(ids, mask)
        assert torch.equal(new, ref.sequences[:, 7:])
        assert torch.equal(live, ref.generated_mask[:, 7:].bool())


def test_graph_step_serves_an_unmerged_lora_student():
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(_model("qwen2"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False)).eval()
    ids, mask = _prompts()
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    ref = generate(m, ids, mask, params, engine="eager")
    dec = GraphDecoder(m, batch=4, max_len=32, params=params, steps=4, capture=False,
                       compile=False)
    assert torch.equal(dec.decode(ids, mask)[0], ref.sequences[:, 7:])
    merged = m.merge_and_unload()
    assert torch.equal(generate(merged, ids, mask, params, engine="eager").sequences,
                       ref.sequences)


def test_eos_stops_rows_and_pads_the_rest():
    m = _model("llama")
    ids, mask = _prompts()
    greedy = generate(m, ids, mask, SamplingParams(max_new_tokens=12, ignore_eos=True),
                      engine="eager")
    eos = int(greedy.sequences[0, 7 + 3])      # row 0's 4th token becomes the stop token
    out = generate(m, ids, mask, SamplingParams(max_new_tokens=12, eos_token_id=eos,
                                                pad_token_id=0), engine="eager")
    row = out.sequences[0, 7:]
    first = int((row == eos).nonzero()[0])
    assert first <= 3
    assert out.generated_mask[0, 7:first + 8].all() and not out.generated_mask[0, first + 8:].any()
    assert (row[first + 1:] == 0).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_seeded_sampling_is_reproducible(arch):
    m = _model(arch)
    ids, mask = _prompts()
    sp = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9)
    dec = GraphDecoder(m, batch=4, max_len=32, params=sp, steps=4, capture=False,
                       compile=False)
    a, _ = dec.decode(ids, mask, generator=torch.Generator().manual_seed(3))
    b, _ = dec.decode(ids, mask, generator=torch.Generator().manual_seed(3))
    c, _ = dec.decode(ids, mask, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    e1 = generate(m, ids, mask, sp, generator=torch.Generator().manual_seed(3), engine="eager")
    e2 = generate(m, ids, mask, sp, generator=torch.Generator().manual_seed(3), engine="eager")
    assert torch.equal(e1.sequences, e2.sequences)


def test_sampling_follows_the_tempered_nucleus_distribution():
    """Frequencies of 40,000 draws against the hand-computed tempered, top-p cut softmax."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).expand(40_000, -1)
    params = SamplingParams(max_new_tokens=1, temperature=0.7, top_p=0.8)
    draws = sample_next(logits, params, torch.Generator().manual_seed(0))
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0], dtype=torch.float64) / 0.7, 0)
    keep = (p.cumsum(0) - p) < 0.8            # p is already sorted descending
    want = p * keep / (p * keep).sum()
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    assert torch.allclose(freq, want, atol=0.01)
    assert freq[~keep].sum() == 0
    greedy_like = sample_next(logits[:8], SamplingParams(max_new_tokens=1, temperature=1.0,
                                                         top_p=1e-6))
    assert (greedy_like == 0).all()


def test_buckets_and_refusals():
    assert [bucket_for(b) for b in (1, 3, 8, 200, 256)] == [1, 4, 8, 256, 256]
    with pytest.raises(EngineUnavailable, match="largest graph bucket"):
        bucket_for(BUCKETS[-1] + 1)
    check_servable(_model("gemma3_text"))
    m = _model("llama")
    ids, mask = _prompts()
    with pytest.raises(EngineUnavailable, match="needs CUDA"):
        generate(m, ids, mask, SamplingParams(max_new_tokens=2), engine="graph")
    with pytest.raises(ValueError, match="unknown generation engine"):
        generate(m, ids, mask, SamplingParams(max_new_tokens=2), engine="vllm")
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(max_new_tokens=2, top_p=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("arch", ARCHS)
def test_captured_graph_matches_eager_on_cuda(arch):
    m = _model(arch).cuda()
    ids, mask = (t.cuda() for t in _prompts())
    params = SamplingParams(max_new_tokens=21, eos_token_id=5)
    ref = generate(m, ids, mask, params, engine="eager")
    got = generate(m, ids, mask, params, engine="graph")
    assert torch.equal(got.sequences, ref.sequences)
    assert torch.equal(got.generated_mask, ref.generated_mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_captured_sampling_at_gemmas_vocabulary_on_cuda():
    """Sampling (temperature, top-p) compiled and captured at a 262,144-entry vocabulary: the
    inductor scans that failed there on an H100 are out of the compiled parts; same tokens as
    the uncompiled, uncaptured step for the same seed."""
    kw = {"vocab_size": 262_144, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 8, "max_position_embeddings": 256}
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **kw)).eval().cuda()
    ids, mask = (t.cuda() for t in _prompts())
    for sp in (SamplingParams(max_new_tokens=9, temperature=1.0),
               SamplingParams(max_new_tokens=9, temperature=0.8, top_p=0.9)):
        outs = []
        for capture in (True, False):
            dec = GraphDecoder(m, batch=4, max_len=32, params=sp, steps=4, capture=capture,
                               compile=capture)
            g = torch.Generator(device="cuda").manual_seed(3)
            outs.append(dec.decode(ids, mask, generator=g)[0])
        assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("n", [100, 2048, 2049, 262_144, 262_144 + 7])
def test_blocked_argmax_is_argmax_with_ties(n: int) -> None:
    """The two-level argmax the greedy step uses against torch.argmax (the first maximum),
    with ties inside a block, across blocks, at the padded tail, and in bf16."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(6, n, generator=g)
    x[1, [3, n - 1]] = 50.0                      # tie across blocks: first wins
    x[2, [n - 1, n - 2]] = 50.0                  # tie at the tail
    x[3] = 1.0                                   # all equal: index 0
    x[4, n // 2] = float("inf")
    for t in (x, x.bfloat16()):
        assert torch.equal(blocked_argmax(t), t.argmax(dim=-1))


def test_sampling_inverts_the_full_cdf_at_the_vocabulary_size_of_gemma() -> None:
    """The token drawn for a given uniform is the one the full-vocabulary inverse CDF gives
    (independent: numpy's cumsum + searchsorted in fp64), with and without a top-p cut."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 262_144, generator=g) * 3
    u = torch.tensor([[0.001], [0.25], [0.5], [0.999]])
    for top_p in (1.0, 0.9):
        got = sample_next(logits, SamplingParams(max_new_tokens=1, temperature=0.7,
                                                 top_p=top_p), uniform=u)
        p = torch.softmax(logits.double() / 0.7, -1).numpy()
        for row in range(4):
            q = p[row].copy()
            if top_p < 1:
                order = np.argsort(-q, kind="stable")
                sp = q[order]
                keep = (np.cumsum(sp) - sp) < top_p
                q = np.zeros_like(q)
                q[order[keep]] = sp[keep]
            cdf = np.cumsum(q)
            want = int(np.searchsorted(cdf, u[row, 0].item() * cdf[-1]))
            assert int(got[row]) == want, (top_p, row)
