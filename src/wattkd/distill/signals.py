"""Teacher signals: what a method asks of the teacher, and the containers it gets back.

A method declares a `SignalRequest` (`cls.signals(method)`, distill/methods/; a teacher
cache's contents are one too, with its storage fields); a provider
(`distill.teacher.OnlineTeacher` or `teacher_cache.CachedTeacher`) answers with exactly that in
`TeacherSignals`. The built-in kinds are top-k logits with tail mass (online: final hidden
state + head, logits formed per chunk inside the fused loss), hidden states of chosen layers
and pooled final embeddings; their cache column names are made here (`TOPK_COLUMNS`,
`hidden_column`, `pooled_column`) and nowhere else.

Further kinds are `SignalKind`s registered with `register_signal`: each owns its request
entry (`SignalRequest.extra`), its `--signals` item, how it is captured from the teacher's
forward (hooks), and its cache columns (16-bit float arrays, stored like hidden states). The
teacher cache and the online teacher handle every registered kind without knowing it.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from wattkd.distill.losses import TopKTeacher
from wattkd.models import decoder_layers, unwrap

log = logging.getLogger(__name__)

__all__ = ["PROJECTIONS", "SIGNALS", "TOPK_COLUMNS", "AttentionMapsUnavailable",
           "AttentionProjections", "SignalKind", "SignalRequest", "TeacherSignals", "TopK",
           "capture_attention_maps", "capture_projections", "hidden_column",
           "hook_projections", "pool", "pooled_column", "projection_widths", "register_signal"]

TOPK_COLUMNS = ("topk_ids", "topk_logprobs", "topk_tail")


def hidden_column(layer: int) -> str:
    return f"hidden_L{layer}"


def pooled_column(how: str) -> str:
    return f"pooled_{how}"


@dataclass(frozen=True)
class SignalRequest:
    """The one request type: what a method asks of the teacher (`cls.signals(method)`) and,
    with the storage fields, what a teacher cache holds (teacher_cache/spec.py: `--signals`
    or the config's defaults; `canonical()` is part of the cache's identity)."""

    logits: bool = False                      # response KD (a cache: top-k of k = topk)
    hidden_layers: tuple[int, ...] = ()       # feature KD: HF hidden_states indices (0 = embeddings)
    pooled: tuple[str, ...] = ()              # relation KD: "mean" / "last" (a str: that one)
    extra: tuple[tuple[str, Any], ...] = ()   # registered kinds: (SignalKind.name, params)
    # how a cache stores them
    topk: int | None = None                   # k of the cached logits (implies logits)
    hidden_dtype: str | None = None           # float16 | bfloat16; None: from the teacher dtype
    hidden_stride: int = 1
    encoding: str = "packed"

    def __post_init__(self) -> None:
        if isinstance(self.pooled, str):
            object.__setattr__(self, "pooled", (self.pooled,))
        if self.topk is not None and not self.logits:
            object.__setattr__(self, "logits", True)

    @property
    def empty(self) -> bool:
        return not (self.logits or self.hidden_layers or self.pooled or self.extra)

    def canonical(self) -> str:
        """The `--signals` text of what is stored (a cache's identity)."""
        parts = []
        if self.topk is not None:
            parts.append(f"topk:{self.topk}")
        if self.hidden_layers:
            h = "hidden:" + ":".join(str(i) for i in self.hidden_layers)
            if self.hidden_dtype:
                h += ":" + ("bf16" if self.hidden_dtype == "bfloat16" else "fp16")
            if self.hidden_stride > 1:
                h += f":stride={self.hidden_stride}"
            parts.append(h)
        if self.pooled:
            parts.append("pooled:" + ":".join(self.pooled))
        parts += [SIGNALS[name].canonical(params) for name, params in self.extra]
        return ",".join(parts)


TopK = TopKTeacher  # the one top-k type; this name stays for callers outside src (benchmarks)


@dataclass
class TeacherSignals:
    """The one answer type: what a provider (online teacher, cache reader) gives a method,
    and what a cache build computes per batch before encoding it (teacher_cache.compute)."""

    last_hidden: torch.Tensor | None = None     # [B, L, Ht] after the final norm (online)
    head: nn.Module | None = None               # teacher output embeddings (online)
    softcap: float | None = None                # final logit soft-capping of the teacher
    topk: TopKTeacher | None = None             # cached alternative to last_hidden + head
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # index -> [B, L, Ht]
    hidden_stride: int = 1    # a strided cache holds positions 0, S, 2S, ...: [B, ceil(L/S), Ht]
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)  # "mean"|"last" -> [B, Ht]
    extra: dict[str, Any] = field(default_factory=dict)  # SignalKind.name -> its value


def pool(hidden: torch.Tensor, how: str) -> torch.Tensor:
    """Sequence embedding from token states: mean over positions, or the last position."""
    if how == "mean":
        return hidden.float().mean(dim=1)
    if how == "last":
        return hidden[:, -1].float()
    raise ValueError(f"unknown pooling {how!r}; expected mean or last")


class SignalKind(ABC):
    """One registered teacher-signal kind. `params` is the kind's hashable request value (for
    example a tuple of layer indices); a subclass implements every abstract method
    (registration instantiates it, so a missing one fails there)."""

    name: str = ""
    grammar: str = ""          # its `--signals` item, for error messages

    @abstractmethod
    def parse(self, args: list[str], item: str) -> Any:
        """`--signals` item `name:arg:arg` -> params; raises ValueError naming the item."""

    @abstractmethod
    def canonical(self, params: Any) -> str:
        """The item text for `params` (part of a cache's identity)."""

    @abstractmethod
    def merge(self, values: list[Any]) -> Any:
        """One request covering all of `values` (one cache serves every method)."""

    def check(self, params: Any, teacher_conf: Any) -> str | None:
        """A problem of `params` for a teacher of this HF config, else None."""
        return None

    @contextlib.contextmanager
    def capture(self, model: nn.Module, params: Any) -> Iterator[dict[str, Any]]:
        """Active around the teacher's forward (hooks); yields what `online` reads."""
        yield {}

    @abstractmethod
    def online(self, captured: dict[str, Any], params: Any) -> Any:
        """The signal's value from one teacher forward (goes to TeacherSignals.extra)."""

    @abstractmethod
    def column_names(self, params: Any) -> list[str]:
        """Cache columns of `params`; each holds one 16-bit float array per row."""

    @abstractmethod
    def column_shape(self, column: str, seq_len: int, teacher_conf: Any) -> list[int]:
        """Per-row shape of one of its columns, for a teacher of this HF config."""

    @abstractmethod
    def to_columns(self, value: Any, params: Any) -> dict[str, torch.Tensor]:
        """Value -> {column: [B, *shape] tensor} (the cache narrows them to 16 bits)."""

    @abstractmethod
    def from_columns(self, arrays: dict[str, torch.Tensor], params: Any) -> Any:
        """Inverse of `to_columns`, on decoded arrays of some rows."""


SIGNALS: dict[str, SignalKind] = {}


def register_signal(cls: type[SignalKind]) -> type[SignalKind]:
    """Class decorator: one instance of the kind becomes available under `cls.name`."""
    if not cls.name or cls.name in SIGNALS or cls.name in ("topk", "hidden", "pooled"):
        raise ValueError(f"signal kind {cls.name!r}: empty, built in or registered twice")
    SIGNALS[cls.name] = cls()
    return cls


def merge_extra(requests: list[SignalRequest]) -> tuple[tuple[str, Any], ...]:
    """The registered kinds that any of `requests` asks for, each merged over them."""
    wanted: dict[str, list[Any]] = {}
    for r in requests:
        for name, params in r.extra:
            wanted.setdefault(name, []).append(params)
    return tuple(sorted((n, SIGNALS[n].merge(v)) for n, v in wanted.items()))


# ------------------------------------------------------------------ attention projections
PROJECTIONS = ("q", "k", "v")


def attention_projections(layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The q_proj, k_proj, v_proj Linear modules of one HF decoder layer (Llama, Gemma, Qwen,
    Mistral name them so, under `self_attn`)."""
    attn = getattr(layer, "self_attn", layer)
    try:
        return tuple(getattr(attn, f"{p}_proj") for p in PROJECTIONS)  # type: ignore[return-value]
    except AttributeError:
        raise ValueError(f"{type(layer).__name__} has no self_attn.q_proj/k_proj/v_proj "
                         "modules to read attention projections from") from None


def hook_projections(layers: list[nn.Module]) -> tuple[list[dict[str, torch.Tensor]], list]:
    """Forward hooks on the q/k/v projections of `layers`: every forward then leaves each
    layer's outputs in its slot ({"q": [B, L, d_q], "k": ..., "v": ...}). Returns (slots,
    hook handles)."""
    slots: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    handles = []
    for slot, layer in zip(slots, layers):
        for name, module in zip(PROJECTIONS, attention_projections(layer)):
            def hook(_m: nn.Module, _args: Any, out: torch.Tensor, slot=slot, name=name) -> None:
                slot[name] = out
            handles.append(module.register_forward_hook(hook))
    return slots, handles


@contextlib.contextmanager
def capture_projections(layers: list[nn.Module]) -> Iterator[list[dict[str, torch.Tensor]]]:
    """`hook_projections` for the duration of one forward."""
    slots, handles = hook_projections(layers)
    try:
        yield slots
    finally:
        for h in handles:
            h.remove()


class AttentionMapsUnavailable(ValueError):
    """The model's attention layers return no attention probabilities, even in eager mode."""


@contextlib.contextmanager
def capture_attention_maps(model: nn.Module, layers: tuple[int, ...]
                           ) -> Iterator[dict[int, torch.Tensor]]:
    """Attention probabilities [B, heads, L, L] of decoder `layers` during one forward of a
    teacher (TinyBERT-style attention KD). HF computes them only in eager attention (sdpa and
    flash never form them): the model's implementation is switched to eager for this forward
    only and restored after, and the switch is logged. Only the model given changes; a method
    that wants the student's maps says so for the student itself."""
    base = unwrap(model)
    before = getattr(base.config, "_attn_implementation", None) or "eager"
    if before != "eager":
        log.info("attention maps of %s layers %s: its attention runs eager for this forward "
                 "(was %s; %s never forms the probabilities)", type(base).__name__,
                 list(layers), before, before)
        base.set_attn_implementation("eager")
    maps: dict[int, torch.Tensor] = {}
    handles = []
    blocks = decoder_layers(model)
    for i in layers:
        def hook(_m: nn.Module, _args: Any, out: Any, i: int = i) -> None:
            weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            if weights is None:
                raise AttentionMapsUnavailable(
                    f"{type(base).__name__} layer {i}: self_attn returned no attention weights "
                    "in eager mode; this architecture cannot give attention maps")
            maps[i] = weights
        handles.append(getattr(blocks[i], "self_attn", blocks[i]).register_forward_hook(hook))
    try:
        yield maps
    finally:
        for h in handles:
            h.remove()
        if before != "eager":
            base.set_attn_implementation(before)


def projection_widths(conf: Any) -> dict[str, int]:
    """Output widths of q/k/v_proj from an HF config (grouped-query attention included)."""
    heads = int(conf.num_attention_heads)
    head_dim = getattr(conf, "head_dim", None) or int(conf.hidden_size) // heads
    kv = int(getattr(conf, "num_key_value_heads", None) or heads)
    return {"q": heads * head_dim, "k": kv * head_dim, "v": kv * head_dim}


def qkv_column(layer: int, projection: str) -> str:
    return f"qkv_L{layer}_{projection}"


@register_signal
class AttentionProjections(SignalKind):
    """Q, K and V (q_proj/k_proj/v_proj outputs) of chosen decoder layers, for self-attention
    relation KD (MiniLM). params: sorted tuple of decoder layer indices (0-based). Value:
    {layer: {"q": [B, L, d_q], "k": [B, L, d_kv], "v": [B, L, d_kv]}}."""

    name = "qkv"
    grammar = "qkv:L[:L...] (decoder layers, 0-based)"

    def parse(self, args: list[str], item: str) -> tuple[int, ...]:
        if not args or not all(a.isdigit() for a in args):
            raise ValueError("name at least one decoder layer index, e.g. qkv:3")
        return tuple(sorted({int(a) for a in args}))

    def canonical(self, params: tuple[int, ...]) -> str:
        return "qkv:" + ":".join(str(i) for i in params)

    def merge(self, values: list[tuple[int, ...]]) -> tuple[int, ...]:
        return tuple(sorted({i for v in values for i in v}))

    def check(self, params: tuple[int, ...], teacher_conf: Any) -> str | None:
        n = int(teacher_conf.num_hidden_layers)
        bad = [i for i in params if not 0 <= i < n]
        return (f"decoder layers {bad} out of range: the teacher has {n} layers (0..{n - 1})"
                if bad else None)

    @contextlib.contextmanager
    def capture(self, model: nn.Module, params: tuple[int, ...]
                ) -> Iterator[dict[str, Any]]:
        layers = decoder_layers(model)
        with capture_projections([layers[i] for i in params]) as slots:
            yield {"slots": slots}

    def online(self, captured: dict[str, Any], params: tuple[int, ...]) -> dict[int, dict]:
        return {i: dict(slot) for i, slot in zip(params, captured["slots"])}

    def column_names(self, params: tuple[int, ...]) -> list[str]:
        return [qkv_column(i, p) for i in params for p in PROJECTIONS]

    def column_shape(self, column: str, seq_len: int, teacher_conf: Any) -> list[int]:
        return [seq_len, projection_widths(teacher_conf)[column.rsplit("_", 1)[1]]]

    def to_columns(self, value: dict[int, dict], params: tuple[int, ...]
                   ) -> dict[str, torch.Tensor]:
        return {qkv_column(i, p): value[i][p] for i in params for p in PROJECTIONS}

    def from_columns(self, arrays: dict[str, torch.Tensor], params: tuple[int, ...]
                     ) -> dict[int, dict]:
        return {i: {p: arrays[qkv_column(i, p)] for p in PROJECTIONS} for i in params}
