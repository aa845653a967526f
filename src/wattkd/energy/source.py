"""The one interface every energy source implements (NVML, RAPL, CPU time, ... one file each).

A source meters one or more `Device`s, each of one energy component (`gpu`, `cpu`, `dram`,
or one the source declares itself in `DECLARES`, e.g. `node`: `energy.components`). It reads a cumulative energy counter per device (raw
units x `Device.scale_j` = J; the meter turns reads into a monotonic total with the source's
`tracker`) and, where it can, instantaneous power. It says what it is (`LABEL`, the source label
written in ledger records), whether its figure is an estimate (`ESTIMATED`), what it cannot see
(`BLIND_TO`), and why a device or field is missing (`reason`, `unavailable`); it never invents a
value. A source that writes telemetry owns its section of a sample line (`TELEMETRY_KEY`) and
reads it back (`telemetry_counters`, `telemetry_power`, `telemetry_tracker`), so the offline
readers need no knowledge of any one source.

Adding a source: one file `energy/sources/<name>.py` with the subclass, decorated with
`@register_source` (ARCHITECTURE.md, "Adding a piece: an energy source"); its options come from
`telemetry.sources.<LABEL>` (`Discovery.own`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from wattkd.config import TelemetryConfig
from wattkd.energy.components import Component
from wattkd.energy.counters import CounterTracker, LevelCounter

UNAVAILABLE = "unavailable"


@dataclass
class Device:
    """One metered device: a GPU, a RAPL zone, this process tree.

    `key` is unique among the source's devices (GPU UUID, zone name); `info` is what the ledger
    records about it beside its energy (GPUs: the `per_gpu` entry's index, name, ...)."""

    key: str
    component: str
    counter: bool = True               # an energy counter is readable
    scale_j: float = 1.0               # J per raw counter unit
    wrap: int | None = None            # raw value at which the counter wraps to 0
    max_power_w: float | None = None   # plausibility bound for counter increases
    power_source: str | None = None    # how power is read ("field-instant", ...) or None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reading:
    """One read of one device at monotonic time `t`: raw counter (None: not read, or
    unreadable), power in W (None: none), and the raw values for the telemetry line."""

    t: float
    counter: float | None = None
    power_w: float | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Discovery:
    """What discovery hands each source class: the telemetry config and source-specific
    options (e.g. `nvml_lib`, `powercap_root`: a simulated library or sysfs tree in tests)."""

    cfg: TelemetryConfig
    options: Mapping[str, Any]

    def own(self, cls: type[EnergySource]) -> dict[str, Any]:
        """The source's own section of the telemetry config (`telemetry.sources.<LABEL>`)."""
        return dict(self.cfg.sources.get(cls.LABEL) or {})


class EnergySource(ABC):
    """One kind of energy counter. Subclasses set the class constants and implement `create`,
    `open`, `read_counter` (and `read_power` where they read power); the rest has defaults for
    a counter-only source. A source writing telemetry also implements `telemetry` and the
    `telemetry_*` readers."""

    LABEL: ClassVar[str]                        # source label in records ("nvml-counter")
    NAME: ClassVar[str]                         # in words, for notes ("NVML")
    COMPONENTS: ClassVar[tuple[str, ...]]       # components its devices can belong to
    DECLARES: ClassVar[tuple[Component, ...]] = ()  # new components it introduces (node, ...)
    ESTIMATED: ClassVar[bool] = False           # an estimate, not a measurement
    ORDER: ClassVar[int] = 100                  # discovery order among measured sources
    CONFIGURED_ONLY: ClassVar[bool] = False     # opened only with telemetry.sources.<LABEL>
    BLIND_TO: ClassVar[str] = ""                # what this source cannot see, in one sentence
    COUNTER_PERIOD_S: ClassVar[float | None] = None  # published counter update period
    CHARACTERISED: ClassVar[bool] = False       # `uncertainty_j` gives a figure
    PARTIAL: ClassVar[bool] = False             # a never-read device is left out of the sum
    COUNTER_EVERY_TICK: ClassVar[bool] = False  # counter cheap enough for every sampler tick
    POWER: ClassVar[bool] = False               # power is read on every sampler tick
    TELEMETRY_KEY: ClassVar[str | None] = None  # its section of a telemetry sample line
    HOST_LOCAL_KEYS: ClassVar[bool] = False     # device keys repeat across hosts (zone names)
    POWER_LABEL: ClassVar[str | None] = None    # label of power-integrated energy (telemetry)

    def __init__(self) -> None:
        self.devices: list[Device] = []
        self.reason: str | None = None            # why there is no device at all
        self.unavailable: dict[str, str] = {}     # field key -> why it is missing
        self.driver: str | None = None            # a driver version the figures depend on

    # ---- setup
    @classmethod
    @abstractmethod
    def create(cls, ctx: Discovery) -> EnergySource:
        """An unopened source for this run (options from `ctx`)."""

    @abstractmethod
    def open(self) -> EnergySource:
        """Probe the hardware once; fill `devices`, or `reason` when there is none."""

    def close(self) -> None:
        """Release the library (default: nothing to release)."""

    @property
    def available(self) -> bool:
        return bool(self.devices)

    def flags_and_notes(self) -> tuple[list[str], list[str]]:
        """Flags and notes every record of this session carries (e.g. a partial device set)."""
        return [], []

    # ---- reads
    @abstractmethod
    def read_counter(self, dev: Device) -> float | None:
        """The raw counter of one device now (None when unreadable)."""

    def read_power(self, dev: Device) -> float | None:
        """One device's power (W) now; None: this source reads no power."""
        return None

    def sample(self, energy: bool = True) -> dict[str, Reading]:
        """Every device's reading; the counter only when `energy` (it may be costly)."""
        out: dict[str, Reading] = {}
        for d in self.devices:
            raw = self.read_counter(d) if energy and d.counter else None
            out[d.key] = Reading(t=time.monotonic(), counter=raw, power_w=self.read_power(d))
        return out

    def tracker(self, dev: Device) -> CounterTracker | LevelCounter:
        """What turns this device's raw reads into a monotonic total (J)."""
        return CounterTracker(dev.scale_j, wrap=dev.wrap, max_power_w=dev.max_power_w)

    def uncertainty_j(self, energy_j: float, duration_s: float, p_start: float | None,
                      p_end: float | None, counter_period_s: float,
                      cfg: TelemetryConfig) -> float | None:
        """A window's uncertainty (J) for one device; None: not characterised."""
        return None

    # ---- telemetry (sources with a TELEMETRY_KEY)
    def header(self) -> dict[str, Any]:
        """Entries of the telemetry header describing this source's devices."""
        return {}

    def telemetry(self, readings: Mapping[str, Reading], slow: bool) -> Any:
        """This source's section of a sample line (default: {device: raw counter})."""
        return {k: r.counter for k, r in readings.items()}

    @classmethod
    def telemetry_counters(cls, section: Any, component: str) -> dict[str, Any]:
        """Device key -> raw counter of `component` devices in a sample's section (only the
        devices whose counter the sample carries)."""
        return {}

    @classmethod
    def telemetry_power(cls, section: Any) -> dict[str, float | None]:
        """Device key -> power (W) in a sample's section."""
        return {}

    @classmethod
    def telemetry_tracker(cls, headers: Sequence[dict[str, Any]], session: str,
                          key: str) -> CounterTracker:
        """The tracker for a device read back from telemetry (limits from the headers)."""
        return CounterTracker(1.0)

    @classmethod
    def telemetry_device_id(cls, host: str | None, key: str) -> str:
        """A device's identity across sampler sessions (to drop double-reported devices)."""
        return f"{cls.TELEMETRY_KEY}:{host}:{key}" if cls.HOST_LOCAL_KEYS \
            else f"{cls.TELEMETRY_KEY}:{key}"
