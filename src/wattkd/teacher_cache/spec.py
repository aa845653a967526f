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

from typing import Any

from wattkd.config import ExperimentConfig
from wattkd.distill.methods import get_method
from wattkd.distill.signals import HIDDEN_DTYPES, POOLINGS, SIGNALS, SignalRequest
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


def _grammar() -> str:
    return (", ".join(k.grammar for k in SIGNALS.values())
            + " (comma-separated, e.g. 'topk:64,hidden:2:4,pooled')")


class SpecError(InputError, ValueError):
    """A `--signals` string or a cache request that cannot be satisfied."""


CacheSpec = SignalRequest   # a cache's contents are a request with its storage fields


def parse_signals(text: str, *, default_k: int, default_pooled: tuple[str, ...] = ("mean",),
                  encoding: str = DEFAULT_ENCODING) -> SignalRequest:
    """Parse a `--signals` string; every problem names the item and the expected grammar."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"--signals must not be empty; expected {_grammar()}")
    defaults = {"topk": default_k, "pooled": default_pooled}
    chosen: dict[str, Any] = {}
    for raw in text.split(","):
        item = raw.strip()
        name, *args = item.split(":")
        if name in chosen:
            raise SpecError(f"--signals {text!r}: {name!r} given twice")
        kind = SIGNALS.get(name)
        if kind is None:
            raise SpecError(f"--signals item {item!r}: unknown signal {name!r}; "
                            f"expected {_grammar()}")
        try:
            chosen[name] = kind.parse_item(args, item, defaults.get(name))
        except ValueError as exc:
            raise SpecError(f"--signals item {item!r}: {exc}; expected {kind.grammar}") from None
    return SignalRequest.of(chosen, encoding=_encoding(encoding))


def default_spec(cfg: ExperimentConfig, encoding: str = DEFAULT_ENCODING) -> SignalRequest:
    """The signals the config's methods need (see module docstring)."""
    d = cfg.distill
    requests = [get_method(m.method).signals(
        m.model_copy(update={"losses": [t for t in m.losses if t.weight > 0]}))
        for m in d.methods]
    wanted: dict[str, list[Any]] = {}
    for r in requests:
        for kind, params in r.kinds():
            wanted.setdefault(kind.name, []).append(params)
    chosen = {}
    for name, kind in SIGNALS.items():
        params = kind.config_default(kind.merge(wanted[name]) if name in wanted else None, d)
        if params is not None:
            chosen[name] = params
    return SignalRequest.of(chosen, encoding=_encoding(encoding))


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
                           for p in get_method(m.method).signals(m).pooled} or {"mean"},
                          key=POOLINGS.index))
    return parse_signals(signals, default_k=cfg.distill.cache_top_k, default_pooled=pooled,
                         encoding=enc)


def _encoding(name: str) -> str:
    if name not in ENCODINGS:
        raise SpecError(f"cache encoding {name!r} unknown; expected one of {', '.join(ENCODINGS)}")
    return name
