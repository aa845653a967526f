"""The decode step's Triton kernels (generation/kernels.py) against fp64 references: the GEMV
with each norm prologue (none, Gemma, Llama), gated activation (GeGLU, SwiGLU) and bias, at
row counts and sizes that leave partial tiles; attention over a cache with left padding, a
sliding window, grouped query heads and sequences split over several programs (the merge by
the last program, counter left at zero); then DecodeModel's step with the kernels against its
own torch ops on tiny Gemma 3 / Llama / Qwen2 models. On CUDA when present, else Triton's
interpreter on CPU (tiny tiles, so the split and tail paths run)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

ON_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before the kernels are decorated
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")

pytest.importorskip("triton", reason="triton not installed (pip install -e '.[dev]')")

from wattkd.generation import kernels
from wattkd.generation.decode_model import DecodeModel, EngineUnavailable

BF16 = torch.bfloat16
# Triton's interpreter (triton 3.9) converts fp32 -> bf16 by truncation, the GPU to nearest:
# the references round the same way as the kernels do where they run
ROUND = 2e-3


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _bf(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bf16 as the kernel's conversion does here (to nearest on the GPU, toward
    zero in the interpreter), back in fp64."""
    if ON_CUDA:
        return t.to(BF16).double()
    bits = t.float().contiguous().view(torch.int32) & -65536    # keep the top 16 bits
    return bits.view(torch.float32).double()


def _norm64(x: torch.Tensor, w: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """RMSNorm in fp64, bf16 output: Gemma (y * w).to(x), Llama w * y.to(x)."""
    x = x.double()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return _bf(y * w.double()) if kind == "gemma" else _bf(w.double() * _bf(y))


@pytest.mark.parametrize("rows,n,k", [(1, 40, 72), (3, 16, 32), (16, 33, 100)])
@pytest.mark.parametrize("norm", ["none", "gemma", "llama"])
@pytest.mark.parametrize("act", ["none", "gelu_pytorch_tanh", "silu"])
def test_gemv_matches_fp64(rows: int, n: int, k: int, norm: str, act: str) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, generator=g).to(BF16)
    w = (torch.randn(n * (2 if act != "none" else 1), k, generator=g) / math.sqrt(k)).to(BF16)
    bias = (0.1 * torch.randn(w.shape[0], generator=g)).to(BF16)
    nw = 1.0 + 0.3 * torch.randn(k, generator=g)           # Gemma's buffer: 1 + w, fp32
    nw = nw if norm == "gemma" else nw.to(BF16)
    got = kernels.decode_gemv(x.to(DEVICE), w.to(DEVICE), bias.to(DEVICE),
                              None if norm == "none" else nw.to(DEVICE), 1e-6,
                              kernels.NORMS[norm], kernels.ACTS[act]).cpu()
    # fp64 maths, rounded to bf16 where the model's own ops round (norm output, projection,
    # activation, product)
    h = x.double() if norm == "none" else _norm64(x, nw, norm, 1e-6)
    y = _bf(h @ w.double().T + bias.double())
    if act != "none":
        gate, up = y.chunk(2, dim=-1)
        f = F.silu if act == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
        y = _bf(_bf(f(gate)) * up)
    assert got.shape == (rows, n) and got.dtype == BF16
    assert _rel(got, y) < ROUND


@pytest.mark.parametrize("rows,n,k", [(1, 40, 72), (3, 16, 32)])
@pytest.mark.parametrize("resid", ["plain", "gemma"])
@pytest.mark.parametrize("norm,act", [("gemma", "gelu_pytorch_tanh"), ("llama", "silu"),
                                      ("gemma", "none")])
def test_residual_gemv_matches_fp64(rows: int, n: int, k: int, resid: str, norm: str,
                                    act: str) -> None:
    """h = res + x (Llama) or res + gemma_norm(x) (Gemma's post-norm), then the projection of
    norm(h): one kernel, against fp64 with the torch ops' roundings; h comes back too."""
    g = torch.Generator().manual_seed(rows * 100 + k + len(resid))
    x = torch.randn(rows, k, generator=g).to(BF16)
    res = (3.0 * torch.randn(rows, k, generator=g)).to(BF16)
    post = 1.0 + 0.3 * torch.randn(k, generator=g)           # fp32 1 + w (Gemma's buffer)
    w = (torch.randn(n * (2 if act != "none" else 1), k, generator=g) / math.sqrt(k)).to(BF16)
    nw = 1.0 + 0.3 * torch.randn(k, generator=g)
    nw = nw if norm == "gemma" else nw.to(BF16)
    got, h = kernels.decode_residual_gemv(
        x.to(DEVICE), res.to(DEVICE), post.to(DEVICE) if resid == "gemma" else None,
        w.to(DEVICE), None, nw.to(DEVICE), 1e-6, kernels.NORMS[norm], kernels.ACTS[act])
    branch = _norm64(x, post, "gemma", 1e-6) if resid == "gemma" else x.double()
    want_h = _bf(res.double() + branch)
    y = _bf(_norm64(want_h, nw, norm, 1e-6) @ w.double().T)
    if act != "none":
        gate, up = y.chunk(2, dim=-1)
        f = F.silu if act == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
        y = _bf(_bf(f(gate)) * up)
    assert h.dtype == BF16 and _rel(h.cpu(), want_h) < ROUND
    assert got.shape == (rows, n) and _rel(got.cpu(), y) < ROUND


def _attention64(q, k, v, pad, slot, scale, window):
    """fp64 softmax attention of one query per row at `slot` over slots 0..slot (padding and
    the window masked; the own slot always seen)."""
    hq = q.shape[1]
    hkv, length = k.shape[1], k.shape[2]
    j = torch.arange(length)
    seen = ((pad[:, :length] != 0) & (j <= slot)) | (j == slot)
    if window:
        seen &= j > slot - window
    kk = k.double().repeat_interleave(hq // hkv, dim=1)
    vv = v.double().repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("bhd,bhld->bhl", q.double(), kk) * scale
    s = s.masked_fill(~seen[:, None, :], float("-inf"))
    return torch.einsum("bhl,bhld->bhd", torch.softmax(s, -1), vv)


def _rope64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, D] rotated (rope; cos, sin [B, D]) in fp64, rounded once to bf16."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return _bf(x.double() * cos.double()[:, None] + rot.double() * sin.double()[:, None])


def _qkv_case(b: int, hq: int, hkv: int, length: int, d: int, slot: int, seed: int,
              qk_norm: bool, rope: bool) -> dict:
    """A raw q|k|v row per sequence, caches, norms and rope, and what the kernel must give:
    the normed, rotated heads, the caches with the new key / value at `slot`."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, (hq + 2 * hkv) * d, generator=g).to(BF16)
    k = torch.randn(b, hkv, length, d, generator=g).to(BF16)
    v = torch.randn(b, hkv, length, d, generator=g).to(BF16)
    qn, kn = (1.0 + 0.3 * torch.randn(d, generator=g) for _ in range(2))   # fp32 1 + w
    pos = torch.randint(0, 200, (b,), generator=g).double()
    inv = 1.0 / (100.0 ** (torch.arange(0, d, 2).double() / d))
    ang = torch.cat((pos[:, None] * inv, pos[:, None] * inv), -1)
    cos, sin = ang.cos().to(BF16), ang.sin().to(BF16)
    heads = qkv.view(b, hq + 2 * hkv, d)
    q, k_new, v_new = heads[:, :hq], heads[:, hq:hq + hkv], heads[:, hq + hkv:]
    if qk_norm:
        q, k_new = _norm64(q, qn, "gemma", 1e-6), _norm64(k_new, kn, "gemma", 1e-6)
    if rope:
        q, k_new = _rope64(q, cos, sin), _rope64(k_new, cos, sin)
    k_want, v_want = k.double(), v.double()
    k_want[:, :, slot], v_want[:, :, slot] = k_new.double(), v_new.double()
    return {"qkv": qkv, "k": k, "v": v, "q_norm": qn if qk_norm else None,
            "k_norm": kn if qk_norm else None, "cos": cos if rope else None,
            "sin": sin if rope else None, "q_want": q.double(), "k_want": k_want,
            "v_want": v_want}


def _attend(case: dict, pad: torch.Tensor, slot: int, count: torch.Tensor, scale: float,
            window: int, split: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel on `case` (on DEVICE) -> (output, key cache, value cache) on the CPU."""
    dev = {name: (t.to(DEVICE) if isinstance(t, torch.Tensor) else t)
           for name, t in case.items()}
    out = kernels.decode_attention(dev["qkv"], dev["q_norm"], dev["k_norm"], 1e-6, dev["cos"],
                                   dev["sin"], dev["k"], dev["v"], pad.to(DEVICE),
                                   torch.tensor([slot], device=DEVICE), count, scale, window,
                                   split)
    return out.cpu(), dev["k"].cpu(), dev["v"].cpu()


@pytest.mark.parametrize("split", [0, 16])
@pytest.mark.parametrize("hq,hkv", [(4, 1), (4, 2), (2, 2)])
@pytest.mark.parametrize("slot,window", [(0, 0), (5, 0), (29, 0), (37, 0), (29, 6), (37, 19)])
@pytest.mark.parametrize("qk_norm,rope", [(True, True), (False, True), (False, False)])
def test_attention_matches_fp64(hq: int, hkv: int, slot: int, window: int, split: int,
                                qk_norm: bool, rope: bool) -> None:
    """From the raw q|k|v row: q/k norms (Gemma) and rope, the new key / value written at
    `slot` (nothing else in the caches touched), attention over padding, windows, grouped
    heads and split merges; against fp64 with the torch path's roundings."""
    b, length, d = 3, 40, 32
    case = _qkv_case(b, hq, hkv, length, d, slot, slot * 10 + hq + hkv + window + qk_norm,
                     qk_norm, rope)
    pad = torch.ones(b, length + 3, dtype=torch.long)   # wider than the cache, like the engine's
    pad[1, :4] = 0          # left padding
    pad[2, :11] = 0
    count = torch.zeros(b * hkv, dtype=torch.int32, device=DEVICE)
    got, k_cache, v_cache = _attend(case, pad, slot, count, 0.3, window, split)
    want = _attention64(case["q_want"], case["k_want"], case["v_want"], pad, slot, 0.3, window)
    assert got.shape == (b, hq, d) and _rel(got, want) < 1.5e-2
    assert not count.any(), "the split-merge counter must be left at zero"
    others = torch.arange(length) != slot
    assert torch.equal(k_cache[:, :, others], case["k"][:, :, others])
    assert torch.equal(v_cache[:, :, others], case["v"][:, :, others])
    assert torch.equal(v_cache[:, :, slot].double(), case["v_want"][:, :, slot])
    assert _rel(k_cache[:, :, slot], case["k_want"][:, :, slot]) < ROUND


def test_attention_splits_agree() -> None:
    """One program per sequence vs three: the merged result is the same attention."""
    case = _qkv_case(2, 4, 1, 48, 32, 45, 3, True, True)
    pad = torch.ones(2, 48, dtype=torch.long)
    count = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    one = _attend(case, pad, 45, count, 0.2, 0, 64)[0]
    many = _attend(case, pad, 45, count, 0.2, 0, 16)[0]
    assert _rel(many, one) < 1e-2


TINY = {"vocab_size": 97, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 256}
MODELS = {
    "gemma3_text": {"sliding_window": 5, "query_pre_attn_scalar": 16,
                    "final_logit_softcapping": 3.0, "rope_local_base_freq": 100.0,
                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "llama": {"attention_bias": True, "mlp_bias": True},
    "qwen2": {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1},
}


def _bf16_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(AutoConfig.for_model(name, **TINY, **MODELS[name]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m.to(DEVICE, BF16).eval()


@pytest.mark.parametrize("name", sorted(MODELS))
@torch.no_grad()
def test_step_with_kernels_matches_torch_ops(name: str) -> None:
    """Prefill, then 6 one-token steps fed the same tokens: the kernels' logits against the
    torch ops' (both bf16), and each against the fp32 HF model's full-sequence forward."""
    model = _bf16_model(name)
    rows, prompt, steps = 3, 6, 6
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (rows, prompt + steps), generator=g).to(DEVICE)
    mask = torch.ones(rows, prompt + steps + 2, dtype=torch.long, device=DEVICE)
    mask[1, :2] = 0
    decoders = {kern: DecodeModel(model, batch=rows, max_len=prompt + steps + 2, kernels=kern)
                for kern in [(), ("attention", "gemv")]}
    pos_all = (mask[:, :prompt + steps].cumsum(-1) - 1).clamp(min=0)
    logits = {}
    for kern, dec in decoders.items():
        dec.prefill(ids[:, :prompt], pos_all[:, :prompt], mask)
        out = []
        for t in range(prompt, prompt + steps):
            out.append(dec.step(ids[:, t:t + 1], pos_all[:, t:t + 1],
                                torch.tensor([t], device=DEVICE), mask).float())
        logits[kern] = torch.stack(out, 1)
    ref = model.float()(input_ids=ids, attention_mask=mask[:, :prompt + steps]).logits[:, prompt:]
    got, torch_ops = logits[("attention", "gemv")], logits[()]
    assert _rel(got, torch_ops) < 2e-2
    assert _rel(got, ref) < 2 * _rel(torch_ops, ref) + 1e-2


@torch.no_grad()
def test_gemv_keeps_an_fp32_residual_stream_under_autocast() -> None:
    """fp32 weights decoded under bf16 autocast (the GEMVs run in bf16): the residual stream
    stays fp32 as on the torch path, so the residual add is not folded into a bf16 kernel."""
    model = _bf16_model("llama").float()
    ids = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    mask = torch.ones(2, 8, dtype=torch.long, device=DEVICE)
    pos = torch.arange(5, device=DEVICE)[None].expand(2, 5)
    out = {}
    with torch.autocast(DEVICE.type, dtype=BF16):
        for kern in [(), ("gemv",)]:
            dec = DecodeModel(model, batch=2, max_len=8, kernels=kern)
            dec.prefill(ids[:, :4], pos[:, :4], mask)
            out[kern] = dec.step(ids[:, 4:], pos[:, 4:], torch.tensor([4], device=DEVICE),
                                 mask).float()
    # 3.5e-3 here (the GEMVs' own bf16 rounding); 6.7e-3 with the stream rounded to bf16
    assert _rel(out[("gemv",)], out[()]) < 5e-3


def test_kernels_refused_with_a_reason() -> None:
    model = _bf16_model("llama")
    with pytest.raises(EngineUnavailable, match="at most 16 rows"):
        DecodeModel(model, batch=17, max_len=8, kernels=("gemv",))
    with pytest.raises(EngineUnavailable, match="unknown decode kernel"):
        DecodeModel(model, batch=1, max_len=8, kernels=("flash",))
    with pytest.raises(EngineUnavailable, match="needs 16-bit"):
        DecodeModel(model.float(), batch=1, max_len=8, kernels=("attention",))
    with pytest.raises(EngineUnavailable, match="give 'serving'"):
        DecodeModel(model, batch=1, max_len=8, kernels="all")


def test_default_and_serving_kernels() -> None:
    """The default forward on CUDA runs the attention kernel and, at one row, the GEMV
    (DEFAULT_KERNELS: measured faster than the torch ops; the GEMV slower than cuBLAS at 8
    rows); "serving" takes what serves: on CPU nothing (the interpreter only runs kernels
    named explicitly)."""
    model = _bf16_model("llama")
    assert DecodeModel(model, batch=1, max_len=8).kernels == (("attention", "gemv") if ON_CUDA
                                                             else ())
    assert DecodeModel(model, batch=2, max_len=8).kernels == (("attention",) if ON_CUDA else ())
    want = ("attention", "gemv") if ON_CUDA else ()
    assert DecodeModel(model, batch=1, max_len=8, kernels="serving").kernels == want
    assert DecodeModel(model, batch=32, max_len=8, kernels="serving").kernels == want[:1]


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("rows", [3, 20])
def test_captured_steps_with_kernels_are_the_uncaptured_ones_on_cuda(rows: int) -> None:
    """wattkd's forward on a bf16 Gemma 3 with every Triton kernel that serves (GEMV at 3 rows,
    attention only at 20), prompt + new tokens past one attention split (64 slots): the
    replayed CUDA graph gives the tokens of the same step run uncaptured, compiled or not."""
    from wattkd.generation import SamplingParams
    from wattkd.generation.graph_engine import GraphDecoder

    model = _bf16_model("gemma3_text")
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 97, (rows, 50), generator=g).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    params = SamplingParams(max_new_tokens=30)
    for compile in (False, True):
        outs = []
        for capture in (True, False):
            dec = GraphDecoder(model, batch=rows, max_len=80, params=params, steps=4,
                               capture=capture, compile=compile, forward="wattkd-triton")
            assert dec.fwd.kernels == (("attention", "gemv") if rows <= 16 else ("attention",))
            outs.append(dec.decode(ids, mask)[0])
        assert torch.equal(outs[0], outs[1])


def test_kernel_arguments_are_checked() -> None:
    """More rows than the GEMV's tile is an error, not silently unwritten rows; a split that
    is not a power of two runs with the tiles that divide it."""
    w = torch.randn(16, 32).to(BF16).to(DEVICE)
    with pytest.raises(ValueError, match="at most 16 rows"):
        kernels.decode_gemv(torch.randn(17, 32).to(BF16).to(DEVICE), w, None, None, 1e-6, 0, 0)
    case = _qkv_case(1, 2, 1, 100, 32, 97, 5, False, True)
    pad = torch.ones(1, 100, dtype=torch.long)
    count = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    got = _attend(case, pad, 97, count, 0.3, 0, 48)[0]
    assert _rel(got, _attention64(case["q_want"], case["k_want"], case["v_want"], pad, 97, 0.3,
                                  0)) < 1.5e-2
    with pytest.raises(ValueError, match="qkv width"):
        kernels.decode_attention(case["qkv"][:, :-16].to(DEVICE), None, None, 1e-6, None, None,
                                 case["k"].to(DEVICE), case["v"].to(DEVICE), pad.to(DEVICE),
                                 torch.tensor([97], device=DEVICE), count, 0.3, 0, 0)
