"""Loss registry: config names -> loss functions, so a new loss is one decorated function.

Each loss is a pure tensor function. Its keyword-only arguments with defaults are the
`params` a config may set; anything else is refused by `check_params` at config load
(methods/registry.check_loss_term adds which loss kinds a method accepts).
Value ranges (e.g. temperature > 0) are declared beside the function with `checks=`, so a bad
value is refused at config load too, not minutes into a run. A logit loss may also declare its
`closed_form` (value and gradient w.r.t. the logits), which distill/fused's fast path then uses
instead of autograd.

This module imports no loss: `wattkd.distill` (its __init__) imports the modules that register
them, so LOSSES is full whenever anything under wattkd.distill is imported.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

LossKind = Literal["logit", "feature", "relation"]

# A value check: (predicate, what is expected, in words).
Check = tuple[Callable[[Any], bool], str]
POSITIVE: Check = (lambda v: v > 0, "> 0")
UNIT_INTERVAL: Check = (lambda v: 0 <= v <= 1, "in [0, 1]")
HALF_OPEN_UNIT: Check = (lambda v: 0 <= v < 1, "in [0, 1)")


@dataclass(frozen=True)
class TeacherForm:
    """Closed form of a logit loss that compares student and teacher log-probs at the loss's
    `temperature` on one support (the vocabulary, or the top-k buckets and tail):
    ``pair(logq, logp, grad, **params) -> (value [N], d value / d(z / T) [N, S] or None)``
    with z the student's logits on that support and `params` the loss's other params (e.g.
    jsd's beta; defaults filled in). The loss takes `temperature` and `scale_by_t2` params;
    the caller applies T^2 and the chain rule through 1/T, softcaps and buckets."""

    pair: Callable[..., tuple[Any, Any]]


@dataclass(frozen=True)
class LabelForm:
    """Closed form of a logit loss scored against labels on the student's T=1 log-probs:
    ``value(logq1, labels, **params) -> [N]`` and ``grad(logq1, cols, labels, c, vocab,
    **params) -> c * d value / d z`` at columns `cols` ([1, V] = all, or [N, K] ids)."""

    value: Callable[..., Any]
    grad: Callable[..., Any]


ClosedForm = TeacherForm | LabelForm
TEACHER_FORM_PARAMS = ("temperature", "scale_by_t2")


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
    closed_form: ClosedForm | None = None   # logit losses: value + gradient for the fast path


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, kind: LossKind, needs_teacher: bool = True, *,
                  needs_labels: bool = False, checks: dict[str, Check] | None = None,
                  closed_form: ClosedForm | None = None):
    """Decorator: register `fn` under `name`; keyword-only defaults become its params.
    `closed_form` (logit losses only) must compute exactly what `fn` computes."""

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
        _check_form(name, kind, needs_teacher, needs_labels, params, closed_form)
        LOSSES[name] = LossSpec(name, fn, kind, needs_teacher, params, needs_labels,
                                dict(checks or {}), closed_form)
        return fn

    return wrap


def _check_form(name: str, kind: LossKind, needs_teacher: bool, needs_labels: bool,
                params: dict[str, Any], form: ClosedForm | None) -> None:
    """A closed form fits its loss: logit kind, and the inputs and params its shape assumes."""
    if form is None:
        return
    if kind != "logit":
        raise ValueError(f"loss {name!r}: only logit losses take a closed_form")
    if isinstance(form, TeacherForm):
        missing = [p for p in TEACHER_FORM_PARAMS if p not in params]
        if missing or not needs_teacher:
            raise ValueError(f"loss {name!r}: a TeacherForm needs a teacher and the params "
                             f"{list(TEACHER_FORM_PARAMS)}; missing {missing}")
    elif isinstance(form, LabelForm):
        if not needs_labels:
            raise ValueError(f"loss {name!r}: a LabelForm needs needs_labels=True")
    else:
        raise TypeError(f"loss {name!r}: closed_form must be a TeacherForm or LabelForm, got "
                        f"{type(form).__name__}")


def get_loss(name: str) -> LossSpec:
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


def resolve_terms(terms: Iterable[Any], kind: LossKind | None = None
                  ) -> list[tuple[LossSpec, float, dict[str, Any]]]:
    """Config `LossTerm`s (anything with name/weight/params) -> (spec, weight, params) tuples.

    `kind` keeps only that kind, so a mode can hand its logit terms to `fused_logit_loss` and
    its feature terms elsewhere. Params are validated here too (programmatic callers skip the
    config loader).
    """
    out = []
    for term in terms:
        spec = get_loss(term.name)
        msg = check_params(spec, dict(term.params))
        if msg:
            raise ValueError(msg)
        if kind is None or spec.kind == kind:
            out.append((spec, float(term.weight), dict(term.params)))
    return out

