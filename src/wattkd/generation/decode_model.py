"""wattkd's own decode forward: fused weights, a static KV cache, plain torch ops.

Why: the HF forward launches ~15 kernels per layer per decoding step (separate q/k/v and
gate/up GEMMs, mask building and `repeat_kv` per layer, cache bookkeeping); at small models
the step is bound by kernel count, not bandwidth (benchmarks/RESULTS.md, decode engine). As in
gpt-fast, `DecodeModel` holds the weights fused (q|k|v one matrix, gate|up one matrix, their
biases concatenated), its own KV cache tensors, and a prefill and a one-token step written as
plain torch ops, so inductor fuses norms, rope, residuals and cache writes. One boolean mask
per step (not per layer) and no `repeat_kv` copy: in the one-token step the G query heads
sharing a KV head become G query rows of that head, attention is two matmuls and an fp32
softmax (cuDNN's SDPA cost 23 us a layer there); the prefill uses
`F.scaled_dot_product_attention` with `enable_gqa`.

The maths is HF's, read from the installed modeling files (Gemma 3 text, Llama, Qwen2):
Gemma's RMSNorm (x * (1 + w), computed in fp32), q/k norms, the embedding scale in the model
dtype, `query_pre_attn_scalar`, post-attention / post-feedforward norms, local layers
(`layer_types`, `sliding_window`, `rope_local_base_freq`'s inverse frequencies) and
`final_logit_softcapping`; Llama's rope scaling (default, linear, llama3: the inverse
frequencies are taken from the model's own rotary module); Qwen2's qkv bias and its sliding
layers. What is not implemented is refused with `EngineUnavailable` naming it.

On CUDA the one-token step runs through Triton kernels (`generation/kernels.py`, `KERNELS`;
`kernels="serving"` or named ones): each projection with the residual add and norm before it
and the gated activation after it fused in (a GEMV, batch <= 16), and attention as one kernel
per layer from the raw q|k|v projection (q/k norms, rope, the cache writes, attention over the
cache up to the current slot). The default (DEFAULT_KERNELS): both, the GEMV only at one row,
where it is faster than cuBLAS; the batch-1 step on an H100 is 0.587 ms with both against 0.821
with the torch ops (benchmarks/RESULTS.md, decode kernels, everything fused).

Weights change between rollouts while the student trains: `refresh()` copies the live
parameters into the fused buffers in place (a peft LoRA adapter, unmerged, is merged into the
buffer as W + scale * B @ A; the model is never touched), so a captured CUDA graph's
addresses stay valid. Its cost is one copy of the weights (read + write of every parameter,
~2 x the weight bytes; the buffers also hold a second copy of the weights in memory).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED = ("gemma3_text", "llama", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh")}
LAYER_KINDS = ("full_attention", "sliding_attention")
KERNELS = ("attention", "gemv")   # the step's optional Triton kernels (generation/kernels.py)
# What `kernels=None` gives (RESULTS.md, decode kernels, everything fused): both, the GEMV only
# at one row. At batch 1 on an H100 the step with both took 0.587 ms against 0.821 with the
# torch ops; at batch 8 the GEMV's several-row path (tl.dot tiles) made it slower than
# attention alone with cuBLAS projections (0.968 vs 0.762 ms).
DEFAULT_KERNELS: tuple[str, ...] = ("attention", "gemv")
GEMV_DEFAULT_ROWS = 1             # the default takes the GEMV up to this many rows
SERVING = "serving"               # kernels="serving": every kernel that serves the model
GEMV_MAX_ROWS = 16                # kernels.MAX_ROWS (not imported: triton is optional)


class EngineUnavailable(RuntimeError):
    """The graph engine (or its own forward) cannot serve this model or request (the reason
    says why)."""


@dataclass(frozen=True)
class Arch:
    """What the forward needs from the config, checked once."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    scaling: float
    act: str
    gemma: bool
    window: int | None
    sliding: tuple[bool, ...]
    softcap: float | None


def base_model(model: nn.Module) -> nn.Module:
    """The HF causal LM under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def inspect_arch(model: nn.Module) -> Arch:
    """The architecture, or EngineUnavailable naming what this forward does not implement."""
    hf = base_model(model)
    cfg = hf.config
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        raise EngineUnavailable(f"model_type {kind!r} has no wattkd decode forward "
                                f"(supported: {', '.join(SUPPORTED)})")
    if not (hasattr(hf, "model") and hasattr(hf.model, "layers") and hasattr(hf, "lm_head")):
        raise EngineUnavailable(f"{type(hf).__name__} is not a decoder-only causal LM")
    for name in ("attn_logit_softcapping", "use_bidirectional_attention"):
        if getattr(cfg, name, None):
            raise EngineUnavailable(f"{kind}: {name}={getattr(cfg, name)} is not implemented")
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
    if act not in ACTIVATIONS:
        raise EngineUnavailable(f"{kind}: activation {act!r} is not implemented "
                                f"(known: {', '.join(ACTIVATIONS)})")
    n = cfg.num_hidden_layers
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * n)
    if len(types) != n or any(t not in LAYER_KINDS for t in types):
        raise EngineUnavailable(f"{kind}: layer_types {sorted(set(types))} not implemented "
                                f"(known: {', '.join(LAYER_KINDS)})")
    window = getattr(cfg, "sliding_window", None)
    if "sliding_attention" in types and not window:
        raise EngineUnavailable(f"{kind}: sliding layers without a sliding_window")
    for t in set(types):
        rope = _rope_type(cfg, t)
        if rope not in ROPE_TYPES:
            raise EngineUnavailable(f"{kind}: rope type {rope!r} is not implemented "
                                    f"(known: {', '.join(ROPE_TYPES)})")
    attn = hf.model.layers[0].self_attn
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return Arch(layers=n, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                head_dim=head_dim, eps=float(cfg.rms_norm_eps), scaling=float(attn.scaling),
                act=act, gemma=kind == "gemma3_text",
                window=int(window) if "sliding_attention" in types else None,
                sliding=tuple(t == "sliding_attention" for t in types),
                softcap=getattr(cfg, "final_logit_softcapping", None))


def _rope_type(cfg: Any, layer_type: str) -> str:
    params = getattr(cfg, "rope_parameters", None) or {}
    if layer_type in params:          # per-layer-type parameters (Gemma 3)
        params = params[layer_type] or {}
    return params.get("rope_type", params.get("type", "default"))


def _rope_of(hf: nn.Module, layer_type: str) -> tuple[Tensor, float]:
    """(inverse frequencies, attention scaling) of the model's own rotary module."""
    rot = hf.model.rotary_emb
    if hasattr(rot, f"{layer_type}_inv_freq"):
        return (getattr(rot, f"{layer_type}_inv_freq"),
                float(getattr(rot, f"{layer_type}_attention_scaling")))
    return rot.inv_freq, float(rot.attention_scaling)


def linear_parts(mod: nn.Module) -> tuple[Tensor, Tensor | None, list[tuple[Tensor, Tensor, float]]]:
    """(weight, bias, active LoRA deltas as (B, A, scale)) of an nn.Linear or of a peft LoRA
    layer around one; anything else is refused."""
    inner = getattr(mod, "base_layer", None)
    if inner is None:
        if not isinstance(mod, nn.Linear) or not mod.weight.dtype.is_floating_point:
            raise EngineUnavailable(f"{type(mod).__name__} is not a plain floating-point Linear")
        return mod.weight, mod.bias, []
    if not hasattr(mod, "lora_A"):
        raise EngineUnavailable(f"peft layer {type(mod).__name__} is not LoRA")
    weight, bias, _ = linear_parts(inner)
    if mod.disable_adapters or mod.merged:      # forward runs the base layer (merged: W holds it)
        return weight, bias, []
    deltas = []
    for name in mod.active_adapters:
        if name not in mod.lora_A:
            continue
        extra = [k for k, on in (("DoRA", mod.use_dora.get(name)),
                                 ("lora_bias", getattr(mod, "lora_bias", {}).get(name)),
                                 ("fan_in_fan_out", getattr(mod, "fan_in_fan_out", False)),
                                 ("variant", getattr(mod, "lora_variant", {}).get(name))) if on]
        if extra:
            raise EngineUnavailable(f"LoRA adapter {name!r} uses {', '.join(extra)}")
        deltas.append((mod.lora_B[name].weight, mod.lora_A[name].weight,
                       float(mod.scaling[name])))
    return weight, bias, deltas


def _fill(dst: Tensor, parts: list[nn.Module]) -> None:
    """Copy the (LoRA-merged) weights of `parts` into consecutive row blocks of `dst`."""
    row = 0
    for mod in parts:
        w, _, deltas = linear_parts(mod)
        block = dst[row:row + w.shape[0]]
        block.copy_(w)
        for b, a, scale in deltas:
            block.addmm_(b.to(block.dtype), a.to(block.dtype), alpha=scale)
        row += w.shape[0]


def _fill_bias(dst: Tensor, parts: list[nn.Module]) -> None:
    row = 0
    for mod in parts:
        w, b, _ = linear_parts(mod)
        dst[row:row + w.shape[0]].copy_(b)
        row += w.shape[0]


def layer_linears(layer: nn.Module) -> dict[str, list[nn.Module]]:
    """The fused weight groups of one HF decoder layer."""
    at, mlp = layer.self_attn, layer.mlp
    return {"qkv": [at.q_proj, at.k_proj, at.v_proj], "o": [at.o_proj],
            "gate_up": [mlp.gate_proj, mlp.up_proj], "down": [mlp.down_proj]}


def _norm_names(gemma: bool) -> tuple[str, ...]:
    if gemma:
        return ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm")
    return ("input_layernorm", "post_attention_layernorm")


class FusedWeights(nn.Module):
    """The model's weights fused for decoding (q|k|v, gate|up, Gemma's norms as 1 + w in fp32,
    LoRA merged), shared by all decoders of one model (`shared_weights`): one copy in memory
    and one `refresh` per decode whatever the number of batch buckets. `matmul_dtype`: the
    dtype of the GEMM weights (projections, lm_head) and of the KV cache; under autocast the
    autocast dtype (autocast would cast every weight at every step), else the model's."""

    def __init__(self, model: nn.Module, matmul_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.arch = a = inspect_arch(model)
        self.source = [model]          # a list: not registered as a submodule (no state dict)
        hf = base_model(model)
        emb = hf.model.embed_tokens.weight
        dev, dtype = emb.device, emb.dtype
        self.matmul_dtype = mm = matmul_dtype or dtype
        self.tied = (hf.lm_head.weight is emb or hf.lm_head.weight.data_ptr() == emb.data_ptr()
                     ) and mm == dtype
        layer0 = layer_linears(hf.model.layers[0])
        buf = functools.partial(self.register_buffer, persistent=False)
        for name, parts in layer0.items():
            ws = [linear_parts(m) for m in parts]
            rows = sum(w.shape[0] for w, _, _ in ws)
            buf(name, torch.empty(a.layers, rows, ws[0][0].shape[1], device=dev, dtype=mm))
            has_bias = all(b is not None for _, b, _ in ws)
            if not has_bias and any(b is not None for _, b, _ in ws):
                raise EngineUnavailable(f"{name}: some projections have a bias, others not")
            buf(f"{name}_bias", torch.empty(a.layers, rows, device=dev, dtype=mm)
                if has_bias else None)
        norm_dtype = torch.float32 if a.gemma else dtype
        for name in _norm_names(a.gemma):
            width = a.head_dim if name.startswith("self_attn") else emb.shape[1]
            buf(_buffer_name(name), torch.empty(a.layers, width, device=dev, dtype=norm_dtype))
        buf("final_norm", torch.empty(emb.shape[1], device=dev, dtype=norm_dtype))
        buf("embed", torch.empty_like(emb))
        buf("lm_head", self.embed if self.tied
            else torch.empty_like(linear_parts(hf.lm_head)[0], dtype=mm))
        scale = getattr(hf.model.embed_tokens, "embed_scale", None)
        buf("embed_scale", None if scale is None else scale.detach().to(dev, dtype).clone())
        kinds = sorted({"sliding_attention" if s else "full_attention" for s in a.sliding})
        self.rope_kind = ["sliding_attention" if s else "full_attention" for s in a.sliding]
        self.rope_scaling: dict[str, float] = {}
        for kind in kinds:
            inv, scaling = _rope_of(hf, kind)
            buf(f"inv_freq_{kind}", inv.detach().to(dev, torch.float32).clone())
            self.rope_scaling[kind] = scaling
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the source model's current weights (LoRA merged) into the fused buffers, in
        place: one read + write of every weight."""
        hf = base_model(self.source[0])
        for i, layer in enumerate(hf.model.layers):
            for name, parts in layer_linears(layer).items():
                _fill(getattr(self, name)[i], parts)
                bias = getattr(self, f"{name}_bias")
                if bias is not None:
                    _fill_bias(bias[i], parts)
            for norm in _norm_names(self.arch.gemma):
                self._set_norm(getattr(self, _buffer_name(norm))[i], _attr(layer, norm).weight)
        self._set_norm(self.final_norm, hf.model.norm.weight)
        self.embed.copy_(hf.model.embed_tokens.weight)
        if not self.tied:
            _fill(self.lm_head, [hf.lm_head])

    def weight_bytes(self) -> int:
        """Bytes of the weight buffers (what `refresh` writes; it reads as many)."""
        seen = {t.data_ptr(): t.numel() * t.element_size()
                for name, t in self.named_buffers()
                if t is not None and not name.startswith("inv_freq")}
        return sum(seen.values())

    def _set_norm(self, dst: Tensor, w: Tensor) -> None:
        """Gemma stores w and scales by (1 + w) in fp32: the buffer holds 1 + w.float()."""
        dst.copy_(1.0 + w.float() if self.arch.gemma else w)


def shared_weights(model: nn.Module) -> FusedWeights:
    """The model's FusedWeights, built on first use and kept on the model (rebuilt if the
    model moved to another device or dtype, or the autocast dtype changed)."""
    inspect_arch(model)            # refuse before touching modules it may not have
    emb = base_model(model).model.embed_tokens.weight
    kind = emb.device.type
    mm = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else emb.dtype
    held = model.__dict__.get("_wattkd_fused_weights")
    if held is None or (held.embed.device, held.embed.dtype, held.matmul_dtype) != (
            emb.device, emb.dtype, mm):
        held = FusedWeights(model, mm)
        model.__dict__["_wattkd_fused_weights"] = held
    return held


class DecodeModel(nn.Module):
    """A causal LM's inference forward over its own static KV cache of `batch` rows x
    `max_len` slots. `prefill` fills slots 0..P-1; `step` decodes one token per row at slot
    `slot` (a 1-element device tensor: no host sync, capturable). Call `refresh()` whenever the
    source model's weights may have changed (the weights are shared_weights(model))."""

    name = "wattkd"

    def __init__(self, model: nn.Module, *, batch: int, max_len: int,
                 kernels: tuple[str, ...] | str | None = None) -> None:
        super().__init__()
        self.w = w = shared_weights(model)
        self.arch = a = w.arch
        dev, dtype = w.embed.device, w.matmul_dtype
        shape = (batch, a.kv_heads, max_len, a.head_dim)
        for i in range(a.layers):    # one tensor per layer: the step writes a buffer, not a view
            for kv in ("k", "v"):
                self.register_buffer(f"{kv}_cache_{i}", torch.zeros(shape, device=dev, dtype=dtype),
                                     persistent=False)
        self.register_buffer("slots", torch.arange(max_len, device=dev), persistent=False)
        self.batch, self.max_len = batch, max_len
        self.kernels = step_kernels(w, batch, kernels)
        self._kern = None
        if self.kernels:
            from wattkd.generation import kernels as kern  # lazy: triton is optional
            self._kern = kern
            # the attention kernel's split-merge counters (left zero by every launch)
            self.register_buffer("attn_count", torch.zeros(batch * a.kv_heads, device=dev,
                                                           dtype=torch.int32), persistent=False)

    def cache(self, i: int) -> tuple[Tensor, Tensor]:
        """Layer i's (keys, values) [batch, kv_heads, max_len, head_dim]."""
        return getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")

    def reset(self) -> None:
        """Nothing to clear between requests: slots past a row's current one are masked out
        (weight exactly 0 on finite values), and `prefill` rewrites slots 0..P-1."""

    def refresh(self) -> None:
        """The source model's current weights into the shared fused buffers (in place)."""
        self.w.refresh()

    # -- the maths --------------------------------------------------------------------------
    def _norm(self, x: Tensor, w: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.arch.eps)
        if self.arch.gemma:
            return (y * w).type_as(x)
        return w * y.to(x.dtype)

    def _rope(self, pos: Tensor, dtype: torch.dtype) -> dict[str, tuple[Tensor, Tensor]]:
        """cos, sin [B, 1, S, D] per rope kind (HF: fp32 angles, scaled, cast to the dtype)."""
        out = {}
        for kind, scaling in self.w.rope_scaling.items():
            freqs = pos[..., None].float() * getattr(self.w, f"inv_freq_{kind}")
            emb = torch.cat((freqs, freqs), dim=-1)
            out[kind] = ((emb.cos() * scaling).to(dtype)[:, None],
                         (emb.sin() * scaling).to(dtype)[:, None])
        return out

    def _linear(self, x: Tensor, name: str, i: int) -> Tensor:
        bias = getattr(self.w, f"{name}_bias")
        return F.linear(x, getattr(self.w, name)[i], None if bias is None else bias[i])

    def _project(self, x: Tensor, norm_w: Tensor | None, name: str, i: int, gemv: bool, *,
                 gated: bool = False) -> Tensor:
        """F.linear(norm(x), weight `name` of layer i) (norm skipped when norm_w is None);
        `gated`: the gate|up weight, giving act(gate) * up. `gemv`: one Triton kernel."""
        if gemv:
            bias = getattr(self.w, f"{name}_bias")
            norm = "none" if norm_w is None else "gemma" if self.arch.gemma else "llama"
            flat = x.reshape(-1, x.shape[-1]).contiguous()
            out = self._kern.decode_gemv(
                flat, getattr(self.w, name)[i], None if bias is None else bias[i], norm_w,
                self.arch.eps, self._kern.NORMS[norm],
                self._kern.ACTS[self.arch.act] if gated else 0)
            return out.view(*x.shape[:-1], out.shape[-1])
        out = self._linear(x if norm_w is None else self._norm(x, norm_w), name, i)
        if gated:
            gate, up = out.chunk(2, dim=-1)
            out = ACTIVATIONS[self.arch.act](gate) * up
        return out

    def _heads(self, qkv: Tensor, i: int, cos: Tensor, sin: Tensor
               ) -> tuple[Tensor, Tensor, Tensor]:
        """q|k|v [B, S, (Hq + 2 Hkv) D] -> q [B, Hq, S, D], k and v [B, Hkv, S, D] (normed,
        rotated)."""
        a = self.arch
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, a.heads + 2 * a.kv_heads, a.head_dim)
        q, k, v = qkv.transpose(1, 2).split([a.heads, a.kv_heads, a.kv_heads], dim=1)
        if a.gemma:
            q, k = self._norm(q, self.w.q_norm[i]), self._norm(k, self.w.k_norm[i])
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def _add(self, x: Tensor, branch: tuple[Tensor, Tensor | None] | None) -> Tensor:
        """x + the pending branch output, post-normed first where it has a post-norm (Gemma)."""
        if branch is None:
            return x
        out, post = branch
        return x + (out if post is None else self._norm(out, post))

    def _residual_project(self, x: Tensor, branch: tuple[Tensor, Tensor | None] | None,
                          norm_w: Tensor, name: str, i: int, gemv: bool, *,
                          gated: bool = False) -> tuple[Tensor, Tensor]:
        """(projection `name` of norm(h), h) with h = x + the pending branch (`_add`). With the
        GEMV the add (and Gemma's post-norm) is the projection kernel's prologue: one launch
        instead of an elementwise kernel before it. Not where the residual stream is in
        another dtype than the branch (fp32 weights under bf16 autocast: torch keeps the
        stream in fp32, the kernel would round it to bf16)."""
        if not (gemv and branch is not None and branch[0].dtype == x.dtype):
            h = self._add(x, branch)
            return self._project(h, norm_w, name, i, gemv, gated=gated), h
        out, post = branch
        bias = getattr(self.w, f"{name}_bias")
        k = x.shape[-1]
        proj, h = self._kern.decode_residual_gemv(
            out.reshape(-1, k), x.reshape(-1, k), post, getattr(self.w, name)[i],
            None if bias is None else bias[i], norm_w, self.arch.eps,
            self._kern.NORMS["gemma" if self.arch.gemma else "llama"],
            self._kern.ACTS[self.arch.act] if gated else 0)
        return proj.view(*x.shape[:-1], proj.shape[-1]), h.view(x.shape)

    def _layers(self, x: Tensor, pos: Tensor, attend: Any, gemv: bool = False) -> Tensor:
        """The decoder stack; `attend(i, qkv, cos, sin)` -> [B, S, Hq * D] does the q/k norms
        and rope (`_heads`), the cache and the attention of layer i (prefill or step); `gemv`:
        projections through the Triton GEMV, each residual add folded into the next
        projection. `branch`: a sublayer's output (and its Gemma post-norm) not yet added to
        the residual stream x."""
        gemma, w = self.arch.gemma, self.w
        ropes = self._rope(pos, x.dtype)
        branch: tuple[Tensor, Tensor | None] | None = None
        for i in range(self.arch.layers):
            qkv, x = self._residual_project(x, branch, w.ln_input[i], "qkv", i, gemv)
            out = self._project(attend(i, qkv, *ropes[w.rope_kind[i]]), None, "o", i, gemv)
            branch = (out, w.ln_post_attention[i] if gemma else None)
            h, x = self._residual_project(
                x, branch, w.ln_pre_feedforward[i] if gemma else w.ln_post_attention[i],
                "gate_up", i, gemv, gated=True)
            out = self._project(h, None, "down", i, gemv)
            branch = (out, w.ln_post_feedforward[i] if gemma else None)
        return self._norm(self._add(x, branch), w.final_norm)

    def _embed(self, ids: Tensor) -> Tensor:
        x = F.embedding(ids, self.w.embed)
        return x if self.w.embed_scale is None else x * self.w.embed_scale

    def _logits(self, h: Tensor) -> Tensor:
        logits = F.linear(h, self.w.lm_head)
        cap = self.arch.softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # -- entry points -----------------------------------------------------------------------
    def prefill(self, ids: Tensor, pos: Tensor, pad: Tensor, *, all_logits: bool = False
                ) -> Tensor:
        """Prompts [B, P] (left-padded: `pad` [B, >= P] is 0 on padding), positions [B, P]
        -> logits of the last position [B, V] (every position [B, P, V] with all_logits);
        writes cache slots 0..P-1."""
        p = ids.shape[1]
        idx = self.slots[:p]
        attend_ok = _visible(pad[:, :p].bool()[:, None, :], idx[None, :], idx[:, None])
        masks = {False: attend_ok[:, None],
                 True: self._in_window(attend_ok, idx[None, :], idx[:, None])[:, None]}

        def attend(i: int, qkv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
            q, k, v = self._heads(qkv, i, cos, sin)
            k_cache, v_cache = self.cache(i)
            k_cache[:, :, :p] = k.to(k_cache.dtype)
            v_cache[:, :, :p] = v.to(v_cache.dtype)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=masks[self.arch.sliding[i]], scale=self.arch.scaling,
                enable_gqa=self.arch.heads != self.arch.kv_heads)
            return out.transpose(1, 2).reshape(q.shape[0], p, -1)

        h = self._layers(self._embed(ids), pos, attend)
        return self._logits(h if all_logits else h[:, -1])

    def step(self, tok: Tensor, pos: Tensor, slot: Tensor, pad: Tensor) -> Tensor:
        """One token per row: tok, pos [B, 1], slot [1] (its cache slot), pad [B, max_len]
        (0 on prompt padding) -> logits [B, V]. Static shapes, no host sync."""
        a = self.arch
        b = tok.shape[0]
        group = a.heads // a.kv_heads
        masks = {}     # the torch attention's, built once a step (the kernel masks itself)
        if "attention" not in self.kernels:
            ok = _visible(pad.bool(), self.slots[None, :], slot)      # [B, L]
            masks = {False: ok[:, None, None],
                     True: self._in_window(ok, self.slots, slot)[:, None, None]}

        def attend(i: int, qkv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
            k_cache, v_cache = self.cache(i)
            if "attention" in self.kernels:   # norms, rope, cache writes and attention: one op
                window = a.window if a.sliding[i] and a.window else 0
                out = self._kern.decode_attention(
                    qkv.reshape(b, -1), self.w.q_norm[i] if a.gemma else None,
                    self.w.k_norm[i] if a.gemma else None, a.eps, cos.reshape(b, a.head_dim),
                    sin.reshape(b, a.head_dim), k_cache, v_cache, pad, slot, self.attn_count,
                    a.scaling, window, 0)
                return out.view(b, 1, a.heads * a.head_dim)
            q, k, v = self._heads(qkv, i, cos, sin)
            k_cache.index_copy_(2, slot, k.to(k_cache.dtype))
            v_cache.index_copy_(2, slot, v.to(v_cache.dtype))
            # the `group` query heads of one KV head become that head's query rows: GQA
            # without repeating the cache
            # one query row per head: plain matmuls + softmax (fp32, as HF's eager attention),
            # which inductor fuses into a few small kernels; cuDNN's SDPA took 23 us a layer
            # here on an H100 (benchmarks/RESULTS.md, decoding engine)
            qg = q.reshape(b, a.kv_heads, group, a.head_dim).to(k_cache.dtype)
            scores = (qg @ k_cache.transpose(-1, -2)).float() * a.scaling
            scores = scores.masked_fill(~masks[a.sliding[i]], float("-inf"))
            out = torch.softmax(scores, dim=-1).to(v_cache.dtype) @ v_cache
            return out.reshape(b, 1, a.heads * a.head_dim)

        h = self._layers(self._embed(tok), pos, attend, gemv="gemv" in self.kernels)
        return self._logits(h[:, -1])

    def _in_window(self, ok: Tensor, kv: Tensor, q: Tensor) -> Tensor:
        if self.arch.window is None:
            return ok
        return ok & (kv > q - self.arch.window)


def step_kernels(w: FusedWeights, batch: int, asked: tuple[str, ...] | str | None
                 ) -> tuple[str, ...]:
    """The Triton kernels the one-token step uses. `asked` None: those of DEFAULT_KERNELS that
    serve (the GEMV up to GEMV_DEFAULT_ROWS rows); SERVING: every one that serves (CUDA with
    triton installed, 16-bit weights, a power-of-two head dim; the GEMV up to GEMV_MAX_ROWS
    rows); a tuple: exactly those, or EngineUnavailable naming why not (on CPU they run only
    when named, under Triton's interpreter: tests)."""
    interpret = isinstance(asked, tuple) and os.environ.get("TRITON_INTERPRET") == "1"
    why_not = _kernel_obstacles(w.arch, "cuda" if interpret else w.embed.device.type,
                                w.matmul_dtype, batch)
    if asked is None and batch > GEMV_DEFAULT_ROWS:
        why_not.setdefault("gemv", f"batch {batch} (the default: at most {GEMV_DEFAULT_ROWS})")
    if asked is None or asked == SERVING:
        wanted = DEFAULT_KERNELS if asked is None else KERNELS
        return tuple(k for k in wanted if k not in why_not)
    if isinstance(asked, str):
        raise EngineUnavailable(f"decode kernels {asked!r}: give {SERVING!r}, None or a tuple "
                                f"of {', '.join(KERNELS)}")
    for k in asked:
        if k not in KERNELS:
            raise EngineUnavailable(f"unknown decode kernel {k!r}; known: {', '.join(KERNELS)}")
        if k in why_not:
            raise EngineUnavailable(f"decode kernel {k!r} unavailable: {why_not[k]}")
    return tuple(asked)


def _kernel_obstacles(a: Arch, device_type: str, matmul_dtype: torch.dtype, batch: int
                      ) -> dict[str, str]:
    """Why each step kernel cannot serve (absent: it can)."""
    why_not = {}
    if device_type != "cuda":
        why_not["attention"] = why_not["gemv"] = f"device {device_type} (needs CUDA)"
    elif importlib.util.find_spec("triton") is None:
        why_not["attention"] = why_not["gemv"] = "triton is not installed"
    if matmul_dtype not in (torch.bfloat16, torch.float16):
        why_not.setdefault("attention", f"weights in {matmul_dtype} (needs 16-bit)")
        why_not.setdefault("gemv", f"weights in {matmul_dtype} (needs 16-bit)")
    if a.head_dim < 16 or a.head_dim & (a.head_dim - 1):
        why_not.setdefault("attention", f"head_dim {a.head_dim} (needs a power of two >= 16)")
    if batch > GEMV_MAX_ROWS:
        why_not.setdefault("gemv", f"batch {batch} (at most {GEMV_MAX_ROWS} rows)")
    return why_not


def kernels_note(model: nn.Module) -> str:
    """Which Triton step kernels the default forward gives `model` where it is (for records:
    they launch different kernels than the torch ops), e.g. "Triton attention (q/k norms,
    rope, cache writes); Triton GEMV at 1 row", or "torch ops"."""
    emb = base_model(model).model.embed_tokens.weight
    a = inspect_arch(model)
    small = _kernel_obstacles(a, emb.device.type, emb.dtype, 1)
    small.update({k: "not a default" for k in KERNELS if k not in DEFAULT_KERNELS})
    notes = [] if "attention" in small else ["Triton attention (q/k norms, rope, cache writes)"]
    if "gemv" not in small:
        notes.append(f"Triton GEMV at {GEMV_DEFAULT_ROWS} row" if GEMV_DEFAULT_ROWS == 1
                     else f"Triton GEMV up to {GEMV_DEFAULT_ROWS} rows")
    return "; ".join(notes) or "torch ops"


def _visible(pad: Tensor, kv: Tensor, q: Tensor) -> Tensor:
    """Causal and not padding; a query always sees its own slot (a padding query would
    otherwise see nothing and SDPA would write NaN into its row)."""
    return (pad & (kv <= q)) | (kv == q)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _attr(mod: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        mod = getattr(mod, part)
    return mod


def _buffer_name(norm: str) -> str:
    """input_layernorm -> ln_input, self_attn.q_norm -> q_norm."""
    leaf = norm.rpartition(".")[2]
    return leaf if leaf.endswith("_norm") else "ln_" + leaf.removesuffix("_layernorm")
