"""The registered energy sources and discovery: which of them this machine can read.

Like Zeus's one-GPU-interface-per-vendor, each source is one `EnergySource` subclass in its own
file; registering it here is all the meter, sampler, ledger and readers need:

    @register_source
    class AmdSmiSource(EnergySource): ...

Order matters only for estimates: measured sources are opened first, and an `ESTIMATED` source
is skipped when a measured one already covers its components.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from wattkd.config import TelemetryConfig
from wattkd.energy.source import Discovery, EnergySource
from wattkd.energy.sources.cpu_time import CpuSource, CpuTimeSource
from wattkd.energy.sources.nvml import GpuInfo, NvmlSource, parse_visible_devices
from wattkd.energy.sources.rapl import PERMISSION_FIX, RaplSource, RaplZone

__all__ = ["PERMISSION_FIX", "CpuSource", "CpuTimeSource", "GpuInfo", "NvmlSource",
           "RaplSource", "RaplZone", "discover", "parse_visible_devices", "register_source",
           "source_class", "source_types", "unregister_source"]

log = logging.getLogger(__name__)

_TYPES: list[type[EnergySource]] = [NvmlSource, RaplSource, CpuTimeSource]


def register_source(cls: type[EnergySource]) -> type[EnergySource]:
    """Make a source class known to discovery and to the telemetry/ledger readers."""
    if not (isinstance(cls, type) and issubclass(cls, EnergySource)):
        raise TypeError(f"register_source needs an EnergySource subclass, got {cls!r}")
    taken = {c.LABEL: c for c in _TYPES}
    if cls.LABEL in taken and taken[cls.LABEL] is not cls:
        raise ValueError(f"energy source label {cls.LABEL!r} is already registered by "
                         f"{taken[cls.LABEL].__name__}")
    bad = set(cls.COMPONENTS) - {"gpu", "cpu", "dram"}
    if bad:
        raise ValueError(f"{cls.__name__}: components {sorted(bad)} are not in the ledger "
                         "schema (gpu, cpu, dram)")
    if cls not in _TYPES:
        _TYPES.append(cls)
    return cls


def unregister_source(cls: type[EnergySource]) -> None:
    """Forget a registered source class (tests that register a stand-in)."""
    if cls in _TYPES:
        _TYPES.remove(cls)


def source_types() -> list[type[EnergySource]]:
    """The registered source classes, measured before estimated (discovery order)."""
    return sorted(_TYPES, key=lambda c: c.ESTIMATED)


def source_class(label: str) -> type[EnergySource] | None:
    """The registered class whose records carry `label` (None: not a source label)."""
    return next((c for c in _TYPES if c.LABEL == label), None)


def discover(cfg: TelemetryConfig | None = None, options: Mapping[str, Any] | None = None
             ) -> list[EnergySource]:
    """Open every registered source; the unavailable ones stay in the list with their reason.

    An estimate is not opened where a measured source covers its components (no CPU-time
    estimate on a machine with RAPL). Logs one line on what is (not) available."""
    found: list[EnergySource] = []
    for cls in source_types():
        covered = {c for s in found if s.available and not s.ESTIMATED for c in s.COMPONENTS}
        if cls.ESTIMATED and set(cls.COMPONENTS) <= covered:
            continue
        ctx = Discovery(cfg or TelemetryConfig(), dict(options or {}))
        found.append(cls.create(ctx).open())
    log.info("energy sources: %s", "; ".join(
        f"{s.LABEL} {[d.key for d in s.devices]} ({s.BLIND_TO})" if s.available
        else f"{s.LABEL} unavailable ({s.reason})" for s in found))
    return found
