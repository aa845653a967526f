"""Method registry: a KD method (a config's `method:`) declared in one place, its own file.

`@register_method(name, ...)` on the method's nn.Module says everything the rest of wattkd
asks about a method: the loss kinds it accepts, the teacher signals it needs
(`cls.signals(method)`), its checks (`cls.validate` at config load, `cls.check_models` on the
model configs before weights load, `min_batch`), whether the divergence guard watches it,
and how the report shows it (kind, order, colour). This module imports none of the methods;
The first question asked imports every module of the `wattkd.distill.methods` package, which
fills the registry: a new method is one new file there, listed nowhere else.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from wattkd.distill.registry import LOSSES, check_params

__all__ = ["METHODS", "MethodSpec", "check_loss_term", "check_method", "get_method",
           "known_methods",
           "register_method", "report_colours", "report_kinds", "report_order"]


@dataclass(frozen=True)
class MethodSpec:
    name: str                                   # the config's `method:` value
    cls: type                                   # nn.Module; `cls.build(method, student, dims)`
    loss_kinds: frozenset[str]                  # loss kinds it accepts ("ce" always allowed)
    needs_teacher: bool = True
    params: type[BaseModel] | None = None     # schema of the method's `params:` (pydantic)
    guard: bool = False         # the divergence guard watches it when it has no ce term
    kind: str = ""              # report group (runs of one kind share colour and order)
    order: int = 5              # report order of the kind
    colour: str | None = None   # report colour of the kind

    def signals(self, method: Any) -> Any:
        """The teacher signals (`SignalRequest`) that `method` needs."""
        return self.cls.signals(method)

    def min_batch(self, method: Any) -> int:
        fn = getattr(self.cls, "min_batch", None)
        return 0 if fn is None else int(fn(method))

    def check_models(self, method: Any, student_conf: Any, teacher_conf: Any) -> None:
        """Model-dependent checks (layers, widths) on HF configs; raises ModelError."""
        fn = getattr(self.cls, "check_models", None)
        if fn is not None:
            fn(method, student_conf, teacher_conf)


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, *, loss_kinds: set[str], needs_teacher: bool = True,
                    params: type[BaseModel] | None = None, guard: bool = False, kind: str | None = None, order: int = 5,
                    colour: str | None = None) -> Callable[[type], type]:
    """Class decorator: register a method's module under its `method:` name."""

    def wrap(cls: type) -> type:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = MethodSpec(name, cls, frozenset(loss_kinds), needs_teacher, params,
                                   guard, kind or name, order, colour)
        return cls

    return wrap


def known_methods() -> list[str]:
    _ensure_loaded()
    return list(METHODS)


def get_method(name: str) -> MethodSpec:
    _ensure_loaded()
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; expected one of: {', '.join(METHODS)}") from None


def check_method(method: Any, cfg: Any = None) -> list[str]:
    """Problems of one configured method (method name, params, the method's own checks)."""
    _ensure_loaded()
    spec = METHODS.get(method.method)
    if spec is None:
        return [f"method: unknown method {method.method!r}; expected one of: {', '.join(METHODS)}"]
    problems = []
    if spec.params is None:
        if method.params:
            problems.append(f"params: method {spec.name!r} takes no params, got "
                            f"{sorted(method.params)}")
    else:
        try:
            spec.params.model_validate(method.params)
        except ValidationError as exc:
            for err in exc.errors():
                key = ".".join(str(p) for p in err["loc"])
                problems.append(f"params.{key}: {err['msg']}" + (
                    "" if isinstance(err.get("input"), dict) else f" (got {err.get('input')!r})"))
    validate = getattr(spec.cls, "validate", None)
    if not problems and validate is not None:
        problems += validate(method, cfg)
    return problems


def check_loss_term(name: str, params: dict[str, Any], method: str) -> str | None:
    """Return a message if loss `name` with `params` cannot be used in method `method`, else
    None: the method says which loss kinds it accepts (ce: every method), the loss registry
    checks the params."""
    spec = LOSSES.get(name)
    if spec is None:
        return f"unknown loss {name!r}; expected one of: {', '.join(sorted(LOSSES))}"
    if method not in known_methods():
        return f"unknown method {method!r}; expected one of: {', '.join(METHODS)}"
    kinds = METHODS[method].loss_kinds
    if spec.kind not in kinds and name != "ce":
        return (f"loss {name!r} is a {spec.kind} loss; method {method!r} accepts "
                f"{', '.join(sorted(kinds)) or 'only ce'} losses")
    return check_params(spec, params)


def method_params(method: Any) -> Any:
    """The method's `params:` as its declared schema (defaults filled in)."""
    spec = get_method(method.method)
    if spec.params is None:
        raise ValueError(f"method {spec.name!r} declares no params")
    return spec.params.model_validate(method.params)


# ---------------------------------------------------------------------------- report
def report_kinds() -> dict[str, str]:
    """run.json `mode` -> report kind ("baseline" is the name old run.json files carry)."""
    _ensure_loaded()
    return {**{s.name: s.kind for s in METHODS.values()}, "baseline": "baseline"}


def report_order() -> dict[str, int]:
    _ensure_loaded()
    return {**{s.kind: s.order for s in METHODS.values()}, "teacher": 9}


def report_colours() -> dict[str, str]:
    _ensure_loaded()
    return {**{s.kind: s.colour for s in METHODS.values() if s.colour}, "teacher": "#000000"}


def _ensure_loaded() -> None:
    """Import every method file of this package once (each registers itself). Done on first
    use, not at import: method files import the config schema, which imports this module."""
    if _LOADED:
        return
    package = __name__.rpartition(".")[0]
    path = importlib.import_module(package).__path__
    for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        if info.name != "registry":
            importlib.import_module(f"{package}.{info.name}")
    _LOADED.append(True)


_LOADED: list[bool] = []
