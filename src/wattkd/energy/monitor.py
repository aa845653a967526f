"""Background sampler: reads the energy sources on a fixed cadence and writes telemetry JSONL.

Power and cheap counters (RAPL) are read every `interval` (10 Hz by default); costly counters
(NVML's energy counter, this process's CPU time) and the slow fields (utilisation, memory,
temperature, clocks, CPU, RAM) every `slow_interval` (~1 Hz). The counter is cumulative, so reading it less often loses no energy,
while one read costs ~5 ms of CPU (H200, driver 580: the power fields cost ~2 us); window edges
read it directly. Each line is
flushed as it is written, so a crash loses at most the last line. The same object keeps the
running energy totals (each source's tracker, `PowerIntegrator`) that the phase ledger reads at window
edges through `read_now()`: one lock covers every counter read and its bookkeeping, so the
sampler thread and an edge read can never interleave and fake a counter decrease.

Telemetry file format (schema 1), one JSON object per line, `type` says which (each source
with a TELEMETRY_KEY writes its own header entries and sample section; NVML and RAPL shown):
  header  {"schema":1,"type":"header","host","session","t_wall","t_mono","interval_s",
           "slow_interval_s","gpus":[{"uuid","index","cuda_index","name","mig","energy_source",
           "power_source","power_avg","power_limit_w"}],"rapl":[{"zone","kind","max_range_uj"}],
           "unavailable":{key: reason},"versions":{...}}
  sample  {"schema":1,"type":"sample","host","session","t_wall","t_mono","slow":bool,
           "gpu":{uuid:{"power_w","power_avg_w" [+ slow: "energy_mj","util_pct",
                        "mem_used_b","mem_total_b","temp_c","sm_clock_mhz"]}},
           "rapl":{zone: energy_uj}, [slow: "cpu":{"util_pct","ram_used_b","ram_total_b"}]}
  note    {"schema":1,"type":"note","host","session","t_wall","key","reason"}  (a field that
           became unreadable later; the reason is written once, the value is null)
  footer  {"schema":1,"type":"footer","host","session","t_wall","samples","sampler_cpu_s",
           "reason"}  (clean stop only)
`energy_mj` is the raw NVML total-energy counter (mJ since driver load), `energy_uj` the raw
RAPL counter; readers turn them into energy with reset/wrap handling. `power_w` is NVML's
instant power field where supported (header power_source "field-instant"), else
nvmlDeviceGetPowerUsage ("power-usage", a 1 s average on Hopper). Missing values are null.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import uuid as _uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from wattkd.energy import versions
from wattkd.energy.counters import CounterTracker, LevelCounter, PowerIntegrator
from wattkd.energy.source import Device, EnergySource, Reading
from wattkd.energy.sources import CpuSource, discover

log = logging.getLogger(__name__)

SCHEMA = 1


def host_name() -> str:
    """This node's short name, safe as a file name."""
    name = socket.gethostname().split(".")[0] or "localhost"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def device_id(src: EnergySource, dev: Device) -> str:
    """A device's key in a Snapshot: unique across sources."""
    return f"{src.LABEL}:{dev.key}"


@dataclass
class Snapshot:
    """Running totals at one instant (monotonic time `t_mono`), per device (`device_id`).
    Energies in J since start; None where the device's counter has not been read."""

    t_mono: float
    t_wall: float
    energy_j: dict[str, float | None] = field(default_factory=dict)
    power_w: dict[str, float | None] = field(default_factory=dict)
    integrated_j: dict[str, float | None] = field(default_factory=dict)
    power_samples: dict[str, int] = field(default_factory=dict)
    resets: dict[str, int] = field(default_factory=dict)
    glitches: dict[str, int] = field(default_factory=dict)
    suspect: bool = False        # a counter's last read awaits the next one's judgement


class _DeviceState:
    """The sampler's running totals of one device."""

    def __init__(self, src: EnergySource, dev: Device) -> None:
        self.dev = dev
        self.tracker: CounterTracker | LevelCounter = src.tracker(dev)
        self.power: float | None = None
        self.integrator = PowerIntegrator()

    def add(self, r: Reading) -> None:
        self.tracker.update(r.counter, r.t)
        self.power = r.power_w
        self.integrator.add(r.t, r.power_w)


class Sampler:
    """Reads the energy sources in a daemon thread; optionally writes telemetry JSONL.

    Every tick reads the sources with power or a cheap counter; a source's costly counter
    (NVML's, this process's CPU time) is read on slow ticks and at edge reads (`read_now`), so
    `snapshot()` stays a cheap, lock-and-copy call. `stats` adds the node's CPU utilisation and
    RAM to slow samples. Sources that are not available only contribute their reasons.
    """

    def __init__(self, sources: Sequence[EnergySource], *, stats: CpuSource | None = None,
                 host: str | None = None, interval: float = 0.1, slow_interval: float = 1.0,
                 output: Path | None = None) -> None:
        if interval <= 0 or slow_interval <= 0:
            raise ValueError(f"sampler intervals must be > 0 s (got interval={interval}, "
                             f"slow_interval={slow_interval})")
        self.sources_given = list(sources)
        self.sources = [s for s in self.sources_given if s.available]
        self.stats = stats
        self.host = host or host_name()
        self.session = _uuid.uuid4().hex[:12]
        self.has_fast = any(s.POWER or s.COUNTER_EVERY_TICK for s in self.sources)
        self.interval = interval if self.has_fast else slow_interval
        self.slow_interval = max(slow_interval, self.interval)
        self.output = output
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fh: TextIO | None = None
        self._reported: dict[str, str] = {}
        self.samples = 0
        self.late_ticks = 0
        self.cpu_s = 0.0          # the sampler thread's own CPU time
        self.write_error: str | None = None
        self._state = {device_id(s, d): _DeviceState(s, d) for s in self.sources
                       for d in s.devices}

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        if self.output is not None:
            try:
                self.output.parent.mkdir(parents=True, exist_ok=True)
                ensure_trailing_newline(self.output)
                self._fh = open(self.output, "a", encoding="utf-8")  # noqa: SIM115 (stream)
            except OSError as exc:  # full / read-only disk: meter in memory, say so once
                self.write_error = str(exc)
                log.error("telemetry file %s: cannot open (%s); samples are not written",
                          self.output, exc)
            self._write(self._header())
        self.read_now()  # first reference point for every counter
        self._thread = threading.Thread(target=self._run, name="wattkd-sampler", daemon=True)
        self._thread.start()

    def stop(self, reason: str = "stopped") -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self._thread = None
        if self._fh is not None:
            self._write({"schema": SCHEMA, "type": "footer", "host": self.host,
                         "session": self.session, "t_wall": round(time.time(), 4),
                         "samples": self.samples, "sampler_cpu_s": round(self.cpu_s, 4),
                         "reason": reason})
            self._fh.close()
            self._fh = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stop is requested (True) or `timeout` passes (False)."""
        return self._stop.wait(timeout)

    def request_stop(self) -> None:
        self._stop.set()

    # ---------------------------------------------------------------- reads
    def read_now(self) -> Snapshot:
        """Read every counter now (an edge read), update the totals, return a snapshot."""
        with self._lock:
            self._read(energy=True, fast_only=False)
            return self._snapshot_locked()

    def snapshot(self) -> Snapshot:
        """Totals as of the last read, without touching the hardware (cheap)."""
        with self._lock:
            return self._snapshot_locked()

    def _snapshot_locked(self) -> Snapshot:
        s = Snapshot(time.monotonic(), time.time())
        for i, st in self._state.items():
            tr = st.tracker
            s.energy_j[i] = tr.total_j if st.dev.counter and tr.last_raw is not None else None
            s.resets[i] = tr.resets
            s.glitches[i] = tr.glitches
            s.suspect = s.suspect or tr.suspect
            s.power_w[i] = st.power
            s.integrated_j[i] = st.integrator.joules if st.integrator.samples else None
            s.power_samples[i] = st.integrator.samples
        if self._last_t is not None:
            s.t_mono, s.t_wall = self._last_t
        return s

    _last_t: tuple[float, float] | None = None

    def _read(self, energy: bool, fast_only: bool) -> dict[int, dict[str, Reading]]:
        """Caller holds the lock. Reads the sources (on a fast tick only those with power or a
        cheap counter; costly counters only when `energy`); returns the readings by source."""
        out: dict[int, dict[str, Reading]] = {}
        for n, src in enumerate(self.sources):
            if fast_only and not (src.POWER or src.COUNTER_EVERY_TICK):
                continue
            readings = src.sample(energy=energy or src.COUNTER_EVERY_TICK)
            for key, r in readings.items():
                self._state[f"{src.LABEL}:{key}"].add(r)
            out[n] = readings
        self._last_t = (time.monotonic(), time.time())
        return out

    # ---------------------------------------------------------------- thread
    def _run(self) -> None:
        cpu0 = time.thread_time()
        next_fast = next_slow = time.monotonic()
        while not self._stop.is_set():
            t = time.monotonic()
            slow = t >= next_slow
            try:
                self._tick(slow)
            except Exception:  # a sampler must never take the job down
                log.exception("telemetry sampler tick failed")
            self.cpu_s = time.thread_time() - cpu0
            next_fast += self.interval
            if slow:
                next_slow += self.slow_interval
            t = time.monotonic()
            if next_fast < t:  # fell behind (slow NVML call, loaded host): skip, do not burst
                self.late_ticks += 1
                next_fast = t + self.interval
            if next_slow < t:
                next_slow = t + self.slow_interval
            self._stop.wait(max(0.0, min(next_fast, next_slow) - time.monotonic()))
        self.cpu_s = time.thread_time() - cpu0

    def _tick(self, slow: bool) -> None:
        with self._lock:
            readings = self._read(energy=slow, fast_only=not slow)
            t_mono, t_wall = self._last_t or (time.monotonic(), time.time())
        line: dict[str, Any] = {"schema": SCHEMA, "type": "sample", "host": self.host,
                                "session": self.session, "t_wall": round(t_wall, 4),
                                "t_mono": round(t_mono, 4), "slow": slow}
        for src in self.sources_given:
            if src.TELEMETRY_KEY:
                n = self.sources.index(src) if src in self.sources else -1
                line[src.TELEMETRY_KEY] = src.telemetry(readings.get(n, {}), slow)
        if slow and self.stats is not None:
            line["cpu"] = self.stats.read_slow()
        self.samples += 1
        if self._fh is not None:
            self._write_notes()
            self._write(line)

    # ---------------------------------------------------------------- file
    def unavailable(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for src in self.sources_given:
            if not src.TELEMETRY_KEY:
                continue
            if src.reason:
                out[src.TELEMETRY_KEY] = src.reason
            out.update(src.unavailable)
        return out

    def _header(self) -> dict[str, Any]:
        unavailable = self.unavailable()
        self._reported.update(unavailable)
        head: dict[str, Any] = {
            "schema": SCHEMA, "type": "header", "host": self.host, "session": self.session,
            "t_wall": round(time.time(), 4), "t_mono": round(time.monotonic(), 4),
            "interval_s": self.interval, "slow_interval_s": self.slow_interval}
        for src in self.sources_given:
            if src.TELEMETRY_KEY:
                head.update(src.header())
        driver = next((s.driver for s in self.sources if s.driver), None)
        head.update(unavailable=unavailable, versions=versions(driver))
        return head

    def _write_notes(self) -> None:
        for key, reason in self.unavailable().items():
            if self._reported.get(key) != reason:
                self._reported[key] = reason
                self._write({"schema": SCHEMA, "type": "note", "host": self.host,
                             "session": self.session, "t_wall": round(time.time(), 4),
                             "key": key, "reason": reason})

    def _write(self, obj: dict[str, Any]) -> None:
        if self._fh is None or self.write_error:
            return
        try:
            self._fh.write(json.dumps(obj, separators=(",", ":")) + "\n")
            self._fh.flush()
        except OSError as exc:  # disk full: keep metering in memory, say so once
            self.write_error = str(exc)
            log.error("telemetry file %s: write failed (%s); further samples are not written",
                      self.output, exc)


def ensure_trailing_newline(path: Path) -> None:
    """Before appending to a JSONL file a crash may have cut mid-line: end that line first."""
    try:
        with open(path, "rb+") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
    except FileNotFoundError:
        return


def run_monitor(output: Path, interval: float, slow_interval: float,
                duration: float | None, *, nvml_lib: Any = None,
                powercap_root: str | Path | None = None) -> None:
    """`wattkd monitor`: sample until `duration` s pass, or SIGINT/SIGTERM; then stop cleanly."""
    output = Path(output)
    if interval <= 0 or slow_interval <= 0:
        raise ValueError(f"interval and slow_interval must be > 0 s (got {interval}, "
                         f"{slow_interval})")
    if duration is not None and duration <= 0:
        raise ValueError(f"duration must be > 0 s or None (got {duration})")
    if output.exists() and output.is_dir():
        raise ValueError(f"monitor output {output} is a directory; expected a .jsonl file path")
    sources = discover(None, {"nvml_lib": nvml_lib, "powercap_root": powercap_root})
    sampler = Sampler(sources, stats=CpuSource(), interval=interval,
                      slow_interval=slow_interval, output=output)
    got: list[str] = []

    def on_signal(signum: int, _frame: Any) -> None:
        got.append(signal.Signals(signum).name)
        sampler.request_stop()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        sampler.start()
        log.info("monitor: writing %s every %.3g s (slow fields every %.3g s)%s", output,
                 sampler.interval, sampler.slow_interval,
                 f" for {duration:g} s" if duration else "; Ctrl-C to stop")
        sampler.wait(duration)
    finally:
        sampler.stop(reason=got[0] if got else "stopped")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for src in sources:
            src.close()
    log.info("monitor: %d samples, sampler CPU %.3f s, %d late ticks", sampler.samples,
             sampler.cpu_s, sampler.late_ticks)
