"""What a teacher cache holds: the `--signals` grammar and the defaults taken from the config.

    topk[:K]                       top-K token ids + log-probs under the full softmax + tail mass
    hidden:L[:L...][:fp16|:bf16][:stride=S]
                                   hidden states of layers L (HF hidden_states index, 0 =
                                   embeddings), every S-th position only when stride > 1
    pooled[:mean][:last]           pooled final hidden state per row (fp32)
    <kind>[:...]                   a signal kind registered in distill/signals.py (its own
                                   grammar, e.g. qkv:L)

Without `--signals` the config decides (one cache serves every method of the experiment):
what each method declares it needs (`get_method(mode).signals(method)`, distill/methods/),
counting only its losses of weight > 0: top-k (k = distill.cache_top_k) for teacher logits;
hidden layers = distill.cache_hidden_layers, else the layers the methods ask for; the
poolings the methods ask for (mean if distill.cache_pooled and none does).
"""

from __future__ import annotations

import re
from typing import Any

from wattkd.config import ExperimentConfig
from wattkd.distill.methods import get_method
from wattkd.distill.signals import SIGNALS, SignalRequest, merge_extra
from wattkd.errors import InputError

__all__ = [
    "DEFAULT_ENCODING",
    "ENCODINGS",
    "HIDDEN_DTYPES",
    "CacheSpec",
    "SpecError",
    "default_spec",
    "parse_signals",
    "resolve_spec",
]

ENCODINGS = ("raw", "fp16", "packed")
DEFAULT_ENCODING = SignalRequest.encoding
HIDDEN_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "float16": "float16",
                 "bfloat16": "bfloat16"}
POOLINGS = ("mean", "last")
GRAMMAR = ("topk[:K], hidden:L[:L...][:fp16|:bf16][:stride=S], pooled[:mean][:last]"
           "{extra} (comma-separated, e.g. 'topk:64,hidden:2:4,pooled')")


def _grammar() -> str:
    return GRAMMAR.format(extra="".join(f", {k.grammar}" for k in SIGNALS.values()))


class SpecError(InputError, ValueError):
    """A `--signals` string or a cache request that cannot be satisfied."""


CacheSpec = SignalRequest   # a cache's contents are a request with its storage fields


def parse_signals(text: str, *, default_k: int, default_pooled: tuple[str, ...] = ("mean",),
                  encoding: str = DEFAULT_ENCODING) -> SignalRequest:
    """Parse a `--signals` string; every problem names the item and the expected grammar."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"--signals must not be empty; expected {_grammar()}")
    topk: int | None = None
    layers: set[int] = set()
    dtype: str | None = None
    stride = 1
    pooled: list[str] = []
    extra: dict[str, Any] = {}
    seen: set[str] = set()
    for raw in text.split(","):
        item = raw.strip()
        name, *args = item.split(":")
        if name in seen:
            raise SpecError(f"--signals {text!r}: {name!r} given twice")
        seen.add(name)
        if name == "topk":
            if len(args) > 1:
                raise SpecError(f"--signals item {item!r}: expected topk or topk:K")
            topk = _positive_int(args[0], item) if args else default_k
        elif name == "hidden":
            if not args:
                raise SpecError(f"--signals item {item!r}: name at least one layer, e.g. "
                                "hidden:2:4 (HF hidden_states index, 0 = embeddings)")
            for a in args:
                if a in HIDDEN_DTYPES:
                    dtype = HIDDEN_DTYPES[a]
                elif a.startswith("stride="):
                    stride = _positive_int(a[len("stride="):], item)
                elif re.fullmatch(r"\d+", a):
                    layers.add(int(a))
                else:
                    raise SpecError(f"--signals item {item!r}: {a!r} is not a layer index, "
                                    "fp16, bf16 or stride=S")
            if not layers:
                raise SpecError(f"--signals item {item!r}: no layer index given")
        elif name == "pooled":
            for a in args:
                if a not in POOLINGS:
                    raise SpecError(f"--signals item {item!r}: pooling {a!r} unknown; "
                                    f"expected {' or '.join(POOLINGS)}")
            pooled = sorted(set(args) or set(default_pooled), key=POOLINGS.index)
        elif name in SIGNALS:
            try:
                extra[name] = SIGNALS[name].parse(args, item)
            except ValueError as exc:
                raise SpecError(f"--signals item {item!r}: {exc}; expected "
                                f"{SIGNALS[name].grammar}") from None
        else:
            raise SpecError(f"--signals item {item!r}: unknown signal {name!r}; "
                            f"expected {_grammar()}")
    return SignalRequest(topk=topk, hidden_layers=tuple(sorted(layers)), hidden_dtype=dtype,
                     hidden_stride=stride, pooled=tuple(pooled), encoding=_encoding(encoding),
                     extra=tuple(sorted(extra.items())))


def default_spec(cfg: ExperimentConfig, encoding: str = DEFAULT_ENCODING) -> SignalRequest:
    """The signals the config's methods need (see module docstring)."""
    d = cfg.distill
    requests = [get_method(m.mode).signals(
        m.model_copy(update={"losses": [t for t in m.losses if t.weight > 0]}))
        for m in d.methods]
    layers = set(d.cache_hidden_layers) or {i for r in requests for i in r.hidden_layers}
    pooled = {how for r in requests for how in r.pooled}
    if d.cache_pooled and not pooled:
        pooled = {"mean"}
    return SignalRequest(topk=d.cache_top_k if any(r.logits for r in requests) else None,
                     hidden_layers=tuple(sorted(layers)),
                     hidden_stride=d.cache_hidden_stride if layers else 1,
                     pooled=tuple(sorted(pooled, key=POOLINGS.index)),
                     encoding=_encoding(encoding), extra=merge_extra(requests))


def resolve_spec(cfg: ExperimentConfig, signals: str | None,
                 encoding: str | None = None) -> SignalRequest:
    """`--signals` when given, else the config's defaults; refuses an empty request.

    Encoding: the argument, else `distill.cache_encoding` where the config has it, else packed.
    """
    enc = encoding or getattr(cfg.distill, "cache_encoding", None) or DEFAULT_ENCODING
    if signals is None:
        spec = default_spec(cfg, enc)
        if spec.empty:
            raise SpecError("nothing to cache: no method of this config needs teacher signals "
                            "(no logit loss with a teacher, no feature or relation method); "
                            f"pass --signals {_grammar()}")
        return spec
    pooled = tuple(sorted({p for m in cfg.distill.methods
                           for p in get_method(m.mode).signals(m).pooled} or {"mean"},
                          key=POOLINGS.index))
    return parse_signals(signals, default_k=cfg.distill.cache_top_k, default_pooled=pooled,
                         encoding=enc)


def _positive_int(text: str, item: str) -> int:
    if not re.fullmatch(r"\d+", text or "") or int(text) <= 0:
        raise SpecError(f"--signals item {item!r}: {text!r} must be a positive integer")
    return int(text)


def _encoding(name: str) -> str:
    if name not in ENCODINGS:
        raise SpecError(f"cache encoding {name!r} unknown; expected one of {', '.join(ENCODINGS)}")
    return name
