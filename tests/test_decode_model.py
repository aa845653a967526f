"""wattkd's own decode forward (generation/decode_model.py) against HF itself: the logits of the
prefill and of 20+ one-token steps against HF's full-sequence forward (fp32, 1e-4), greedy
tokens against HF `generate`, left padding, Gemma's sliding window narrower than the sequence,
Llama's llama3 rope scaling, Qwen2's biases and sliding layers, in-place refresh after a weight
change, an unmerged peft LoRA student against the merged model, refusals with a reason, and
the step compiled with fullgraph=True (inductor, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from wattkd.generation import SamplingParams, generate
from wattkd.generation.decode_model import DecodeModel, EngineUnavailable, inspect_arch
from wattkd.generation.graph_engine import GraphDecoder, forward_for

BASE = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "max_position_embeddings": 256}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CONFIGS = {
    # window 4 < 7 prompt + 21 new tokens; local and global rope bases differ; query scale
    # 1/sqrt(16) != 1/sqrt(head_dim); the final softcap bites on logits of this size
    "gemma3_text": {"sliding_window": 4, "query_pre_attn_scalar": 16,
                    "final_logit_softcapping": 1.0, "rope_local_base_freq": 100.0,
                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "llama": {"rope_scaling": LLAMA3},
    "llama-bias": {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
    "qwen2": {},
    "qwen2-sliding": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
}
NEW = 21
PROMPT = 7


def _model(name: str, **extra: object) -> torch.nn.Module:
    """A tiny random model whose norms and biases are not at their init values (so Gemma's
    1 + w, the q/k norms and Qwen2's biases all change the logits)."""
    kw = {**BASE, **CONFIGS.get(name, {}), **extra}
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(AutoConfig.for_model(name.split("-")[0], **kw)).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m


def _prompts(rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (rows, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0          # left padding
    mask[2, :1] = 0
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def _decode_logits(dm: DecodeModel, ids: torch.Tensor, mask: torch.Tensor, new: int,
                   step=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prefill logits [B, P, V], step logits [B, new, V], the greedy tokens fed [B, new])."""
    step = step or dm.step
    b, p = ids.shape
    pad = torch.ones(b, dm.max_len, dtype=torch.long)
    pad[:, :p] = mask
    pos = _positions(mask)
    first = dm.prefill(ids, pos, pad, all_logits=True)
    tok, slot, here = first[:, -1].argmax(-1), torch.tensor([p]), pos[:, -1:] + 1
    fed, logits = [], []
    for _ in range(new):
        fed.append(tok)
        out = step(tok[:, None], here, slot, pad)
        logits.append(out)
        tok, slot, here = out.argmax(-1), slot + 1, here + 1
    return first, torch.stack(logits, 1), torch.stack(fed, 1)


@torch.no_grad()
def _hf_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
               fed: torch.Tensor) -> torch.Tensor:
    """HF's forward over the whole sequence (prompt + fed tokens): the independent reference."""
    seq = torch.cat([ids, fed], dim=1)
    full = torch.cat([mask, torch.ones_like(fed)], dim=1)
    return model(input_ids=seq, attention_mask=full, position_ids=_positions(full)).logits


def _assert_matches_hf(dm: DecodeModel, model: torch.nn.Module, new: int = NEW) -> None:
    ids, mask = _prompts()
    first, steps, fed = _decode_logits(dm, ids, mask, new)
    ref = _hf_logits(model, ids, mask, fed)
    real = mask.bool()
    torch.testing.assert_close(first[real], ref[:, :PROMPT][real], atol=1e-4, rtol=0)
    torch.testing.assert_close(steps, ref[:, PROMPT:PROMPT + new], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_steps_match_hf_full_forward(name):
    m = _model(name)
    dm = DecodeModel(m, batch=3, max_len=PROMPT + NEW + 4)
    if name in ("gemma3_text", "qwen2-sliding"):
        assert dm.arch.window == 4 and any(dm.arch.sliding) and not all(dm.arch.sliding)
    if name == "llama":
        assert m.model.rotary_emb.rope_type == "llama3"
    _assert_matches_hf(dm, m)


@torch.no_grad()
def _hf_greedy_without_cache(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                             new: int) -> torch.Tensor:
    """Greedy tokens from HF's full forward re-run over the whole sequence at every step."""
    for _ in range(new):
        nxt = model(input_ids=ids, attention_mask=mask,
                    position_ids=_positions(mask)).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids[:, -new:]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_graph_decoder_greedy_tokens_equal_hf(name):
    """The step the CUDA graph holds, run uncaptured on the wattkd forward, on left-padded
    rows (bucket 4 > 3 rows): the greedy tokens of HF's cache-free forward and of wattkd's
    eager engine; and of HF `generate` where it agrees with its own forward (transformers
    5.25's Gemma 3 `generate` departs from its forward on left-padded rows: a row here picks
    another token at a margin of 6e-3, far above fp32 noise)."""
    m = _model(name)
    ids, mask = _prompts()
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    dec = GraphDecoder(m, batch=4, max_len=32, params=params, steps=8, capture=False,
                       compile=False, forward="wattkd")
    assert dec.forward == "wattkd"
    new, live = dec.decode(ids, mask)
    assert torch.equal(new, _hf_greedy_without_cache(m, ids, mask, NEW)) and live.all()
    eager = generate(m, ids, mask, params, engine="eager")
    assert torch.equal(new, eager.sequences[:, PROMPT:])
    if name != "gemma3_text":
        ref = m.generate(ids, attention_mask=mask, generation_config=GenerationConfig(
            do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0))
        assert torch.equal(new, ref[:, PROMPT:])


def test_refresh_follows_a_changed_weight():
    m = _model("gemma3_text")
    dm = DecodeModel(m, batch=3, max_len=PROMPT + NEW + 4)
    with torch.no_grad():       # what an optimizer step does: in place, between rollouts
        m.model.layers[1].mlp.up_proj.weight.add_(0.5)
        m.model.layers[0].self_attn.k_norm.weight.mul_(-1.0)
    ids, mask = _prompts()
    pad = torch.ones(3, dm.max_len, dtype=torch.long)
    pad[:, :PROMPT] = mask
    with torch.no_grad():
        first = dm.prefill(ids, _positions(mask), pad, all_logits=True)
    stale = (first - _hf_logits(m, ids, mask, ids[:, :0])).abs().max()
    assert stale > 1e-2                                      # the buffers are a copy
    address = dm.w.qkv.data_ptr(), dm.w.gate_up.data_ptr()
    dm.refresh()
    assert (dm.w.qkv.data_ptr(), dm.w.gate_up.data_ptr()) == address  # in place: graphs stay valid
    _assert_matches_hf(dm, m)
    other = DecodeModel(m, batch=1, max_len=16)      # another bucket: the same weight copy
    assert other.w is dm.w


def test_graph_decoder_refreshes_before_each_decode():
    m = _model("llama")
    ids, mask = _prompts()
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    dec = GraphDecoder(m, batch=3, max_len=32, params=params, steps=4, capture=False,
                       compile=False)
    before, _ = dec.decode(ids, mask)
    with torch.no_grad():
        m.lm_head.weight.mul_(-1.0)          # untied head: flips every argmax
    after, _ = dec.decode(ids, mask)
    assert not torch.equal(before, after)
    assert torch.equal(after, generate(m, ids, mask, params, engine="eager").sequences[:, 7:])


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_unmerged_lora_student_equals_the_merged_model(name):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    student = get_peft_model(_model(name), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      init_lora_weights=False)).eval()
    dm = DecodeModel(student, batch=3, max_len=PROMPT + NEW + 4)
    _assert_matches_hf(dm, copy.deepcopy(student).merge_and_unload())
    with torch.no_grad():       # training moves the adapter: refresh merges the new one
        for mod in student.modules():
            if hasattr(mod, "lora_B") and "default" in mod.lora_B:
                mod.lora_B["default"].weight.add_(0.2)
    dm.refresh()
    _assert_matches_hf(dm, copy.deepcopy(student).merge_and_unload())
    assert any(hasattr(mod, "lora_A") for mod in student.modules())   # model untouched


def test_under_autocast_weights_and_cache_are_held_in_the_autocast_dtype():
    """A fp32 student rolling out under bf16 autocast (training's mixed precision): the GEMM
    weights and the KV cache are bf16 copies (no cast of every weight at every step), the
    norms and embedding stay fp32, and the logits are HF's under the same autocast (prefill
    exactly, steps within one bf16 ulp of their size)."""
    m = _model("llama")
    ids, mask = _prompts()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dm = DecodeModel(m, batch=3, max_len=PROMPT + 12)
        first, steps, fed = _decode_logits(dm, ids, mask, 8)
        ref = _hf_logits(m, ids, mask, fed)
    assert dm.w.qkv.dtype == dm.w.lm_head.dtype == dm.cache(0)[0].dtype == torch.bfloat16
    assert dm.w.embed.dtype == dm.w.ln_input.dtype == torch.float32
    assert torch.equal(first[mask.bool()], ref[:, :PROMPT][mask.bool()])
    torch.testing.assert_close(steps, ref[:, PROMPT:PROMPT + 8], atol=4e-3, rtol=0)
    assert DecodeModel(m, batch=3, max_len=16).w.qkv.dtype == torch.float32   # no autocast


@pytest.mark.parametrize(("name", "extra", "reason"), [
    ("gemma3_text", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
    ("llama", {"hidden_act": "relu"}, "activation 'relu'"),
    ("gpt2", {}, "model_type 'gpt2'"),
])
def test_unsupported_configs_are_refused_with_the_reason(name, extra, reason):
    if name == "gpt2":
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(AutoConfig.for_model(
            "gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=97)).eval()
    else:
        m = _model(name, **extra)
    with pytest.raises(EngineUnavailable, match=reason):
        inspect_arch(m)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    with pytest.raises(EngineUnavailable, match=reason):
        GraphDecoder(m, batch=1, max_len=16, params=params, capture=False, compile=False,
                     forward="wattkd")
    if name != "gpt2":       # auto: HF's own forward serves it, same tokens as the eager loop
        dec = GraphDecoder(m, batch=3, max_len=16, params=params, steps=4, capture=False,
                           compile=False)
        assert dec.forward == "hf"
        ids, mask = _prompts()
        assert torch.equal(dec.decode(ids, mask)[0],
                           generate(m, ids, mask, params, engine="eager").sequences[:, 7:])


def test_dora_adapter_is_refused():
    from peft import LoraConfig, get_peft_model

    student = get_peft_model(_model("llama"), LoraConfig(r=4, target_modules=["q_proj"],
                                                         use_dora=True))
    with pytest.raises(EngineUnavailable, match="DoRA"):
        DecodeModel(student, batch=1, max_len=16)


def test_whole_step_compiles_with_fullgraph_on_cpu_inductor():
    """What the graph engine compiles before capture (greedy: forward, argmax, stop flags and
    advance as one graph; sampling: the forward and the bookkeeping, each one graph) with no
    breaks: the same tokens and stop positions as uncompiled, greedy with EOS and seeded top-p
    sampling."""
    m = _model("llama")
    ids, mask = _prompts()
    for params in (SamplingParams(max_new_tokens=12, eos_token_id=37),   # row 0 stops at 4
                   SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9)):
        decoders = [GraphDecoder(m, batch=4, max_len=32, params=params, steps=4, capture=False,
                                 compile=c, forward="wattkd") for c in (True, False)]
        got, ref = (d.decode(ids, mask, generator=torch.Generator().manual_seed(3))
                    for d in decoders)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        if params.greedy:
            eager = generate(m, ids, mask, params, engine="eager")
            assert torch.equal(got[0], eager.sequences[:, PROMPT:])
            assert torch.equal(got[1], eager.generated_mask[:, PROMPT:].bool())
            assert not got[1].all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize(("name", "forward"), [("gemma3_text", "wattkd"), ("gemma3_text", "hf"),
                                             ("qwen2-sliding", "wattkd"), ("llama", "hf")])
def test_captured_graph_on_each_forward_matches_eager_on_cuda(name, forward):
    """Compiled by inductor and captured: the tokens of wattkd's eager loop, also after a
    weight change (the refresh before each decode keeps the captured addresses). The default
    forward on the three architectures: tests/test_generation.py."""
    m = _model(name).cuda()
    ids, mask = (t.cuda() for t in _prompts())
    params = SamplingParams(max_new_tokens=NEW, eos_token_id=5)
    for _ in range(2):
        ref = generate(m, ids, mask, params, engine="eager")
        got = generate(m, ids, mask, params, engine="graph", forward=forward)
        assert torch.equal(got.sequences, ref.sequences)
        assert torch.equal(got.generated_mask, ref.generated_mask)
        with torch.no_grad():
            m.lm_head.weight.mul_(-1.0)


def test_forward_for_names_the_forward_auto_gives() -> None:
    """What the EPT protocol records for the graph engine: wattkd's forward where it serves
    the model, else HF's with the reason."""
    assert forward_for(_model("llama")) == "wattkd"
    m = _model("llama")
    m.config.model_type = "mistral"
    assert forward_for(m).startswith("hf (model_type 'mistral'")
