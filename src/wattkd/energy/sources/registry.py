"""The registered energy sources and discovery: which of them this machine can read.

Like Zeus's one-GPU-interface-per-vendor, each source is one `EnergySource` subclass in its own
file of this package, decorated with `@register_source`; the package loads every file, so the
file is all the meter, sampler, ledger, readers, EPT and report need:

    @register_source
    class AmdSmiSource(EnergySource): ...

Order matters only for estimates: measured sources are opened first, and an `ESTIMATED` source
is skipped when a measured one already covers its components. A `CONFIGURED_ONLY` source (a
node meter read from a file or command) is opened only where `telemetry.sources.<LABEL>` sets
it up.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from wattkd.config import TelemetryConfig
from wattkd.energy.components import check, register_component
from wattkd.energy.source import Discovery, EnergySource
from wattkd.errors import ConfigError

log = logging.getLogger(__name__)

_TYPES: list[type[EnergySource]] = []


def register_source(cls: type[EnergySource]) -> type[EnergySource]:
    """Make a source class (and the components it declares) known to discovery and to the
    telemetry/ledger readers. Usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, EnergySource)):
        raise TypeError(f"register_source needs an EnergySource subclass, got {cls!r}")
    taken = {c.LABEL: c for c in _TYPES}
    if cls.LABEL in taken and taken[cls.LABEL] is not cls:
        raise ValueError(f"energy source label {cls.LABEL!r} is already registered by "
                         f"{taken[cls.LABEL].__name__}")
    for comp in cls.DECLARES:
        register_component(comp)
    for name in cls.COMPONENTS:
        try:
            check(name)
        except ValueError:
            raise ValueError(f"{cls.__name__}: component {name!r} is not in the ledger schema "
                             "(declare it in the source's DECLARES)") from None
    if cls not in _TYPES:
        _TYPES.append(cls)
    return cls


def unregister_source(cls: type[EnergySource]) -> None:
    """Forget a registered source class (tests that register a stand-in)."""
    if cls in _TYPES:
        _TYPES.remove(cls)


def source_types() -> list[type[EnergySource]]:
    """The registered source classes, measured before estimated (discovery order)."""
    return sorted(_TYPES, key=lambda c: (c.ESTIMATED, c.ORDER))


def source_class(label: str) -> type[EnergySource] | None:
    """The registered class whose records carry `label` (None: not a source label)."""
    return next((c for c in _TYPES if c.LABEL == label), None)


def check_options(cfg: TelemetryConfig) -> None:
    """Every `telemetry.sources` key names a registered source (a typo is not ignored), and
    each configured source accepts its options (`create`, no hardware touched): called when
    the config is loaded, before any work, and again at discovery. Raises ConfigError."""
    labels = [c.LABEL for c in _TYPES]
    for key, opts in cfg.sources.items():
        if key not in labels:
            raise ConfigError(f"telemetry.sources.{key}: no energy source has this label; "
                              f"expected one of {sorted(labels)}")
        if not isinstance(opts, Mapping):
            raise ConfigError(f"telemetry.sources.{key}: expected a mapping of options, got "
                              f"{type(opts).__name__}")
        cls = source_class(key)
        if cls is not None:
            cls.create(Discovery(cfg, {}))


def discover(cfg: TelemetryConfig | None = None, options: Mapping[str, Any] | None = None
             ) -> list[EnergySource]:
    """Open every registered source; the unavailable ones stay in the list with their reason.

    An estimate is not opened where a measured source covers its components (no CPU-time
    estimate on a machine with RAPL); a CONFIGURED_ONLY source only with its config section.
    Logs one line on what is (not) available."""
    cfg = cfg or TelemetryConfig()
    check_options(cfg)
    found: list[EnergySource] = []
    for cls in source_types():
        covered = {c for s in found if s.available and not s.ESTIMATED for c in s.COMPONENTS}
        if cls.ESTIMATED and set(cls.COMPONENTS) <= covered:
            continue
        if cls.CONFIGURED_ONLY and cls.LABEL not in cfg.sources:
            continue
        ctx = Discovery(cfg, dict(options or {}))
        found.append(cls.create(ctx).open())
    log.info("energy sources: %s", "; ".join(
        f"{s.LABEL} {[d.key for d in s.devices]} ({s.BLIND_TO})" if s.available
        else f"{s.LABEL} unavailable ({s.reason})" for s in found))
    return found
