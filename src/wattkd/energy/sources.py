"""Energy and utilisation sources: NVML (GPU), RAPL powercap (CPU package, DRAM), psutil (CPU).

Each source reports only what it can read. A field it cannot read is `None`, and the reason is
kept once in `unavailable` (key -> reason) so the sampler can write it to the telemetry header
instead of repeating it on every line. Nothing here ever invents a value.

Counters are the primary energy figures; `CounterTracker` turns raw counter reads into a
monotonic total: a RAPL counter wraps at `max_energy_range_uj`, an NVML counter only decreases
when the driver reloads (a reset), and neither ever yields negative energy.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Used only where the power limit is unknown: the highest board power we treat as plausible
# when deciding whether a post-reset counter value can be trusted (H200 SXM: 700 W).
_PLAUSIBLE_MAX_W = 1500.0


# ------------------------------------------------------------------------------ counters
class CounterTracker:
    """Monotonic energy total (J) from a raw cumulative counter, with a plausibility check.

    `wrap` (raw units) is the RAPL `max_energy_range_uj`: a decrease is a wrap-around. Without
    `wrap` (NVML) a decrease is a counter reset (driver reload): the post-reset value is counted
    only when it is physically possible within the elapsed interval (<= `max_power_w` x dt),
    otherwise that interval counts 0 and `resets` records the event.

    Glitches (one bad read) are excluded and counted in `glitches`, never as energy:
      * a negative raw value;
      * an increase above `max_power_w` x (dt + SLACK_S), more than the device can draw: never
        counted. If the next read continues from the old level, the high read was the glitch;
        if it continues from the high one, the old level was (a bad first read, say 0) and
        the count goes on from the new level;
      * a drop that the next read undoes (back at or above the level before the drop). A drop
        is counted as a reset at once (a window edge may need the figure now) and taken back
        when the next read shows it was a glitch. A real reset restarts near 0 and keeps
        rising, so it stays a reset.
    Never negative.
    """

    # counter update period (NVML ~0.1 s) plus scheduling jitter: an edge read just after an
    # update may carry a whole period of energy in a tiny dt; only gross glitches are caught
    SLACK_S = 1.0

    def __init__(self, scale_j: float, *, wrap: int | None = None,
                 max_power_w: float | None = None) -> None:
        self.scale_j = scale_j
        self.wrap = wrap
        self.max_power_w = max_power_w or _PLAUSIBLE_MAX_W
        self.total_j = 0.0
        self.resets = 0
        self.wraps = 0
        self.glitches = 0
        self.last_raw: int | None = None
        self.last_t: float | None = None
        # a drop counted as a reset: (raw level before it, its time, joules counted)
        self._drop: tuple[int, float, float] | None = None
        self._spike: tuple[int, float] | None = None     # an implausible high read, raw and t

    @property
    def suspect(self) -> bool:
        """The last read is a drop or a spike the next read will judge (read again to know)."""
        return self._drop is not None or self._spike is not None

    def _plausible(self, joules: float, dt: float) -> bool:
        return joules <= self.max_power_w * (max(dt, 0.0) + self.SLACK_S)

    def update(self, raw: int | None, t: float) -> float:
        """Feed one read taken at monotonic time `t`; return the energy (J) it added (negative
        only when it takes back what a glitch drop had counted as a reset)."""
        if raw is None:
            return 0.0
        if raw < 0:
            self._glitch(raw, "negative")
            return 0.0
        if self.last_raw is None:
            self.last_raw, self.last_t = raw, t
            return 0.0
        drop, self._drop = self._drop, None
        spike, self._spike = self._spike, None
        if drop is not None and not self.wrap and raw >= drop[0] \
                and self._plausible((raw - drop[0]) * self.scale_j, t - drop[1]):
            before, _, counted = drop   # the drop was one bad read: undo its reset
            self.resets -= 1
            self.glitches += 1
            log.warning("energy counter read %d was a glitch (back to %d): excluded",
                        self.last_raw, raw)
            added = (raw - before) * self.scale_j - counted
            self.total_j += added
            self.last_raw, self.last_t = raw, t
            return added
        dt = max(t - self.last_t, 0.0) if self.last_t is not None else 0.0
        diff = raw - self.last_raw
        if diff < 0:
            if self.wrap:
                diff += self.wrap
                self.wraps += 1
            else:
                self.resets += 1
                diff = raw if raw * self.scale_j <= self.max_power_w * dt else 0
                log.warning("energy counter decreased (%d -> %d): counter reset; %s", self.last_raw,
                            raw, "counting the post-reset value" if diff else
                            "the interval is not counted")
                self._drop = (self.last_raw, self.last_t if self.last_t is not None else t,
                              diff * self.scale_j)
        elif not self._plausible(diff * self.scale_j, dt):
            if spike is not None and raw >= spike[0] and \
                    self._plausible((raw - spike[0]) * self.scale_j, t - spike[1]):
                # continues from the high read: the old level was the bad read
                log.warning("energy counter level %d was the glitch (the reads continue "
                            "from %d): counting from there", self.last_raw, spike[0])
                added = (raw - spike[0]) * self.scale_j
                self.total_j += added
                self.last_raw, self.last_t = raw, t
                return added
            self._glitch(raw, f"increase above {self.max_power_w:g} W x {dt:.3g} s")
            self._spike = (raw, t)
            return 0.0
        self.last_raw, self.last_t = raw, t
        added = max(diff, 0) * self.scale_j
        self.total_j += added
        return added

    def _glitch(self, raw: int, why: str) -> None:
        self.glitches += 1
        log.warning("energy counter read %d excluded as a glitch (%s; last good %s)", raw, why,
                    self.last_raw)


class PowerIntegrator:
    """Trapezoid integral of power samples (W) over monotonic time: the cross-check figure."""

    def __init__(self) -> None:
        self.joules = 0.0
        self.samples = 0
        self._last: tuple[float, float] | None = None

    def add(self, t: float, watts: float | None) -> None:
        if watts is None:
            return
        if self._last is not None and t > self._last[0]:
            self.joules += 0.5 * (watts + self._last[1]) * (t - self._last[0])
        self._last = (t, watts)
        self.samples += 1


# ---------------------------------------------------------------------------------- NVML
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
                "energy_source": "nvml-counter" if self.energy else "unavailable",
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
    import pynvml  # provided by nvidia-ml-py

    return pynvml


class NvmlSource:
    """NVIDIA GPUs via NVML. `lib` is the pynvml module, or a simulated one in tests.

    GPUs are those CUDA would show this process (CUDA_VISIBLE_DEVICES indices, GPU-/MIG- UUIDs
    and UUID prefixes; like CUDA, an invalid entry hides itself and every entry after it).
    A MIG instance is metered through its parent GPU, whose counter covers every instance.
    """

    def __init__(self, lib: Any = None, visible: str | None | bool = True) -> None:
        self._lib = lib
        self._visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is True else visible
        self.gpus: list[GpuInfo] = []
        self.unavailable: dict[str, str] = {}
        self.reason: str | None = None   # why there is no GPU at all
        self.driver: str | None = None
        self._open = False

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

    # ---- reads
    @property
    def available(self) -> bool:
        return bool(self.gpus)

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


# ---------------------------------------------------------------------------------- RAPL
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


class RaplSource:
    """CPU package and DRAM energy from /sys/class/powercap (Intel, and AMD via intel-rapl).

    Only top-level `package-N` zones and their `dram` subzones are read: core/uncore are
    nested inside the package, `psys` covers the whole platform and `intel-rapl-mmio` repeats
    the package through another interface; counting any of them would double count.
    """

    def __init__(self, root: str | Path = "/sys/class/powercap") -> None:
        self.root = Path(root)
        self.zones: list[RaplZone] = []
        self.reason: str | None = None
        self.unavailable: dict[str, str] = {}
        self.skipped: dict[str, str] = {}

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
        return self

    @property
    def available(self) -> bool:
        return bool(self.zones)

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


# ----------------------------------------------------------------------------------- CPU
class CpuSource:
    """CPU utilisation and RAM (node-wide) and this process tree's CPU time, via psutil.

    Every call is non-blocking: cpu_percent(interval=None) compares with the previous call.
    """

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._proc = psutil.Process()
        psutil.cpu_percent(interval=None)  # prime: the first call has no reference point

    def read_slow(self) -> dict[str, Any]:
        vm = self._psutil.virtual_memory()
        return {"util_pct": self._psutil.cpu_percent(interval=None),
                "ram_used_b": int(vm.total - vm.available), "ram_total_b": int(vm.total)}

    def process_cpu_seconds(self) -> float:
        """User+system CPU seconds of this process and its children (live and reaped)."""
        total = _cpu_s(self._proc)
        try:
            children = self._proc.children(recursive=True)
        except self._psutil.Error:
            children = []
        for child in children:
            try:
                total += _cpu_s(child)
            except self._psutil.Error:  # exited between listing and reading
                pass
        return total


def _cpu_s(p: Any) -> float:
    t = p.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def now() -> tuple[float, float]:
    """(monotonic, wall) timestamps taken together."""
    return time.monotonic(), time.time()
