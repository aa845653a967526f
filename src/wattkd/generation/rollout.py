"""`generate`: a batch of prompts -> a Rollout (the sequences and which tokens were generated)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from wattkd.generation.graph_engine import (
    EngineUnavailable,
    GraphDecoder,
    bucket_for,
    forward_kwargs,
)
from wattkd.generation.sampling import SamplingParams, sample_next

log = logging.getLogger(__name__)


ENGINES = ("auto", "graph", "eager")
MIN_LEN = 64   # decoders are kept per (bucket, length: a power of two >= this, sampling)


@dataclass
class Rollout:
    """sequences [B, P + N]: the (left-padded) prompts then N generated positions;
    attention_mask [B, P + N]: 1 on real tokens (prompt and generated, up to and including EOS);
    generated_mask [B, P + N]: 1 on generated tokens only (what on-policy losses score);
    prompt_len: P. `new_tokens` = generated_mask.sum() (tokens decoded that count)."""

    sequences: Tensor
    attention_mask: Tensor
    generated_mask: Tensor
    prompt_len: int

    @property
    def new_tokens(self) -> int:
        return int(self.generated_mask.sum())


@torch.no_grad()
def generate(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
             params: SamplingParams, *, generator: torch.Generator | None = None,
             engine: str = "auto", compile: bool | str = True, forward: str = "auto",
             refresh: bool = True) -> Rollout:
    """Decode `params.max_new_tokens` positions after each prompt of `input_ids` [B, P]
    (left-padded where `attention_mask` has zeros). `engine`: `graph` (CUDA graphs over a
    static KV cache; CUDA only), `eager` (any device, the reference) or `auto` (graph where it
    can serve the request, else eager, with the reason logged once). `compile`: the graph
    engine's step compiled by inductor before capture (fuses the small kernels; True =
    graph_engine.INDUCTOR_OPTIONS); a string names the torch.compile mode. `forward`: the
    graph engine's decode forward, wattkd's own fused one where it serves the model (`auto`),
    or `wattkd` / `hf` (graph_engine.FORWARDS).
    `refresh`: the graph engine copies the model's live weights before decoding (False where
    they have not changed since its decoder was built, as in EPT)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown generation engine {engine!r}; known: {', '.join(ENGINES)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if engine == "eager" or (engine == "auto" and input_ids.device.type != "cuda"):
        return _eager(model, input_ids, attention_mask, params, generator)
    if input_ids.device.type != "cuda":
        raise EngineUnavailable(f"the graph engine needs CUDA; these inputs are on "
                                f"{input_ids.device.type} (use engine='auto' or 'eager')")
    try:
        dec = decoder_for(model, input_ids.shape[0], input_ids.shape[1], params,
                          compile=compile, forward=forward)
    except EngineUnavailable as exc:
        if engine == "graph":
            raise
        _note_fallback(model, str(exc))
        return _eager(model, input_ids, attention_mask, params, generator)
    new, live = dec.decode(input_ids, attention_mask, generator=generator,
                           max_new_tokens=params.max_new_tokens, refresh=refresh)
    return _assemble(input_ids, attention_mask, new, live.long())


def engine_used(model: nn.Module, device_type: str, engine: str = "auto") -> str:
    """The engine `generate` runs for this model (for protocols and logs)."""
    if engine == "eager" or (engine == "auto" and device_type != "cuda"):
        return "eager"
    return "eager" if getattr(model, "_wattkd_graph_fallback", None) else "graph"


def decoder_for(model: nn.Module, batch: int, prompt_len: int, params: SamplingParams, *,
                compile: bool | str = True, forward: str = "auto") -> GraphDecoder:
    """The model's captured decoder for this request's bucket, built on first use."""
    rows = bucket_for(batch)
    length = max(MIN_LEN, 1 << (prompt_len + params.max_new_tokens - 1).bit_length())
    step_params = dataclasses.replace(params, max_new_tokens=1)   # the graph does not use it
    store = model.__dict__.setdefault("_wattkd_decoders", {})
    key = (rows, length, step_params, compile, forward)
    if key not in store:
        store[key] = GraphDecoder(model, batch=rows, max_len=length, params=step_params,
                                  compile=compile, forward=forward)
    return store[key]


def release_decoders(model: nn.Module) -> None:
    """Free the captured graphs, KV caches and fused weights (e.g. before training resumes)."""
    model.__dict__.pop("_wattkd_decoders", None)
    model.__dict__.pop("_wattkd_fused_weights", None)


def _note_fallback(model: nn.Module, why: str) -> None:
    if model.__dict__.get("_wattkd_graph_fallback") != why:
        log.warning("generation: graph engine unavailable (%s); using the eager engine", why)
    model.__dict__["_wattkd_graph_fallback"] = why


def _assemble(input_ids: Tensor, prompt_mask: Tensor, new: Tensor, live: Tensor) -> Rollout:
    prompt_mask = prompt_mask.long()
    return Rollout(sequences=torch.cat([input_ids, new], dim=1),
                   attention_mask=torch.cat([prompt_mask, live], dim=1),
                   generated_mask=torch.cat([torch.zeros_like(prompt_mask), live], dim=1),
                   prompt_len=input_ids.shape[1])


def _eager(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
           params: SamplingParams, generator: torch.Generator | None) -> Rollout:
    """The reference loop: HF forward with its dynamic KV cache, one position at a time."""
    b, p = input_ids.shape
    mask = attention_mask.long()
    position_ids = (mask.cumsum(-1) - 1).clamp_(min=0)
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    out_tokens, out_live = [], []
    name = forward_kwargs(model)["cache"]
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                use_cache=True)
    cache, logits = _cache_of(out), out.logits[:, -1]
    pos = position_ids[:, -1:]
    for _ in range(params.max_new_tokens):
        nxt = sample_next(logits, params, generator)
        live = ~done
        nxt = torch.where(live, nxt, torch.full_like(nxt, params.pad_token_id))
        out_tokens.append(nxt)
        out_live.append(live)
        if not params.ignore_eos and params.eos_token_id is not None:
            done = done | (nxt == params.eos_token_id)
        if len(out_tokens) == params.max_new_tokens:
            break
        mask = torch.cat([mask, live.long()[:, None]], dim=-1)
        pos = pos + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                    use_cache=True, **{name: cache})
        cache, logits = _cache_of(out), out.logits[:, -1]
    return _assemble(input_ids, mask[:, :p], torch.stack(out_tokens, dim=1),
                     torch.stack(out_live, dim=1).long())


def _cache_of(out: object) -> object:
    """The KV cache an HF forward returned (`cache`, formerly `past_key_values`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
