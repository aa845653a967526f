"""Teacher signals: what a method asks of the teacher, and the containers it gets back.

A method declares a `SignalRequest` (`cls.signals(method)`, distill/methods/; a teacher
cache's contents are one too, with its storage fields); a provider
(`distill.teacher.OnlineTeacher` or `teacher_cache.CachedTeacher`) answers with exactly that in
`TeacherSignals`.

Every kind of signal is a `SignalKind` registered with `register_signal`: it owns its
`--signals` item, its check against the teacher, how it is captured from the teacher's forward,
its value online and in a cache, its cache columns and their encoding. The built-in kinds
(top-k logits with tail mass, hidden states, pooled embeddings) are registered here like any
other; their requests live in `SignalRequest`'s own fields and their answers in
`TeacherSignals`' own fields, so methods read them by name. Kinds stored as 16-bit float
arrays (`qkv`, attention maps) subclass `ArraySignalKind` and implement only the array side.
The teacher cache and the online teacher handle every registered kind without knowing it.
"""

from __future__ import annotations

import contextlib
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wattkd.distill import signal_encoding as enc
from wattkd.distill.losses import TopKTeacher
from wattkd.distill.signal_encoding import TOPK_COLUMNS, Staged
from wattkd.models import decoder_layers, unwrap

log = logging.getLogger(__name__)

__all__ = ["PROJECTIONS", "SIGNALS", "TOPK_COLUMNS", "ArraySignalKind",
           "AttentionMapsUnavailable", "AttentionProjections", "CacheContext", "HiddenStates",
           "PooledEmbeddings", "SignalKind", "SignalRequest", "TeacherForward", "TeacherSignals",
           "TopKLogits", "capture_attention_maps", "capture_projections", "hidden_column",
           "hidden_positions", "hook_projections", "pool", "pooled_column", "projection_widths",
           "register_signal", "topk_logprobs"]


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
    extra: tuple[tuple[str, Any], ...] = ()   # kinds registered outside: (SignalKind.name, params)
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

    @classmethod
    def of(cls, chosen: dict[str, Any], **storage: Any) -> SignalRequest:
        """The request for `chosen` ({kind name: params}), with storage fields."""
        fields: dict[str, Any] = {}
        extra = []
        for name, params in chosen.items():
            kind = SIGNALS[name]
            if kind.builtin:
                fields.update(kind.request_fields(params))
            else:
                extra.append((name, params))
        return cls(**storage, **fields, extra=tuple(sorted(extra)))

    def kinds(self) -> list[tuple[SignalKind, Any]]:
        """Every kind asked for with its params: built-in kinds first, in registration order."""
        built = [(k, k.requested(self)) for k in SIGNALS.values() if k.builtin]
        return ([(k, p) for k, p in built if p is not None]
                + [(SIGNALS[name], params) for name, params in self.extra])

    @property
    def empty(self) -> bool:
        return not self.kinds()

    def canonical(self) -> str:
        """The `--signals` text of what is stored (a cache's identity)."""
        return ",".join(kind.canonical(params) for kind, params in self.kinds())


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


@dataclass
class TeacherForward:
    """One teacher forward as the kinds read it (distill.teacher.teacher_forward)."""

    model: nn.Module
    last_hidden: torch.Tensor                          # [B, L, Ht] after the final norm
    hidden_states: tuple[torch.Tensor, ...] | None     # HF hidden_states, when a kind asked


@dataclass
class CacheContext:
    """What a kind needs to know of a cache to lay out, compute, encode or decode its columns.
    A build fills the teacher's side (teacher_cache.plan), a reader the manifest's."""

    encoding: str
    seq_len: int = 0
    vocab: int = 0
    teacher_conf: Any = None
    dtype16: str | None = None                     # 16-bit arrays: float16 | bfloat16
    chunk_tokens: int = 4096                       # tokens per top-k logits chunk
    id_rank: torch.Tensor | None = None            # packed top-k build: rank of each token id
    id_order: Any = None                           # packed top-k read: token id of each rank
    columns: dict[str, dict[str, Any]] = field(default_factory=dict)   # manifest columns
    signals: dict[str, Any] = field(default_factory=dict)   # manifest "signals" section
    device: torch.device | str = "cpu"

    def decode16(self, cells: dict[str, list[Any]], column: str) -> torch.Tensor:
        """A 16-bit float column of some rows, on the context's device."""
        c = self.columns[column]
        return enc.decode_hidden(self.encoding, cells[column], c["shape"], c["values"],
                                 self.device)

    def narrow(self, t: torch.Tensor, what: int | str) -> torch.Tensor:
        """To the cache's 16-bit dtype; an fp16 overflow is an error, never a silent inf."""
        assert self.dtype16 is not None
        dtype = getattr(torch, self.dtype16)
        if dtype == torch.float16 and t.dtype != torch.float16:
            peak = float(t.detach().abs().max())
            if peak > torch.finfo(torch.float16).max:
                raise OverflowError(f"teacher hidden state {what} reaches |x| = {peak:.4g}, "
                                    "beyond float16's 65504: cache it as bf16 "
                                    "(--signals hidden:...:bf16)")
        return t.to(dtype)


def pool(hidden: torch.Tensor, how: str) -> torch.Tensor:
    """Sequence embedding from token states: mean over positions, or the last position."""
    if how == "mean":
        return hidden.float().mean(dim=1)
    if how == "last":
        return hidden[:, -1].float()
    raise ValueError(f"unknown pooling {how!r}; expected mean or last")


class SignalKind(ABC):
    """One registered teacher-signal kind. `params` is the kind's hashable request value (for
    example a tuple of layer indices); registration instantiates the class, so a missing
    abstract method fails there. Kinds stored as 16-bit arrays subclass `ArraySignalKind`."""

    name: str = ""
    grammar: str = ""          # its `--signals` item, for error messages
    builtin: bool = False      # its request is a field of SignalRequest, not an `extra` entry

    # ------------------------------------------------------------------ request
    def requested(self, request: SignalRequest) -> Any:
        """This kind's params in `request`, None when it is not asked for."""
        return dict(request.extra).get(self.name)

    def request_fields(self, params: Any) -> dict[str, Any]:
        """SignalRequest fields of a built-in kind's params."""
        raise NotImplementedError(f"{self.name} is not a built-in kind")

    @abstractmethod
    def parse_item(self, args: list[str], item: str, default: Any = None) -> Any:
        """`--signals` item `name:arg:arg` -> params (`default`: what a bare item means);
        raises ValueError naming the problem."""

    @abstractmethod
    def canonical(self, params: Any) -> str:
        """The item text for `params` (part of a cache's identity)."""

    @abstractmethod
    def merge(self, values: list[Any]) -> Any:
        """One request covering all of `values` (one cache serves every method)."""

    def config_default(self, params: Any, distill: Any) -> Any:
        """What a cache built from the config holds of this kind, given the methods' merged
        params (None: none asks for it) and the config's `distill` section."""
        return params

    def problem(self, params: Any, ctx: CacheContext) -> str | None:
        """Why `params` cannot be cached for this teacher and cache (an error line), or None."""
        return None

    # ------------------------------------------------------------------ the teacher's forward
    def needs_hidden_states(self, params: Any) -> bool:
        """Whether the forward must return every layer's hidden states."""
        return False

    @contextlib.contextmanager
    def capture(self, model: nn.Module, params: Any) -> Iterator[dict[str, Any]]:
        """Active around the teacher's forward (hooks); yields what `answer` reads."""
        yield {}

    @abstractmethod
    def answer(self, captured: dict[str, Any], params: Any, fwd: TeacherForward) -> Any:
        """The signal's value from one online teacher forward."""

    def put(self, sig: TeacherSignals, value: Any) -> None:
        """Store a value (online or from a cache) in the answer a method reads."""
        sig.extra[self.name] = value

    # ------------------------------------------------------------------ the cache
    def uses_dtype16(self, params: Any) -> bool:
        """Whether its columns hold 16-bit floats (the cache then fixes that dtype)."""
        return False

    @abstractmethod
    def column_names(self, params: Any) -> list[str]:
        """Cache columns of `params`."""

    @abstractmethod
    def columns(self, params: Any, ctx: CacheContext) -> dict[str, dict[str, Any]]:
        """Manifest description of each of its columns (layout, codec)."""

    def describe(self, params: Any, ctx: CacheContext) -> dict[str, Any]:
        """A built-in kind's entries of the manifest's `signals` section (params None: the
        cache does not hold it)."""
        return {}

    @abstractmethod
    def cache_value(self, captured: dict[str, Any], params: Any, fwd: TeacherForward,
                    ctx: CacheContext) -> Any:
        """The value as the cache stores it, still on the teacher's device."""

    @abstractmethod
    def stage(self, value: Any, params: Any, ctx: CacheContext) -> dict[str, Staged]:
        """Device side of encoding a cache value: host arrays per column."""

    @abstractmethod
    def decode(self, cells: dict[str, list[Any]], params: Any, ctx: CacheContext) -> Any:
        """The value from its columns' cells of some rows (inverse of `stage`)."""

    def missing(self, params: Any, ctx: CacheContext) -> list[str]:
        """What of `params` a cache with this manifest lacks (one phrase each)."""
        if any(c not in ctx.columns for c in self.column_names(params)):
            return [f"{self.canonical(params)} ({self.name})"]
        return []


SIGNALS: dict[str, SignalKind] = {}


def register_signal(cls: type[SignalKind]) -> type[SignalKind]:
    """Class decorator: one instance of the kind becomes available under `cls.name`."""
    if not cls.name or cls.name in SIGNALS:
        raise ValueError(f"signal kind {cls.name!r}: empty or registered twice")
    SIGNALS[cls.name] = cls()
    return cls


# ------------------------------------------------------------------ top-k logits
@torch.no_grad()
def topk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  softcap: float | None, k: int, chunk_tokens: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, H] final hidden states -> (ids [N,K], log-probs [N,K], tail log-mass [N]).

    Logits are formed exactly as the online path forms them (`fused.TeacherHidden.take`): the
    final hidden state in the head's dtype through the head rows of the compared vocabulary,
    upcast to fp32, soft-capped where the model does, normalised over that vocabulary, in
    chunks of tokens (a 262k vocabulary never needs [tokens x vocab] at once). The tail is a
    logsumexp over the entries outside the top-k (not log(1 - sum)), so it stays accurate when
    it is tiny; it is -inf when K equals the vocabulary.
    """
    n = hidden.shape[0]
    ids = torch.empty(n, k, dtype=torch.long, device=hidden.device)
    lps = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
    tail = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for s in range(0, n, chunk_tokens):
        e = min(s + chunk_tokens, n)
        h = hidden[s:e].to(weight.device, weight.dtype)
        z = F.linear(h, weight, bias).float()
        if softcap:
            z = torch.tanh(z / softcap) * softcap
        # log-probs are z - logsumexp(z): three passes over the chunk's logits (logsumexp, topk,
        # logsumexp of the rest) and no [chunk x vocab] log-softmax copy.
        lse = torch.logsumexp(z, dim=-1)
        val, idx = z.topk(k, dim=-1)
        z.scatter_(-1, idx, float("-inf"))
        ids[s:e] = idx.to(ids.device)
        lps[s:e] = (val - lse[:, None]).to(lps.device)
        tail[s:e] = (torch.logsumexp(z, dim=-1) - lse).to(tail.device)
        del z
    return ids, lps, tail


def logit_softcap(model: nn.Module) -> float | None:
    return getattr(unwrap(model).config, "final_logit_softcapping", None)


@register_signal
class TopKLogits(SignalKind):
    """Teacher logits: online the final hidden state and the head (logits are formed chunk by
    chunk inside the fused loss), cached the top-k log-probs with the tail mass. params: k
    (0: a method asking for logits, any k)."""

    name = "topk"
    grammar = "topk[:K]"
    builtin = True

    def requested(self, request: SignalRequest) -> int | None:
        return request.topk if request.topk is not None else (0 if request.logits else None)

    def request_fields(self, params: int) -> dict[str, Any]:
        return {"logits": True, "topk": params or None}

    def parse_item(self, args: list[str], item: str, default: Any = None) -> int:
        if len(args) > 1:
            raise ValueError("expected topk or topk:K")
        return _positive(args[0]) if args else int(default)

    def canonical(self, params: int) -> str:
        return f"topk:{params}" if params else "topk"

    def merge(self, values: list[int]) -> int:
        return max(values)

    def config_default(self, params: int | None, distill: Any) -> int | None:
        return None if params is None else distill.cache_top_k

    def problem(self, params: int, ctx: CacheContext) -> str | None:
        if params > ctx.vocab:
            return f"topk k={params} exceeds the vocabulary ({ctx.vocab} tokens)"
        return None

    def answer(self, captured: dict[str, Any], params: int, fwd: TeacherForward) -> tuple:
        return (fwd.last_hidden, unwrap(fwd.model).get_output_embeddings(),
                logit_softcap(fwd.model))

    def put(self, sig: TeacherSignals, value: Any) -> None:
        if isinstance(value, TopKTeacher):
            sig.topk = value
        else:
            sig.last_hidden, sig.head, sig.softcap = value

    def column_names(self, params: int) -> list[str]:
        return list(TOPK_COLUMNS)

    def columns(self, params: int, ctx: CacheContext) -> dict[str, dict[str, Any]]:
        return enc.topk_columns(ctx.encoding, ctx.seq_len, params, ctx.vocab)

    def describe(self, params: int | None, ctx: CacheContext) -> dict[str, Any]:
        return {"topk": None if params is None else {"k": params}}

    def cache_value(self, captured: dict[str, Any], params: int, fwd: TeacherForward,
                    ctx: CacheContext) -> TopKTeacher:
        last = fwd.last_hidden
        b, seq = last.shape[:2]
        head = unwrap(fwd.model).get_output_embeddings()
        bias = getattr(head, "bias", None)
        ids, lps, tail = topk_logprobs(last.reshape(b * seq, -1), head.weight[:ctx.vocab],
                                       None if bias is None else bias[:ctx.vocab],
                                       logit_softcap(fwd.model), params, ctx.chunk_tokens)
        return TopKTeacher(ids.view(b, seq, -1), lps.view(b, seq, -1), tail.view(b, seq))

    def stage(self, value: TopKTeacher, params: int, ctx: CacheContext) -> dict[str, Staged]:
        return enc.stage_topk(ctx.encoding, value.ids, value.logprobs, value.tail_logprob,
                              ctx.vocab, id_rank=ctx.id_rank)

    def decode(self, cells: dict[str, list[Any]], params: int, ctx: CacheContext
               ) -> TopKTeacher:
        return enc.decode_topk(ctx.encoding, ctx.columns, {k: cells[k] for k in TOPK_COLUMNS},
                               ctx.id_order, ctx.device)

    def missing(self, params: int, ctx: CacheContext) -> list[str]:
        return [] if ctx.signals.get("topk") else ["top-k logits (topk)"]


# ------------------------------------------------------------------ hidden states
HIDDEN_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "float16": "float16",
                 "bfloat16": "bfloat16"}


def hidden_positions(seq_len: int, stride: int) -> torch.Tensor:
    """Positions whose hidden states are stored: 0, stride, 2*stride, ..."""
    return torch.arange(0, seq_len, stride)


@register_signal
class HiddenStates(SignalKind):
    """Hidden states of chosen layers (HF hidden_states index, 0 = embeddings), for feature KD.
    params: (layers, dtype, stride); a cache stores 16-bit floats of every stride-th position.
    Value: ({layer: [B, P, Ht]}, stride)."""

    name = "hidden"
    grammar = "hidden:L[:L...][:fp16|:bf16][:stride=S]"
    builtin = True

    def requested(self, request: SignalRequest) -> tuple | None:
        if not request.hidden_layers:
            return None
        return (request.hidden_layers, request.hidden_dtype, request.hidden_stride)

    def request_fields(self, params: tuple) -> dict[str, Any]:
        layers, dtype, stride = params
        return {"hidden_layers": layers, "hidden_dtype": dtype, "hidden_stride": stride}

    def parse_item(self, args: list[str], item: str, default: Any = None) -> tuple:
        if not args:
            raise ValueError("name at least one layer, e.g. hidden:2:4 (HF hidden_states "
                             "index, 0 = embeddings)")
        layers: set[int] = set()
        dtype, stride = None, 1
        for a in args:
            if a in HIDDEN_DTYPES:
                dtype = HIDDEN_DTYPES[a]
            elif a.startswith("stride="):
                stride = _positive(a[len("stride="):])
            elif re.fullmatch(r"\d+", a):
                layers.add(int(a))
            else:
                raise ValueError(f"{a!r} is not a layer index, fp16, bf16 or stride=S")
        if not layers:
            raise ValueError("no layer index given")
        return (tuple(sorted(layers)), dtype, stride)

    def canonical(self, params: tuple) -> str:
        layers, dtype, stride = params
        h = "hidden:" + ":".join(str(i) for i in layers)
        if dtype:
            h += ":" + ("bf16" if dtype == "bfloat16" else "fp16")
        if stride > 1:
            h += f":stride={stride}"
        return h

    def merge(self, values: list[tuple]) -> tuple:
        return (tuple(sorted({i for v in values for i in v[0]})), values[0][1], values[0][2])

    def config_default(self, params: tuple | None, distill: Any) -> tuple | None:
        layers = set(distill.cache_hidden_layers) or set(params[0] if params else ())
        return (tuple(sorted(layers)), None, distill.cache_hidden_stride) if layers else None

    def problem(self, params: tuple, ctx: CacheContext) -> str | None:
        layers, _, stride = params
        n = int(ctx.teacher_conf.num_hidden_layers)
        bad = [i for i in layers if not 0 <= i <= n]
        if bad:
            return (f"hidden layers {bad} out of range: the teacher has {n} layers, so its "
                    f"hidden-state indices are 0..{n}")
        if stride > ctx.seq_len:
            return f"hidden stride {stride} exceeds seq_len {ctx.seq_len}"
        return None

    def needs_hidden_states(self, params: tuple) -> bool:
        return True

    def answer(self, captured: dict[str, Any], params: tuple, fwd: TeacherForward) -> tuple:
        assert fwd.hidden_states is not None
        return {i: fwd.hidden_states[i] for i in params[0]}, 1

    def put(self, sig: TeacherSignals, value: tuple) -> None:
        sig.hidden, sig.hidden_stride = value

    def uses_dtype16(self, params: tuple) -> bool:
        return True

    def column_names(self, params: tuple) -> list[str]:
        return [hidden_column(i) for i in params[0]]

    def columns(self, params: tuple, ctx: CacheContext) -> dict[str, dict[str, Any]]:
        layers, _, stride = params
        shape = [len(hidden_positions(ctx.seq_len, stride)), int(ctx.teacher_conf.hidden_size)]
        return {hidden_column(i): {"values": ctx.dtype16, "shape": shape, "codec": _codec(ctx),
                                   "bytes": 2, "stride": stride} for i in layers}

    def describe(self, params: tuple | None, ctx: CacheContext) -> dict[str, Any]:
        if params is None:
            return {"hidden": None}
        layers, _, stride = params
        return {"hidden": {"layers": list(layers), "dtype": ctx.dtype16, "stride": stride,
                           "positions": len(hidden_positions(ctx.seq_len, stride))}}

    def cache_value(self, captured: dict[str, Any], params: tuple, fwd: TeacherForward,
                    ctx: CacheContext) -> tuple:
        layers, _, stride = params
        assert fwd.hidden_states is not None
        out = {}
        for i in layers:
            h = fwd.hidden_states[i]
            if stride > 1:
                h = h[:, hidden_positions(h.shape[1], stride).to(h.device)]
            out[i] = ctx.narrow(h, i)
        return out, stride

    def stage(self, value: tuple, params: tuple, ctx: CacheContext) -> dict[str, Staged]:
        return {hidden_column(i): enc.stage_hidden(ctx.encoding, h) for i, h in value[0].items()}

    def decode(self, cells: dict[str, list[Any]], params: tuple, ctx: CacheContext) -> tuple:
        stride = int((ctx.signals.get("hidden") or {}).get("stride", 1))
        return {i: ctx.decode16(cells, hidden_column(i)) for i in params[0]}, stride

    def missing(self, params: tuple, ctx: CacheContext) -> list[str]:
        have = set((ctx.signals.get("hidden") or {}).get("layers", []))
        lacking = sorted(set(params[0]) - have)
        return [f"hidden states of layers {lacking}"] if lacking else []


# ------------------------------------------------------------------ pooled embeddings
POOLINGS = ("mean", "last")


@register_signal
class PooledEmbeddings(SignalKind):
    """Pooled final hidden state per row (fp32), for relation KD. params: poolings in
    POOLINGS order. Value: {"mean"|"last": [B, Ht]}."""

    name = "pooled"
    grammar = "pooled[:mean][:last]"
    builtin = True

    def requested(self, request: SignalRequest) -> tuple[str, ...] | None:
        return request.pooled or None

    def request_fields(self, params: tuple[str, ...]) -> dict[str, Any]:
        return {"pooled": params}

    def parse_item(self, args: list[str], item: str, default: Any = None) -> tuple[str, ...]:
        for a in args:
            if a not in POOLINGS:
                raise ValueError(f"pooling {a!r} unknown; expected {' or '.join(POOLINGS)}")
        return self.merge([tuple(args) or tuple(default or ("mean",))])

    def canonical(self, params: tuple[str, ...]) -> str:
        return "pooled:" + ":".join(params)

    def merge(self, values: list[tuple[str, ...]]) -> tuple[str, ...]:
        return tuple(sorted({how for v in values for how in v}, key=POOLINGS.index))

    def config_default(self, params: tuple[str, ...] | None, distill: Any
                       ) -> tuple[str, ...] | None:
        return params or (("mean",) if distill.cache_pooled else None)

    def answer(self, captured: dict[str, Any], params: tuple[str, ...],
               fwd: TeacherForward) -> dict[str, torch.Tensor]:
        return {how: pool(fwd.last_hidden, how) for how in params}

    def put(self, sig: TeacherSignals, value: dict[str, torch.Tensor]) -> None:
        sig.pooled.update(value)

    def column_names(self, params: tuple[str, ...]) -> list[str]:
        return [pooled_column(how) for how in params]

    def columns(self, params: tuple[str, ...], ctx: CacheContext) -> dict[str, dict[str, Any]]:
        hsz = int(ctx.teacher_conf.hidden_size)
        return {pooled_column(how): {"values": "float32", "shape": [hsz], "codec": "le",
                                     "pooling": how} for how in params}

    def describe(self, params: tuple[str, ...] | None, ctx: CacheContext) -> dict[str, Any]:
        return {"pooled": list(params or ())}

    def cache_value(self, captured: dict[str, Any], params: tuple[str, ...],
                    fwd: TeacherForward, ctx: CacheContext) -> dict[str, torch.Tensor]:
        return self.answer(captured, params, fwd)

    def stage(self, value: dict[str, torch.Tensor], params: tuple[str, ...],
              ctx: CacheContext) -> dict[str, Staged]:
        return {pooled_column(how): enc.stage_f32(p) for how, p in value.items()}

    def decode(self, cells: dict[str, list[Any]], params: tuple[str, ...],
               ctx: CacheContext) -> dict[str, torch.Tensor]:
        return {how: enc.decode_f32(cells[pooled_column(how)],
                                    int(ctx.columns[pooled_column(how)]["shape"][0]), ctx.device)
                for how in params}

    def missing(self, params: tuple[str, ...], ctx: CacheContext) -> list[str]:
        return [f"{how}-pooled embeddings" for how in params
                if how not in ctx.signals.get("pooled", [])]


def _positive(text: str) -> int:
    if not re.fullmatch(r"\d+", text or "") or int(text) <= 0:
        raise ValueError(f"{text!r} must be a positive integer")
    return int(text)


def _codec(ctx: CacheContext) -> str:
    return "le" if ctx.encoding == "raw" else "planes"


# ------------------------------------------------------------------ 16-bit array kinds
class ArraySignalKind(SignalKind):
    """A kind whose cache columns each hold one 16-bit float array per row (stored like hidden
    states): it names its columns, their shapes and how a value splits into them; the rest
    of the kind follows."""

    @abstractmethod
    def parse(self, args: list[str], item: str) -> Any:
        """`--signals` item `name:arg:arg` -> params; raises ValueError naming the item."""

    def check(self, params: Any, teacher_conf: Any) -> str | None:
        """A problem of `params` for a teacher of this HF config, else None."""
        return None

    @abstractmethod
    def online(self, captured: dict[str, Any], params: Any) -> Any:
        """The signal's value from one teacher forward (goes to TeacherSignals.extra)."""

    @abstractmethod
    def column_shape(self, column: str, seq_len: int, teacher_conf: Any) -> list[int]:
        """Per-row shape of one of its columns, for a teacher of this HF config."""

    @abstractmethod
    def to_columns(self, value: Any, params: Any) -> dict[str, torch.Tensor]:
        """Value -> {column: [B, *shape] tensor} (the cache narrows them to 16 bits)."""

    @abstractmethod
    def from_columns(self, arrays: dict[str, torch.Tensor], params: Any) -> Any:
        """Inverse of `to_columns`, on decoded arrays of some rows."""

    def parse_item(self, args: list[str], item: str, default: Any = None) -> Any:
        return self.parse(args, item)

    def problem(self, params: Any, ctx: CacheContext) -> str | None:
        found = self.check(params, ctx.teacher_conf)
        return f"--signals {self.canonical(params)}: {found}" if found else None

    def answer(self, captured: dict[str, Any], params: Any, fwd: TeacherForward) -> Any:
        return self.online(captured, params)

    def uses_dtype16(self, params: Any) -> bool:
        return True

    def columns(self, params: Any, ctx: CacheContext) -> dict[str, dict[str, Any]]:
        return {col: {"values": ctx.dtype16, "codec": _codec(ctx), "bytes": 2,
                      "shape": self.column_shape(col, ctx.seq_len, ctx.teacher_conf),
                      "signal": self.name} for col in self.column_names(params)}

    def cache_value(self, captured: dict[str, Any], params: Any, fwd: TeacherForward,
                    ctx: CacheContext) -> Any:
        columns = self.to_columns(self.online(captured, params), params)
        return self.from_columns({c: ctx.narrow(t, c) for c, t in columns.items()}, params)

    def stage(self, value: Any, params: Any, ctx: CacheContext) -> dict[str, Staged]:
        return {c: enc.stage_hidden(ctx.encoding, t)
                for c, t in self.to_columns(value, params).items()}

    def decode(self, cells: dict[str, list[Any]], params: Any, ctx: CacheContext) -> Any:
        return self.from_columns({c: ctx.decode16(cells, c) for c in self.column_names(params)},
                                 params)


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
class AttentionProjections(ArraySignalKind):
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
