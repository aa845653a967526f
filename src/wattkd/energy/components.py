"""The energy components, declared once: what each is called, whether it adds to the total or
already contains others, and where it is shown.

Every reader of energy (the ledger and `EnergyMeter.energy_j()` behind energy budgets, the
readers in `energy.metrics` / `energy.recovery`, EPT, teacher-cache amortisation, the report)
asks this module which components a record holds and how they add up, instead of keeping its
own list. A source that meters a new kind of component declares it (`EnergySource.DECLARES`,
registered with the source), e.g. a node power meter:

    NODE = Component("node", "Node", contains=("gpu", "cpu", "dram"), rank=1)

`contains`: the components whose energy this one already includes (a node meter sees the GPUs,
CPUs and DRAM): where both are measured, the total counts only the container, so nothing is
counted twice. The core components (`CORE`) are keys of every ledger record (null when not
measured: the phases.jsonl schema); any other component appears in a record only when a
source of that session measures it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CORE",
    "Component",
    "additive",
    "basis_order",
    "check",
    "component",
    "components",
    "components_of",
    "label_of",
    "record_components",
    "register_component",
    "shown",
    "total_j",
]


@dataclass(frozen=True)
class Component:
    """One energy component of the ledger schema.

    `label`: in words for tables ("GPU"); `contains`: components already inside its figure;
    `always_shown`: per-component outputs (EPT rows, report columns) list it even when no
    source measures it (a null that says "unavailable"), others only when measured; `rank`:
    its place as the report's energy basis (lowest measured wins; None: never the basis)."""

    name: str
    label: str
    contains: tuple[str, ...] = ()
    always_shown: bool = False
    rank: int | None = None


_REGISTRY: dict[str, Component] = {}


def register_component(comp: Component) -> Component:
    """Make a component known (idempotent for an equal declaration; a clash is refused)."""
    if not isinstance(comp, Component):
        raise TypeError(f"register_component needs a Component, got {comp!r}")
    if not comp.name or not comp.name.isidentifier():
        raise ValueError(f"component name {comp.name!r} must be a short identifier")
    old = _REGISTRY.get(comp.name)
    if old is not None and old != comp:
        raise ValueError(f"energy component {comp.name!r} is already declared as {old}")
    if comp.name in comp.contains:
        raise ValueError(f"component {comp.name!r} cannot contain itself")
    _REGISTRY[comp.name] = comp
    return comp


GPU = register_component(Component("gpu", "GPU", always_shown=True, rank=0))
CPU = register_component(Component("cpu", "CPU", always_shown=True, rank=2))
DRAM = register_component(Component("dram", "DRAM"))
# keys of every ledger record's energy_j / source / uncertainty_j (the phases.jsonl schema)
CORE: tuple[str, ...] = ("gpu", "cpu", "dram")


def components() -> tuple[str, ...]:
    """Every declared component, core first, then in declaration order."""
    return tuple(_REGISTRY)


def component(name: str) -> Component:
    """The declaration of `name`; a name written by a source this install does not know reads
    as an uncontained component shown only when measured."""
    return _REGISTRY.get(name) or Component(name, name.upper())


def label_of(name: str) -> str:
    return component(name).label


def check(name: str) -> str:
    """`name` if declared, else ValueError naming the declared ones."""
    if name not in _REGISTRY:
        raise ValueError(f"component must be one of {components()}, got {name!r}")
    return name


def components_of(*records: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The components some record holds (its energy_j / source keys), core first, in
    declaration order; the core when no record says."""
    seen: set[str] = set()
    for rec in records:
        for key in ("energy_j", "source"):
            part = (rec or {}).get(key)
            if isinstance(part, Mapping):
                seen.update(str(k) for k in part)
    if not seen:
        return CORE
    known = [c for c in components() if c in seen or c in CORE]
    return tuple(known + sorted(seen - set(known)))


def record_components(measured: Iterable[str]) -> tuple[str, ...]:
    """The keys a new ledger record carries: the core, plus every other measured component."""
    extra = set(measured) - set(CORE)
    return CORE + tuple(c for c in components() if c in extra) + tuple(
        sorted(extra - set(components())))


def shown(name: str, measured: bool) -> bool:
    """Whether a per-component output lists `name` (always, or only when measured)."""
    return component(name).always_shown or measured


def additive(measured: Iterable[str]) -> list[str]:
    """The measured components that add up to the total: those not inside another measured
    component (a node meter's GPU, CPU and DRAM are already in its figure)."""
    have = list(dict.fromkeys(measured))
    inside = {c for m in have for c in component(m).contains}
    return [c for c in have if c not in inside]


def total_j(energy: Mapping[str, float | None]) -> float | None:
    """Total energy of one figure per component, nothing counted twice; None: none measured."""
    parts = additive(c for c, v in energy.items() if v is not None)
    return float(sum(float(energy[c]) for c in parts)) if parts else None  # type: ignore[arg-type]


def basis_order(names: Iterable[str]) -> list[str]:
    """The components that may be the report's energy basis, preferred first."""
    ranked = [(component(n).rank, n) for n in dict.fromkeys(names)]
    return [n for r, n in sorted((r, n) for r, n in ranked if r is not None)]
