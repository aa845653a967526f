"""Hardware stand-ins for the energy tests (this machine has no GPU, NVML or RAPL).

`FakeNvml` answers the pynvml calls wattkd uses with the real pynvml error classes and
constants, so the code under test cannot tell it from the library except by its numbers.
`make_powercap` writes a powercap sysfs tree into a temp dir. `FakeCounterSource` is an
`EnergySource` of its own (the protocol's stand-in, and the base of a new source in tests).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml

from wattkd.energy.counters import CounterTracker
from wattkd.energy.source import Device, Discovery, EnergySource, Reading

E = pynvml.NVMLError


@dataclass
class FakeGpu:
    """One simulated GPU. The energy counter is `energy_mj` (set it by hand) plus, when
    `watts` > 0, a counter that advances in steps of `period` s like the real one."""

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    energy_mj: int = 1_000_000
    watts: float = 0.0
    period: float = 0.1
    power_w: float = 300.0
    power_avg_w: float = 290.0
    limit_w: float = 700.0
    mig: bool = False
    mig_capable: bool = True
    unsupported: set[str] = field(default_factory=set)   # see FakeNvml methods
    t0: float = field(default_factory=time.monotonic)
    reads: int = 0

    def counter(self) -> int:
        if "energy" in self.unsupported:
            raise E(pynvml.NVML_ERROR_NOT_SUPPORTED)
        self.reads += 1
        steps = math.floor((time.monotonic() - self.t0) / self.period) if self.watts else 0
        return int(self.energy_mj + steps * self.period * self.watts * 1000)


@dataclass
class MigHandle:
    parent: FakeGpu
    uuid: str


class FakeNvml:
    """A module-like simulated NVML library over a list of FakeGpu."""

    NVMLError = pynvml.NVMLError
    NVML_FI_DEV_POWER_INSTANT = pynvml.NVML_FI_DEV_POWER_INSTANT
    NVML_FI_DEV_POWER_AVERAGE = pynvml.NVML_FI_DEV_POWER_AVERAGE
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM

    def __init__(self, gpus: list[FakeGpu], init_error: int | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.inits = 0
        self.shutdowns = 0

    def _check(self, h: FakeGpu, what: str) -> None:
        if what in h.unsupported:
            raise E(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise E(self.init_error)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:
        if not 0 <= i < len(self.gpus):
            raise E(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[i]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeGpu | MigHandle:
        for g in self.gpus:
            if g.uuid == uuid:
                return g
            if g.mig and uuid.startswith("MIG-") and uuid[4:].startswith(g.uuid[4:12]):
                return MigHandle(g, uuid)
        raise E(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, h: MigHandle) -> FakeGpu:
        return h.parent

    def nvmlDeviceGetUUID(self, h: FakeGpu) -> str:
        return h.uuid

    def nvmlDeviceGetName(self, h: FakeGpu) -> str:
        return h.name

    def nvmlDeviceGetIndex(self, h: FakeGpu) -> int:
        return self.gpus.index(h)

    def nvmlDeviceGetMigMode(self, h: FakeGpu) -> list[int]:
        if not h.mig_capable:
            raise E(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return [int(h.mig), int(h.mig)]

    def nvmlDeviceGetTotalEnergyConsumption(self, h: FakeGpu) -> int:
        return h.counter()

    def nvmlDeviceGetFieldValues(self, h: FakeGpu, ids: list[int]) -> list[SimpleNamespace]:
        self._check(h, "fields_call")
        out = []
        for fid in ids:
            ok, val = 0, 0
            if fid == pynvml.NVML_FI_DEV_POWER_INSTANT:
                ok = 3 if "field_instant" in h.unsupported else 0
                val = int(h.power_w * 1000)
            elif fid == pynvml.NVML_FI_DEV_POWER_AVERAGE:
                ok = 3 if "field_avg" in h.unsupported else 0
                val = int(h.power_avg_w * 1000)
            else:
                ok = 2
            out.append(SimpleNamespace(fieldId=fid, nvmlReturn=ok, valueType=1,
                                       value=SimpleNamespace(uiVal=val)))
        return out

    def nvmlDeviceGetPowerUsage(self, h: FakeGpu) -> int:
        self._check(h, "power_usage")
        return int(h.power_avg_w * 1000)

    def nvmlDeviceGetEnforcedPowerLimit(self, h: FakeGpu) -> int:
        self._check(h, "limit")
        return int(h.limit_w * 1000)

    def nvmlDeviceGetUtilizationRates(self, h: FakeGpu) -> SimpleNamespace:
        self._check(h, "util")
        if h.mig:
            raise E(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=87, memory=40)

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu) -> SimpleNamespace:
        self._check(h, "mem")
        return SimpleNamespace(used=10 * 2**30, total=80 * 2**30, free=70 * 2**30)

    def nvmlDeviceGetTemperature(self, h: FakeGpu, sensor: int) -> int:
        self._check(h, "temp")
        return 55

    def nvmlDeviceGetClockInfo(self, h: FakeGpu, kind: int) -> int:
        self._check(h, "clock")
        return 1980


def two_gpus(**kw) -> list[FakeGpu]:
    return [FakeGpu(uuid="GPU-aaaaaaaa-1111-2222-3333-444444444444", **kw),
            FakeGpu(uuid="GPU-bbbbbbbb-5555-6666-7777-888888888888", **kw)]


def make_powercap(root: Path, packages: int = 1, energy_uj: int = 1_000_000,
                  max_range_uj: int = 262_143_328_850, dram: bool = True,
                  extras: bool = True) -> Path:
    """A powercap tree like a server's: package zones with core/uncore/dram subzones, plus a
    psys zone and an MMIO duplicate of the package (both must be ignored)."""
    def zone(name: str, label: str, value: int) -> None:
        d = root / name
        d.mkdir(parents=True)
        (d / "name").write_text(label + "\n")
        (d / "energy_uj").write_text(f"{value}\n")
        (d / "max_energy_range_uj").write_text(f"{max_range_uj}\n")

    root.mkdir(parents=True, exist_ok=True)
    (root / "intel-rapl").mkdir()  # the control-type folder: no energy of its own
    for p in range(packages):
        zone(f"intel-rapl:{p}", f"package-{p}", energy_uj)
        if extras:
            zone(f"intel-rapl:{p}:0", "core", energy_uj // 2)
            zone(f"intel-rapl:{p}:1", "uncore", energy_uj // 4)
        if dram:
            zone(f"intel-rapl:{p}:2", "dram", energy_uj // 3)
    if extras:
        zone(f"intel-rapl:{packages}", "psys", energy_uj * 3)
        zone("intel-rapl-mmio:0", "package-0", energy_uj)
    return root


def set_uj(root: Path, zone: str, value: int) -> None:
    (root / zone / "energy_uj").write_text(f"{value}\n")


# ------------------------------------------------------------------ a source of its own
@dataclass
class FakeDevice:
    """One simulated device of a FakeCounterSource: a raw counter (µJ) and power, set by hand."""

    uj: int = 1_000_000
    watts: float | None = 200.0


class FakeCounterSource(EnergySource):
    """An energy source implemented straight on the protocol (no vendor library behind it):
    devices and their counters come from the discovery option named after its LABEL, e.g.
    `EnergyMeter(..., source_options={"fake-counter": {"dev0": FakeDevice()}})`. It writes
    telemetry under its own key and reads it back, like a real source."""

    LABEL = "fake-counter"
    NAME = "fake"
    COMPONENTS = ("gpu",)
    BLIND_TO = "a test stand-in: sees only the numbers the test sets"
    POWER = True
    TELEMETRY_KEY = "fake"
    POWER_LABEL = "fake-power-integrated"

    def __init__(self, counters: dict[str, FakeDevice]) -> None:
        super().__init__()
        self._counters = counters

    @classmethod
    def create(cls, ctx: Discovery) -> FakeCounterSource:
        return cls(ctx.options.get(cls.LABEL) or {})

    def open(self) -> FakeCounterSource:
        self.devices = [Device(k, self.COMPONENTS[0], scale_j=1e-6, info={"name": k})
                        for k in self._counters]
        if not self.devices:
            self.reason = f"no {self.NAME} device given"
        return self

    def read_counter(self, dev: Device) -> int | None:
        return self._counters[dev.key].uj

    def read_power(self, dev: Device) -> float | None:
        return self._counters[dev.key].watts

    def telemetry(self, readings: Mapping[str, Reading], slow: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, r in readings.items():
            out[k] = {"power_w": r.power_w}
            if r.counter is not None:
                out[k]["energy_uj"] = r.counter
        return out

    @classmethod
    def telemetry_counters(cls, section: Any, component: str) -> dict[str, Any]:
        if component not in cls.COMPONENTS:
            return {}
        return {k: v["energy_uj"] for k, v in (section or {}).items()
                if v.get("energy_uj") is not None}

    @classmethod
    def telemetry_power(cls, section: Any) -> dict[str, float | None]:
        return {k: v.get("power_w") for k, v in (section or {}).items()}

    @classmethod
    def telemetry_tracker(cls, headers: Sequence[dict[str, Any]], session: str,
                          key: str) -> CounterTracker:
        return CounterTracker(1e-6)
