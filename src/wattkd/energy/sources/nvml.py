"""NVIDIA GPUs via NVML: the total-energy counter (mJ since driver load) and board power.

Each GPU reports only what it can read. A field it cannot read is `None`, and the reason is
kept once in `unavailable` (key -> reason) so the sampler can write it to the telemetry header
instead of repeating it on every line. Nothing here ever invents a value.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wattkd.config import TelemetryConfig
from wattkd.energy.counters import CounterTracker
from wattkd.energy.source import Device, Discovery, EnergySource, Reading
from wattkd.energy.sources.registry import register_source

log = logging.getLogger(__name__)


@dataclass
class GpuInfo:
    """One metered GPU. `index` is NVML's (PCI order); `cuda_index` its place in the visible list."""

    uuid: str
    index: int
    cuda_index: int
    name: str
    handle: Any = field(repr=False)
    mig: bool = False
    energy: bool = False            # total-energy counter readable
    power_source: str | None = None  # "field-instant" | "power-usage" | None
    power_avg: bool = False          # NVML_FI_DEV_POWER_AVERAGE readable
    power_limit_w: float | None = None
    slow_ok: dict[str, bool] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "index": self.index, "cuda_index": self.cuda_index,
                "name": self.name, "mig": self.mig,
                "energy_source": NvmlSource.LABEL if self.energy else "unavailable",
                "power_source": self.power_source or "unavailable",
                "power_avg": self.power_avg, "power_limit_w": self.power_limit_w}


_VALUE_ATTR = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal",
               6: "usVal"}
SLOW_FIELDS = ("util_pct", "mem_used_b", "mem_total_b", "temp_c", "sm_clock_mhz")


def parse_visible_devices(value: str | None) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as a list of entries; None means unset (every GPU visible)."""
    if value is None:
        return None
    value = value.strip()
    if value in ("", "-1", "NoDevFiles"):
        return []
    return [v.strip() for v in value.split(",") if v.strip()]


def _nvml_lib() -> Any:
    # imported on open, not at module import: a machine without nvidia-ml-py gets a reason
    import pynvml  # provided by nvidia-ml-py

    return pynvml


@register_source
class NvmlSource(EnergySource):
    """NVIDIA GPUs via NVML. `lib` is the pynvml module, or a simulated one in tests.

    GPUs are those CUDA would show this process (CUDA_VISIBLE_DEVICES indices, GPU-/MIG- UUIDs
    and UUID prefixes; like CUDA, an invalid entry hides itself and every entry after it).
    A MIG instance is metered through its parent GPU, whose counter covers every instance.
    """

    LABEL = "nvml-counter"
    ORDER = 0
    NAME = "NVML"
    COMPONENTS = ("gpu",)
    BLIND_TO = ("NVML: GPU board only (no host CPU, DRAM, fans or power-supply losses); under "
                "MIG a GPU's counter covers all of its instances")
    COUNTER_PERIOD_S = 0.1      # published/observed update period (~100 ms on H200)
    CHARACTERISED = True
    PARTIAL = True              # GPUs without a counter are left out (flag partial-gpu)
    POWER = True
    TELEMETRY_KEY = "gpu"
    POWER_LABEL = "nvml-power-integrated"

    def __init__(self, lib: Any = None, visible: str | None | bool = True) -> None:
        super().__init__()
        self._lib = lib
        self._visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is True else visible
        self.gpus: list[GpuInfo] = []
        self._by_uuid: dict[str, GpuInfo] = {}
        self._open = False

    @classmethod
    def create(cls, ctx: Discovery) -> NvmlSource:
        return cls(ctx.options.get("nvml_lib"))

    # ---- setup
    def open(self) -> NvmlSource:
        try:
            lib = self._lib if self._lib is not None else _nvml_lib()
            self._lib = lib
        except ImportError as exc:
            self.reason = f"nvidia-ml-py is not installed ({exc}); pip install nvidia-ml-py"
            return self
        try:
            lib.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - LibraryNotFound, DriverNotLoaded, OSError...
            self.reason = f"NVML unavailable: {exc} (no NVIDIA driver on this machine?)"
            return self
        self._open = True
        try:
            self.driver = _s(lib.nvmlSystemGetDriverVersion())
        except lib.NVMLError:
            self.driver = None
        try:
            handles = self._visible_handles()
        except lib.NVMLError as exc:
            self.reason = f"NVML could not list GPUs: {exc}"
            return self
        for cuda_index, (handle, mig) in enumerate(handles):
            self.gpus.append(self._probe(handle, cuda_index, mig))
        if not self.gpus and self.reason is None:
            self.reason = "no NVIDIA GPU visible to this process"
        self._by_uuid = {g.uuid: g for g in self.gpus}
        self.devices = [Device(
            g.uuid, "gpu", counter=g.energy, scale_j=1e-3,
            max_power_w=2 * g.power_limit_w if g.power_limit_w else None,
            power_source=g.power_source,
            info={"index": g.index, "cuda_index": g.cuda_index, "name": g.name, "mig": g.mig})
            for g in self.gpus]
        return self

    def _visible_handles(self) -> list[tuple[Any, bool]]:
        lib = self._lib
        count = lib.nvmlDeviceGetCount()
        entries = parse_visible_devices(self._visible)
        if entries is None:
            return [(lib.nvmlDeviceGetHandleByIndex(i), False) for i in range(count)]
        if not entries:
            self.reason = f"CUDA_VISIBLE_DEVICES={self._visible!r} hides every GPU"
            return []
        uuids = [_s(lib.nvmlDeviceGetUUID(lib.nvmlDeviceGetHandleByIndex(i)))
                 for i in range(count)]
        if (any(e.isdigit() for e in entries)
                and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID"
                and len({_s(lib.nvmlDeviceGetName(lib.nvmlDeviceGetHandleByIndex(i)))
                         for i in range(count)}) > 1):
            self.unavailable["gpu/order"] = (
                "mixed GPU models and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA's index order "
                "(fastest first) may differ from NVML's; set CUDA_DEVICE_ORDER=PCI_BUS_ID or "
                "use GPU UUIDs in CUDA_VISIBLE_DEVICES")
            log.warning(self.unavailable["gpu/order"])
        out: list[tuple[Any, bool]] = []
        seen: set[str] = set()
        for pos, entry in enumerate(entries):
            handle, mig, why = self._resolve(entry, count, uuids)
            if handle is None:
                ignored = ",".join(entries[pos:])
                self.unavailable["gpu/visible"] = (
                    f"CUDA_VISIBLE_DEVICES entry {entry!r} {why}; CUDA ignores it and every "
                    f"entry after it ({ignored})")
                log.warning(self.unavailable["gpu/visible"])
                break
            uuid = _s(lib.nvmlDeviceGetUUID(handle))
            if uuid in seen:   # two MIG instances of one GPU: meter the GPU once
                continue
            seen.add(uuid)
            out.append((handle, mig))
        return out

    def _resolve(self, entry: str, count: int, uuids: list[str]) -> tuple[Any, bool, str]:
        lib = self._lib
        if re.fullmatch(r"\d+", entry):
            i = int(entry)
            if i >= count:
                return None, False, f"is not a GPU index (NVML sees {count} GPU(s))"
            return lib.nvmlDeviceGetHandleByIndex(i), False, ""
        if entry.startswith("MIG-"):
            try:
                mig_handle = lib.nvmlDeviceGetHandleByUUID(entry)
                parent = lib.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig_handle)
            except lib.NVMLError as exc:
                return None, False, f"is not a MIG device NVML knows ({exc})"
            return parent, True, ""
        matches = [i for i, u in enumerate(uuids) if u.startswith(entry)]
        if len(matches) != 1:
            return None, False, ("matches no GPU UUID" if not matches
                                 else "matches several GPU UUIDs")
        return lib.nvmlDeviceGetHandleByIndex(matches[0]), False, ""

    def _probe(self, handle: Any, cuda_index: int, mig_entry: bool) -> GpuInfo:
        """Learn once which fields this GPU supports; unsupported ones get a reason."""
        lib = self._lib
        uuid = _s(lib.nvmlDeviceGetUUID(handle))
        g = GpuInfo(uuid=uuid, index=int(lib.nvmlDeviceGetIndex(handle)), cuda_index=cuda_index,
                    name=_s(lib.nvmlDeviceGetName(handle)), handle=handle)
        try:
            g.mig = bool(lib.nvmlDeviceGetMigMode(handle)[0]) or mig_entry
        except lib.NVMLError:
            g.mig = mig_entry
        if g.mig:
            self.unavailable[f"gpu/{uuid}/mig"] = (
                "MIG mode: the energy counter covers the whole GPU (every MIG instance)")
        key = f"gpu/{uuid}"
        try:
            lib.nvmlDeviceGetTotalEnergyConsumption(handle)
            g.energy = True
        except lib.NVMLError as exc:
            self.unavailable[f"{key}/energy_mj"] = (
                f"total-energy counter: {exc} (needs a Volta or newer GPU)")
        try:
            fv = lib.nvmlDeviceGetFieldValues(handle, [lib.NVML_FI_DEV_POWER_INSTANT,
                                                       lib.NVML_FI_DEV_POWER_AVERAGE])
            inst_err, avg_err = _field_error(lib, fv[0]), _field_error(lib, fv[1])
        except (lib.NVMLError, AttributeError) as exc:
            inst_err = avg_err = f"field values: {exc}"
        if inst_err is None:
            g.power_source = "field-instant"
        else:
            try:
                lib.nvmlDeviceGetPowerUsage(handle)
                g.power_source = "power-usage"
                self.unavailable[f"{key}/power_w"] = (
                    f"instant power field: {inst_err}; power_w is nvmlDeviceGetPowerUsage "
                    "(a 1 s average on Hopper-class GPUs)")
            except lib.NVMLError as exc:
                self.unavailable[f"{key}/power_w"] = f"power: {inst_err}; power usage: {exc}"
        g.power_avg = avg_err is None
        if not g.power_avg:
            self.unavailable[f"{key}/power_avg_w"] = f"average power field: {avg_err}"
        try:
            g.power_limit_w = lib.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0
        except lib.NVMLError as exc:
            self.unavailable[f"{key}/power_limit_w"] = f"power limit: {exc}"
        for name in SLOW_FIELDS:
            if name == "mem_total_b":
                continue
            try:
                self._read_slow_field(g, name)
                g.slow_ok[name] = True
            except lib.NVMLError as exc:
                g.slow_ok[name] = False
                extra = " (MIG mode)" if g.mig else ""
                self.unavailable[f"{key}/{name}"] = f"{exc}{extra}"
        g.slow_ok["mem_total_b"] = g.slow_ok["mem_used_b"]
        if not g.slow_ok["mem_total_b"]:
            self.unavailable[f"{key}/mem_total_b"] = self.unavailable[f"{key}/mem_used_b"]
        return g

    def flags_and_notes(self) -> tuple[list[str], list[str]]:
        flags: list[str] = []
        notes: list[str] = []
        if self.gpus and not all(g.energy for g in self.gpus):
            flags.append("partial-gpu")
            notes.append("some GPUs have no energy counter; gpu energy sums the rest")
        if any(g.mig for g in self.gpus):
            flags.append("mig-shared-counter")
            notes.append("MIG: a GPU's counter covers all of its MIG instances")
        return flags, notes

    # ---- reads
    def read_counter(self, dev: Device) -> int | None:
        return self.read_energy_mj(self._by_uuid[dev.key])

    def sample(self, energy: bool = True) -> dict[str, Reading]:
        out: dict[str, Reading] = {}
        for g in self.gpus:
            v = self.read_fast(g, energy=energy)
            out[g.uuid] = Reading(time.monotonic(), v.get("energy_mj"), v["power_w"], v)
        return out

    def uncertainty_j(self, energy_j: float, duration_s: float, p_start: float | None,
                      p_end: float | None, counter_period_s: float,
                      cfg: TelemetryConfig) -> float:
        """Counter quantisation at both edges (one update period at the edge's power) plus
        the gain error (docs/metrics.md)."""
        mean_p = energy_j / duration_s if duration_s > 0 else 0.0
        return (counter_period_s * ((p_start if p_start is not None else mean_p)
                                    + (p_end if p_end is not None else mean_p))
                + cfg.gpu_gain_error * energy_j)

    def telemetry(self, readings: Mapping[str, Reading], slow: bool) -> dict[str, Any]:
        gpus = {}
        for g in self.gpus:
            v = readings[g.uuid].fields
            entry = {"power_w": _r3(v["power_w"]), "power_avg_w": _r3(v["power_avg_w"])}
            if "energy_mj" in v:
                entry["energy_mj"] = v["energy_mj"]
            if slow:
                entry.update(self.read_slow(g))
            gpus[g.uuid] = entry
        return gpus

    def header(self) -> dict[str, Any]:
        return {"gpus": [g.describe() for g in self.gpus]}

    @classmethod
    def telemetry_counters(cls, section: Any, component: str) -> dict[str, Any]:
        if component != "gpu":
            return {}
        return {u: v["energy_mj"] for u, v in (section or {}).items()
                if v.get("energy_mj") is not None}

    @classmethod
    def telemetry_power(cls, section: Any) -> dict[str, float | None]:
        return {u: v.get("power_w") for u, v in (section or {}).items()}

    @classmethod
    def telemetry_tracker(cls, headers: Sequence[dict[str, Any]], session: str,
                          key: str) -> CounterTracker:
        limit = None
        for h in headers:
            for g in h.get("gpus", []):
                if g.get("uuid") == key and g.get("power_limit_w"):
                    limit = 2 * g["power_limit_w"]
        return CounterTracker(1e-3, max_power_w=limit)

    def read_energy_mj(self, g: GpuInfo) -> int | None:
        if not g.energy:
            return None
        try:
            return int(self._lib.nvmlDeviceGetTotalEnergyConsumption(g.handle))
        except self._lib.NVMLError as exc:
            self._note(f"gpu/{g.uuid}/energy_mj", f"read failed: {exc}")
            return None

    def read_fast(self, g: GpuInfo, energy: bool = True) -> dict[str, Any]:
        """power_w, power_avg_w and, if `energy`, energy_mj (each None when unreadable).

        The power fields cost microseconds; the energy counter read costs ~5 ms of CPU (measured
        on H200, driver 580), so the sampler reads it at the slow cadence and at window edges.
        """
        lib = self._lib
        out: dict[str, Any] = {"power_w": None, "power_avg_w": None}
        if energy:
            out["energy_mj"] = self.read_energy_mj(g)
        try:
            if g.power_source == "field-instant":
                ids = [lib.NVML_FI_DEV_POWER_INSTANT]
                if g.power_avg:
                    ids.append(lib.NVML_FI_DEV_POWER_AVERAGE)
                fv = lib.nvmlDeviceGetFieldValues(g.handle, ids)
                out["power_w"] = _field_mw(lib, fv[0])
                if g.power_avg:
                    out["power_avg_w"] = _field_mw(lib, fv[1])
            else:
                if g.power_source == "power-usage":
                    out["power_w"] = lib.nvmlDeviceGetPowerUsage(g.handle) / 1000.0
                if g.power_avg:
                    fv = lib.nvmlDeviceGetFieldValues(g.handle, [lib.NVML_FI_DEV_POWER_AVERAGE])
                    out["power_avg_w"] = _field_mw(lib, fv[0])
        except lib.NVMLError as exc:
            self._note(f"gpu/{g.uuid}/power_w", f"read failed: {exc}")
        return out

    def read_slow(self, g: GpuInfo) -> dict[str, Any]:
        """Utilisation, memory, temperature, SM clock (None where unsupported)."""
        out: dict[str, Any] = {}
        for name in SLOW_FIELDS:
            if name == "mem_total_b":
                continue
            if not g.slow_ok.get(name):
                out[name] = None
                if name == "mem_used_b":
                    out["mem_total_b"] = None
                continue
            try:
                out.update(self._read_slow_field(g, name))
            except self._lib.NVMLError as exc:
                self._note(f"gpu/{g.uuid}/{name}", f"read failed: {exc}")
                out[name] = None
        return out

    def _read_slow_field(self, g: GpuInfo, name: str) -> dict[str, Any]:
        lib, h = self._lib, g.handle
        if name == "util_pct":
            return {name: int(lib.nvmlDeviceGetUtilizationRates(h).gpu)}
        if name == "mem_used_b":
            m = lib.nvmlDeviceGetMemoryInfo(h)
            return {"mem_used_b": int(m.used), "mem_total_b": int(m.total)}
        if name == "temp_c":
            return {name: int(lib.nvmlDeviceGetTemperature(h, lib.NVML_TEMPERATURE_GPU))}
        if name == "sm_clock_mhz":
            return {name: int(lib.nvmlDeviceGetClockInfo(h, lib.NVML_CLOCK_SM))}
        raise KeyError(name)

    def _note(self, key: str, reason: str) -> None:
        if self.unavailable.get(key) != reason:
            self.unavailable[key] = reason
            log.warning("%s: %s", key, reason)

    def close(self) -> None:
        if self._open:
            try:
                self._lib.nvmlShutdown()
            except Exception as exc:  # noqa: BLE001 - after a lost GPU; harmless
                log.debug("nvmlShutdown: %s", exc)
            self._open = False


def _r3(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _field_error(lib: Any, fv: Any) -> str | None:
    if fv.nvmlReturn == 0:
        return None
    try:
        return str(lib.NVMLError(fv.nvmlReturn))
    except Exception:  # noqa: BLE001 - an error code the binding does not know
        return f"NVML error {fv.nvmlReturn}"


def _field_mw(lib: Any, fv: Any) -> float | None:
    """A power field value (mW) in W; None if NVML flagged this field as failed."""
    if fv.nvmlReturn != 0:
        return None
    return float(getattr(fv.value, _VALUE_ATTR.get(int(fv.valueType), "uiVal"))) / 1000.0


