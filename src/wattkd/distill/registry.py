"""Loss registry: config names -> loss functions, so a new loss is one decorated function.

Each loss is a pure tensor function. Its keyword-only arguments with defaults are the
`params` a config may set; anything else is refused by `check_loss_term` at config load.
Value ranges (e.g. temperature > 0) are declared beside the function with `checks=`, so a bad
value is refused at config load too, not minutes into a run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from wattkd.distill.methods.registry import METHODS, known_methods

LossKind = Literal["logit", "feature", "relation"]

# A value check: (predicate, what is expected, in words).
Check = tuple[Callable[[Any], bool], str]
POSITIVE: Check = (lambda v: v > 0, "> 0")
UNIT_INTERVAL: Check = (lambda v: 0 <= v <= 1, "in [0, 1]")
HALF_OPEN_UNIT: Check = (lambda v: 0 <= v < 1, "in [0, 1)")


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[..., Any]
    kind: LossKind
    needs_teacher: bool
    params: dict[str, Any] = field(default_factory=dict)  # name -> default
    # Logit losses scored against labels (ce): their mean counts only tokens whose label != -100.
    needs_labels: bool = False
    checks: dict[str, Check] = field(default_factory=dict)  # param -> value check


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, kind: LossKind, needs_teacher: bool = True, *,
                  needs_labels: bool = False, checks: dict[str, Check] | None = None):
    """Decorator: register `fn` under `name`; keyword-only defaults become its params."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        sig = inspect.signature(fn)
        params = {p.name: p.default for p in sig.parameters.values()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY
                  and p.default is not inspect.Parameter.empty}
        unknown = sorted(set(checks or {}) - set(params))
        if unknown:
            raise ValueError(f"loss {name!r}: checks for unknown params {unknown}")
        LOSSES[name] = LossSpec(name, fn, kind, needs_teacher, params, needs_labels,
                                dict(checks or {}))
        return fn

    return wrap


def get_loss(name: str) -> LossSpec:
    _ensure_loaded()
    try:
        return LOSSES[name]
    except KeyError:
        known = ", ".join(sorted(LOSSES))
        raise KeyError(f"unknown loss {name!r}; known losses: {known}") from None


def check_params(spec: LossSpec, params: dict[str, Any]) -> str | None:
    """Return a message if `params` are not valid for `spec` (names, types, ranges), else None."""
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        known = ", ".join(sorted(spec.params)) or "none"
        return f"loss {spec.name!r}: unknown params {unknown}; expected: {known}"
    for key, value in params.items():
        default = spec.params[key]
        if not _type_ok(default, value):
            return (f"loss {spec.name!r}: param {key!r} should be {type(default).__name__}, "
                    f"got {value!r}")
        check = spec.checks.get(key)
        if check is not None and value is not None and not check[0](value):
            return f"loss {spec.name!r}: param {key!r} must be {check[1]}, got {value!r}"
    return None


def _type_ok(default: Any, value: Any) -> bool:
    """Same type as the default; an int is fine for a float; a bool is never a number."""
    if default is None:
        return True
    if isinstance(value, bool) != isinstance(default, bool):
        return False
    if isinstance(default, float) and isinstance(value, int):
        return True
    return isinstance(value, type(default))


def check_loss_term(name: str, params: dict[str, Any], mode: str) -> str | None:
    """Return a message if `name`/`params` cannot be used in `mode`, else None."""
    _ensure_loaded()
    spec = LOSSES.get(name)
    if spec is None:
        return f"unknown loss {name!r}; expected one of: {', '.join(sorted(LOSSES))}"
    if mode not in known_methods():  # which loss kinds a mode accepts: distill/methods/
        return f"unknown mode {mode!r}; expected one of: {', '.join(METHODS)}"
    kinds = METHODS[mode].loss_kinds
    if spec.kind not in kinds and name != "ce":
        return (f"loss {name!r} is a {spec.kind} loss; mode {mode!r} accepts "
                f"{', '.join(sorted(kinds)) or 'only ce'} losses")
    return check_params(spec, params)


def resolve_terms(terms: Iterable[Any], kind: LossKind | None = None
                  ) -> list[tuple[LossSpec, float, dict[str, Any]]]:
    """Config `LossTerm`s (anything with name/weight/params) -> (spec, weight, params) tuples.

    `kind` keeps only that kind, so a mode can hand its logit terms to `fused_logit_loss` and
    its feature terms elsewhere. Params are validated here too (programmatic callers skip the
    config loader).
    """
    _ensure_loaded()
    out = []
    for term in terms:
        spec = get_loss(term.name)
        msg = check_params(spec, dict(term.params))
        if msg:
            raise ValueError(msg)
        if kind is None or spec.kind == kind:
            out.append((spec, float(term.weight), dict(term.params)))
    return out


def _ensure_loaded() -> None:
    # Importing the modules that define losses fills LOSSES.
    from wattkd.distill import losses  # noqa: F401
