"""CPU package and DRAM energy from the Linux powercap RAPL counters (µJ, wrapping)."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wattkd.energy.counters import CounterTracker
from wattkd.energy.source import Device, Discovery, EnergySource, Reading
from wattkd.energy.sources.registry import register_source

log = logging.getLogger(__name__)

_KIND = {"cpu": "package", "dram": "dram"}      # component -> zone kind


@dataclass
class RaplZone:
    name: str          # "package-0", "dram-0"
    kind: str          # "package" | "dram"
    path: Path
    max_range_uj: int


PERMISSION_FIX = (
    "Linux >= 5.10 makes RAPL energy_uj readable by root only (CVE-2020-8694). To let this "
    "user read it: sudo chmod a+r /sys/class/powercap/intel-rapl:*/energy_uj "
    "/sys/class/powercap/intel-rapl:*:*/energy_uj (lost at reboot; a udev rule or your "
    "cluster admin can make it permanent)")


@register_source
class RaplSource(EnergySource):
    """CPU package and DRAM energy from /sys/class/powercap (Intel, and AMD via intel-rapl).

    Only top-level `package-N` zones and their `dram` subzones are read: core/uncore are
    nested inside the package, `psys` covers the whole platform and `intel-rapl-mmio` repeats
    the package through another interface; counting any of them would double count.
    """

    LABEL = "rapl"
    ORDER = 1
    NAME = "RAPL"
    COMPONENTS = ("cpu", "dram")
    BLIND_TO = ("RAPL: CPU packages and DRAM only (no GPUs, disks, fans or power-supply "
                "losses); its counter model is not characterised, so no uncertainty")
    COUNTER_EVERY_TICK = True      # a sysfs read: cheap
    TELEMETRY_KEY = "rapl"
    HOST_LOCAL_KEYS = True         # zone names repeat on every host

    def __init__(self, root: str | Path = "/sys/class/powercap") -> None:
        super().__init__()
        self.root = Path(root)
        self.zones: list[RaplZone] = []
        self.skipped: dict[str, str] = {}

    @classmethod
    def create(cls, ctx: Discovery) -> RaplSource:
        return cls(ctx.options.get("powercap_root")
                   or os.environ.get("WATTKD_POWERCAP_ROOT", "/sys/class/powercap"))

    def open(self) -> RaplSource:
        if not self.root.is_dir():
            self.reason = f"no RAPL powercap interface ({self.root} absent)"
            return self
        pat = re.compile(r"^intel-rapl:(\d+)(?::(\d+))?$")
        found: list[RaplZone] = []
        for entry in sorted(self.root.iterdir()):
            m = pat.match(entry.name)
            if not m:
                continue
            try:
                name = (entry / "name").read_text().strip()
            except OSError:
                continue
            if m.group(2) is None and name.startswith("package"):
                kind = "package"
            elif m.group(2) is not None and name == "dram":
                kind, name = "dram", f"dram-{m.group(1)}"
            else:
                self.skipped[entry.name] = (f"{name}: nested in a package zone" if m.group(2)
                                            else f"{name}: not a package zone")
                continue
            try:
                max_range = int((entry / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                max_range = 0
            found.append(RaplZone(name, kind, entry / "energy_uj", max_range))
        if not found:
            self.reason = f"no RAPL package zone under {self.root}"
            return self
        for z in found:
            try:
                int(z.path.read_text())
            except PermissionError:
                self.reason = f"cannot read {z.path}: permission denied. {PERMISSION_FIX}"
                log.warning("RAPL: %s", self.reason)
                return self
            except (OSError, ValueError) as exc:
                self.unavailable[f"rapl/{z.name}"] = f"unreadable: {exc}"
                continue
            self.zones.append(z)
        if not self.zones:
            self.reason = "no readable RAPL zone"
        self.devices = [Device(z.name, "cpu" if z.kind == "package" else "dram", scale_j=1e-6,
                               wrap=z.max_range_uj or None) for z in self.zones]
        return self

    def read_counter(self, dev: Device) -> int | None:
        return self.read().get(dev.key)

    def sample(self, energy: bool = True) -> dict[str, Reading]:
        t = time.monotonic()
        return {name: Reading(t, value) for name, value in self.read().items()}

    def header(self) -> dict[str, Any]:
        return {"rapl": [{"zone": z.name, "kind": z.kind, "max_range_uj": z.max_range_uj}
                         for z in self.zones]}

    @classmethod
    def telemetry_counters(cls, section: Any, component: str) -> dict[str, Any]:
        kind = _KIND.get(component)
        if kind is None:
            return {}
        return {z: v for z, v in (section or {}).items() if z.startswith(kind)}

    @classmethod
    def telemetry_tracker(cls, headers: Sequence[dict[str, Any]], session: str,
                          key: str) -> CounterTracker:
        wrap = 0
        for h in headers:
            if h.get("session") == session:
                for z in h.get("rapl", []):
                    if z["zone"] == key:
                        wrap = z.get("max_range_uj") or 0
        return CounterTracker(1e-6, wrap=wrap or None)

    def read(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for z in self.zones:
            try:
                out[z.name] = int(z.path.read_text())
            except (OSError, ValueError) as exc:
                out[z.name] = None
                key = f"rapl/{z.name}"
                if key not in self.unavailable:
                    self.unavailable[key] = f"read failed: {exc}"
                    log.warning("RAPL %s: read failed: %s", z.name, exc)
        return out


