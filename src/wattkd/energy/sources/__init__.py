"""Energy sources, one file each, registered with `@register_source` (registry.py); this
package loads every file in it, so a new source is one file (ARCHITECTURE.md, "Adding a
piece: an energy source"). The built-in ones load first, in discovery order."""

from __future__ import annotations

import importlib
import pkgutil

from wattkd.energy.sources.cpu_time import CpuSource, CpuTimeSource
from wattkd.energy.sources.nvml import GpuInfo, NvmlSource, parse_visible_devices
from wattkd.energy.sources.rapl import PERMISSION_FIX, RaplSource, RaplZone
from wattkd.energy.sources.registry import (
    check_options,
    discover,
    register_source,
    source_class,
    source_types,
    unregister_source,
)

__all__ = ["PERMISSION_FIX", "CpuSource", "CpuTimeSource", "GpuInfo", "NvmlSource",
           "RaplSource", "RaplZone", "check_options", "discover", "parse_visible_devices", "register_source",
           "source_class", "source_types", "unregister_source"]

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
