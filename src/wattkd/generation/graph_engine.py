"""The graph engine: static KV cache, decode steps compiled and captured as one CUDA graph.

Why: HF `generate` spends milliseconds of host time per decoding step (stopping criteria,
logits processors, cache bookkeeping, a host sync per step), so a small model's step is
host-bound and its measured J/token is mostly an idle card (benchmarks/RESULTS.md, EPT by
engine). Here, as in gpt-fast and vLLM's CUDA-graph decode: one decode step (the forward
over a static KV cache, sampling or argmax, stop flags, the advance of token, position, slot
and output column, all on device tensors) is compiled once (inductor fuses the elementwise
work; when sampling, its vocabulary scans stay eager kernels between two compiled parts), then
`steps` consecutive steps are captured as ONE CUDA graph per batch bucket and replayed; the
host checks the stop flags once per replay (one sync per `steps` tokens). Prefill runs outside
the graph.

The forward inside the step is, by default (`forward="auto"`), wattkd's own
(`decode_model.DecodeModel`: fused q|k|v and gate|up weights, its own KV cache, one mask per
step, attention without `repeat_kv`), a few kernels per layer instead of HF's ~15; its fused
weights are refreshed from the live parameters (LoRA merged) at the start of every `decode`,
in place, so a training student's rollouts use its current weights and the captured graph
stays valid (cost: one copy of the weights per `decode` call). Where it does not implement an
architecture or config it says why and HF's own forward over HF's StaticCache serves instead
(`forward="hf"` asks for that path: the `graph-hf` row of benchmarks/decode_engine.py).

The same step code runs uncaptured (`capture=False`): on CPU that is how the tests check the
static-cache logic token for token against the eager reference. Sampling reads uniforms from a
buffer that is filled from the caller's generator before each replay, so a seeded run draws
the same tokens on every replay and resumes exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
from typing import Any

import torch
from torch import Tensor, nn
from transformers import StaticCache

from wattkd.generation.decode_model import (
    SERVING,
    DecodeModel,
    EngineUnavailable,
    base_model,
    inspect_arch,
    kernels_note,
    layer_linears,
    linear_parts,
)
from wattkd.generation.sampling import SamplingParams, sample_next

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
RECOMPILE_LIMIT = 64   # one compiled step per (model, bucket) lives in dynamo's cache
# compile=True: plain inductor. compile="coordinate-descent" is gpt-fast's setting: inductor
# turns a matmul with one row (batch 1) into a tuned reduction fused with its neighbours
# (norm before q|k|v, gelu * up before down) instead of a cuBLAS call. Measured on an H100
# (benchmarks/RESULTS.md): 205 s to compile one batch bucket with it, so it is not the default.
INDUCTOR_OPTIONS: dict[str, bool] = {}
TUNED = "coordinate-descent"
TUNED_OPTIONS = {"coordinate_descent_tuning": True}
# the decode forwards: wattkd's own with its default step kernels (decode_model
# .DEFAULT_KERNELS), with every Triton step kernel that serves the model (`wattkd-triton`), with
# exactly the named ones (`wattkd-torch`: none, plain torch ops), or HF's; `auto` is `wattkd`
# where it serves the model, else HF's
FORWARD_KERNELS: dict[str, tuple[str, ...] | str | None] = {
    "wattkd": None, "wattkd-triton": SERVING, "wattkd-torch": (),
    "wattkd-attention": ("attention",), "wattkd-gemv": ("gemv",)}
FORWARDS = ("auto", *FORWARD_KERNELS, "hf")

__all__ = ["BUCKETS", "FORWARDS", "EngineUnavailable", "GraphDecoder", "HFForward", "bucket_for",
           "check_servable", "forward_kwargs", "is_sharded", "make_forward", "static_cache"]


def bucket_for(batch: int) -> int:
    """The smallest capture bucket holding `batch` rows (rows beyond it are padding)."""
    for b in BUCKETS:
        if b >= batch:
            return b
    raise EngineUnavailable(f"batch {batch} is above the largest graph bucket {BUCKETS[-1]}")


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP shards some module of `model` (its forward then runs collectives)."""
    return any("FSDP" in type(m).__name__ for m in model.modules())


def check_servable(model: nn.Module) -> None:
    """Refuse what the captured step cannot do: FSDP-sharded modules (a collective per
    step)."""
    if is_sharded(model):
        raise EngineUnavailable("FSDP-sharded modules are not captured (collectives per step)")


def static_cache(config: Any, max_len: int) -> StaticCache:
    """A static KV cache with every layer full-length. HF's sliding-window layers keep their
    fill level in a Python int (a replayed graph would not advance it, and torch.compile
    recompiles on each value); full-length layers keep it in a device tensor, and the model's
    own sliding-window mask (absolute slot positions) gives the same attention."""
    flat = copy.deepcopy(config)
    n = getattr(flat, "num_hidden_layers", None)
    if getattr(flat, "layer_types", None) and n:
        flat.layer_types = ["full_attention"] * n
    if hasattr(flat, "sliding_window"):
        flat.sliding_window = None
    return StaticCache(config=flat, max_cache_len=max_len)


class HFForward:
    """HF's own forward over HF's StaticCache, with the DecodeModel interface (reset, refresh,
    prefill, step): the fallback, and the `graph-hf` comparison row."""

    name = "hf"

    def __init__(self, model: nn.Module, max_len: int) -> None:
        self.model = model
        self.cache = static_cache(model.config, max_len)
        self._kw = forward_kwargs(model)

    def reset(self) -> None:
        self.cache.reset()

    def refresh(self) -> None:
        """Nothing to copy: HF's forward reads the live parameters."""

    def _forward(self, ids: Tensor, pos: Tensor, slots: Tensor, mask: Tensor) -> Tensor:
        kw = {self._kw["cache"]: self.cache, "use_cache": True}
        if self._kw["cache_position"]:
            kw["cache_position"] = slots
        return self.model(input_ids=ids, position_ids=pos, attention_mask=mask, **kw).logits

    def prefill(self, ids: Tensor, pos: Tensor, pad: Tensor) -> Tensor:
        slots = torch.arange(ids.shape[1], device=ids.device)
        return self._forward(ids, pos, slots, pad)[:, -1]

    def step(self, tok: Tensor, pos: Tensor, slot: Tensor, pad: Tensor) -> Tensor:
        return self._forward(tok, pos, slot, pad)[:, -1]


def make_forward(model: nn.Module, forward: str, *, batch: int, max_len: int
                 ) -> DecodeModel | HFForward:
    """The decode forward: wattkd's own (`wattkd` and its kernel variants, FORWARD_KERNELS;
    `auto` where it serves the model, else HF's with the reason logged) or HF's (`hf`)."""
    if forward not in FORWARDS:
        raise ValueError(f"unknown decode forward {forward!r}; known: {', '.join(FORWARDS)}")
    if forward != "hf":
        try:
            return DecodeModel(model, batch=batch, max_len=max_len,
                               kernels=FORWARD_KERNELS.get(forward))
        except EngineUnavailable as exc:
            if forward != "auto":
                raise
            if model.__dict__.get("_wattkd_hf_forward_reason") != str(exc):
                log.info("generation: wattkd decode forward unavailable (%s); HF forward", exc)
            model.__dict__["_wattkd_hf_forward_reason"] = str(exc)
    return HFForward(model, max_len)


def forward_for(model: nn.Module) -> str:
    """Which decode forward `auto` gives this model: "wattkd" (torch ops), "wattkd (<its
    Triton step kernels>)" once some are a default, or "hf (<why not wattkd>)". For records
    (the EPT protocol, whose hash it enters): they launch different kernels."""
    try:
        inspect_arch(model)
        for layer in base_model(model).model.layers:
            for mod in (m for group in layer_linears(layer).values() for m in group):
                linear_parts(mod)
    except EngineUnavailable as exc:
        return f"hf ({exc})"
    note = kernels_note(model)
    return "wattkd" if note == "torch ops" else f"wattkd ({note})"


class GraphDecoder:
    """Decodes batches of up to `batch` rows with prompt + new tokens <= `max_len`, for one
    model and one SamplingParams (temperature, top-p, eos are baked into the graph).
    `compile`: False, True (inductor with INDUCTOR_OPTIONS), TUNED or a torch.compile mode
    without its own CUDA graphs ("default": plain inductor; "max-autotune-no-cudagraphs").
    `forward`: see FORWARDS and make_forward; `self.forward` names the one in use."""

    def __init__(self, model: nn.Module, *, batch: int, max_len: int, params: SamplingParams,
                 steps: int = 16, capture: bool = True, compile: bool | str = True,
                 forward: str = "auto") -> None:
        check_servable(model)
        self.model, self.params, self.steps = model, params, steps
        self.batch, self.max_len = batch, max_len
        self.capture = capture and torch.cuda.is_available()
        dev = next(model.parameters()).device
        if self.capture and dev.type != "cuda":
            raise EngineUnavailable(f"CUDA graphs need a CUDA model, this one is on {dev}")
        self.device = dev
        self.fwd = make_forward(model, forward, batch=batch, max_len=max_len + steps)
        self.forward = self.fwd.name
        long = {"dtype": torch.long, "device": dev}
        self.tok = torch.zeros(batch, 1, **long)
        self.pos = torch.zeros(batch, 1, **long)
        self.slot = torch.zeros(1, **long)
        self.mask = torch.ones(batch, max_len + steps, **long)
        self.done = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.out = torch.zeros(batch, steps, **long)
        self.live = torch.zeros(batch, steps, dtype=torch.bool, device=dev)
        self.uniform = torch.zeros(steps, batch, 1, dtype=torch.float32, device=dev)
        self.index = torch.zeros(1, **long)     # the step's column in out / live / uniform
        self._logits, self._commit = self._step_logits, self._commit_token
        self._advance = self._one_step
        if compile:   # True = INDUCTOR_OPTIONS; TUNED = TUNED_OPTIONS; a string names the mode
            _allow_recompiles()
            how = ({"options": TUNED_OPTIONS} if compile == TUNED else
                   {"mode": compile} if isinstance(compile, str) else
                   {"options": INDUCTOR_OPTIONS})
            if params.greedy:   # the whole step one compiled graph (argmax fused in)
                self._advance = torch.compile(self._one_step, fullgraph=True, **how)
            else:
                # Sampling's softmax / cumsum / searchsorted over the vocabulary run as eager
                # CUDA kernels between the two compiled parts (still inside the captured
                # graph): inductor's scan code generation failed on an H100 (torch 2.11) at a
                # 262,144-entry vocabulary, once as a SplitScan and once on a blocked scan.
                self._logits = torch.compile(self._step_logits, fullgraph=True, **how)
                self._commit = torch.compile(self._commit_token, fullgraph=True, **how)
        self.graph: torch.cuda.CUDAGraph | None = None

    # -- the step ---------------------------------------------------------------------------
    def _one_step(self) -> None:
        """One decode step on the static buffers: forward, sampling, stop flags, and the
        token / position / slot / column advance (no Python int changes between steps, so the
        same compiled code serves all `steps`)."""
        self._commit(self._choose(self._logits()))

    def _step_logits(self) -> Tensor:
        return self.fwd.step(self.tok, self.pos, self.slot, self.mask)

    def _choose(self, logits: Tensor) -> Tensor:
        p = self.params
        uniform = None if p.greedy else self.uniform.index_select(0, self.index)[0]
        return sample_next(logits, p, uniform=uniform)

    def _commit_token(self, nxt: Tensor) -> None:
        p = self.params
        nxt = torch.where(self.done, torch.full_like(nxt, p.pad_token_id), nxt)
        self.out.index_copy_(1, self.index, nxt[:, None])
        self.live.index_copy_(1, self.index, ~self.done[:, None])
        if not p.ignore_eos and p.eos_token_id is not None:
            self.done |= nxt == p.eos_token_id
        self.tok.copy_(nxt[:, None])
        self.pos.add_(1)
        self.slot.add_(1)
        self.index.add_(1)

    def _steps(self) -> None:
        """`steps` decode steps (what the graph holds)."""
        self.index.zero_()
        for _ in range(self.steps):
            self._advance()

    def _capture(self) -> None:
        """Warm up (compiles) on a side stream, then capture `steps` steps as one graph."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._reset()
                self._steps()
        torch.cuda.current_stream().wait_stream(stream)
        self._reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._steps()
        self.graph = graph

    def _reset(self) -> None:
        self.fwd.reset()
        self.slot.zero_()
        self.pos.zero_()
        self.done.zero_()

    # -- one batch --------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, input_ids: Tensor, attention_mask: Tensor, *,
               generator: torch.Generator | None = None,
               max_new_tokens: int | None = None, refresh: bool = True
               ) -> tuple[Tensor, Tensor]:
        """Prompts [b, P] (left-padded, b <= batch) -> (new tokens [b, N], live [b, N]);
        N = max_new_tokens, else the decoder's params.max_new_tokens (the graph does not
        depend on N). `refresh`: copy the model's live weights first (False only where they
        cannot have changed since the decoder was built, e.g. EPT: ~5 ms per call for a
        Gemma-3-270M on an H100)."""
        b, prompt = input_ids.shape
        p = self.params
        if max_new_tokens is not None:
            p = dataclasses.replace(p, max_new_tokens=max_new_tokens)
        if b > self.batch or prompt + p.max_new_tokens > self.max_len:
            raise EngineUnavailable(f"request [{b} x {prompt}+{p.max_new_tokens}] does not fit "
                                    f"the decoder [{self.batch} x {self.max_len}]")
        if refresh:   # the live weights (a training student's change between calls)
            self.fwd.refresh()
        if self.capture and self.graph is None and p.max_new_tokens > 1:
            self._capture()   # before the prefill: capturing runs steps on the cache
        ids, mask = _pad_rows(input_ids, attention_mask.long(), self.batch)
        self._reset()
        self.mask.fill_(1)
        self.mask[:, :prompt] = mask
        pos = (mask.cumsum(-1) - 1).clamp_(min=0)
        logits = self.fwd.prefill(ids, pos, self.mask)
        first = sample_next(logits, p, generator)
        tokens, live = [first[:, None]], [torch.ones_like(first, dtype=torch.bool)[:, None]]
        if not p.ignore_eos and p.eos_token_id is not None:
            self.done |= first == p.eos_token_id
        self.tok.copy_(first[:, None])
        self.pos.copy_(pos[:, -1:] + 1)
        self.slot.fill_(prompt)
        made = 1
        while made < p.max_new_tokens:
            if not p.greedy:
                self.uniform.copy_(torch.rand(self.uniform.shape, generator=generator,
                                              device=self.device))
            if self.graph is not None:
                self.graph.replay()
            else:
                self._steps()
            tokens.append(self.out.clone())
            live.append(self.live.clone())
            made += self.steps
            if not p.ignore_eos and p.eos_token_id is not None and bool(self.done.all()):
                break
        new = torch.cat(tokens, dim=1)[:b, :p.max_new_tokens]
        alive = torch.cat(live, dim=1)[:b, :p.max_new_tokens]
        width = p.max_new_tokens
        if new.shape[1] < width:   # every row stopped early: the rest is padding
            pad = new.new_full((b, width - new.shape[1]), p.pad_token_id)
            new = torch.cat([new, pad], dim=1)
            alive = torch.cat([alive, torch.zeros_like(pad, dtype=torch.bool)], dim=1)
        return new, alive


def _allow_recompiles() -> None:
    """Each decoder (model x bucket) is one more compiled graph of the same code: keep
    dynamo's per-code limit above that, or fullgraph compiles fail once it is reached."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), RECOMPILE_LIMIT))


def _pad_rows(ids: Tensor, mask: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """Fill a batch up to its bucket with copies of row 0 (their output is dropped)."""
    extra = rows - ids.shape[0]
    if extra == 0:
        return ids, mask
    return (torch.cat([ids, ids[:1].expand(extra, -1)]),
            torch.cat([mask, mask[:1].expand(extra, -1)]))


def forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """The cache argument's name and whether `cache_position` is taken: transformers renamed
    `past_key_values` to `cache` and derives slots from position ids in newer releases. A peft
    wrapper (LoRA, unmerged) takes **kwargs: its base model's signature decides."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    inner = getattr(base, "model", None)
    inner_params = inspect.signature(inner.forward).parameters if inner is not None else {}
    names = set(params) | set(inner_params)
    return {"cache": "past_key_values" if "past_key_values" in names else "cache",
            "cache_position": "cache_position" in names}
