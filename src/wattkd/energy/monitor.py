"""Background sampler: reads the sources on a fixed cadence and writes telemetry JSONL.

GPU power and RAPL counters are read every `interval` (10 Hz by default); the NVML energy
counter and the slow fields (utilisation, memory, temperature, clocks, CPU, RAM) every
`slow_interval` (~1 Hz). The counter is cumulative, so reading it less often loses no energy,
while one read costs ~5 ms of CPU (H200, driver 580: the power fields cost ~2 us); window edges
read it directly. Each line is
flushed as it is written, so a crash loses at most the last line. The same object keeps the
running energy totals (`CounterTracker`, `PowerIntegrator`) that the phase ledger reads at window
edges through `read_now()`: one lock covers every counter read and its bookkeeping, so the
sampler thread and an edge read can never interleave and fake a counter decrease.

Telemetry file format (schema 1), one JSON object per line, `type` says which:
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from wattkd.energy.sources import (
    CounterTracker,
    CpuSource,
    NvmlSource,
    PowerIntegrator,
    RaplSource,
)

log = logging.getLogger(__name__)

SCHEMA = 1


def host_name() -> str:
    """This node's short name, safe as a file name."""
    name = socket.gethostname().split(".")[0] or "localhost"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


@dataclass
class Snapshot:
    """Running totals at one instant (monotonic time `t_mono`). Energies in J since start."""

    t_mono: float
    t_wall: float
    gpu_j: dict[str, float | None] = field(default_factory=dict)
    gpu_power_w: dict[str, float | None] = field(default_factory=dict)
    gpu_int_j: dict[str, float | None] = field(default_factory=dict)
    gpu_power_samples: dict[str, int] = field(default_factory=dict)
    gpu_resets: dict[str, int] = field(default_factory=dict)
    gpu_glitches: dict[str, int] = field(default_factory=dict)
    suspect: bool = False        # a counter's last read awaits the next one's judgement
    rapl_j: dict[str, float | None] = field(default_factory=dict)
    cpu_s: float | None = None


class Sampler:
    """Reads the sources in a daemon thread; optionally writes telemetry JSONL.

    `track_cpu_time` makes slow ticks also read this process tree's CPU time (used for the
    `estimated` CPU figure), so `snapshot()` stays a cheap, lock-and-copy call.
    """

    def __init__(self, nvml: NvmlSource | None, rapl: RaplSource | None,
                 cpu: CpuSource | None, *, host: str | None = None, interval: float = 0.1,
                 slow_interval: float = 1.0, output: Path | None = None,
                 track_cpu_time: bool = False) -> None:
        if interval <= 0 or slow_interval <= 0:
            raise ValueError(f"sampler intervals must be > 0 s (got interval={interval}, "
                             f"slow_interval={slow_interval})")
        self._sources_given = [x for x in (nvml, rapl) if x is not None]
        self.nvml = nvml if nvml is not None and nvml.available else None
        self.rapl = rapl if rapl is not None and rapl.available else None
        self.cpu = cpu
        self.host = host or host_name()
        self.session = _uuid.uuid4().hex[:12]
        self.has_fast = self.nvml is not None or self.rapl is not None
        self.interval = interval if self.has_fast else slow_interval
        self.slow_interval = max(slow_interval, self.interval)
        self.output = output
        self.track_cpu_time = track_cpu_time and cpu is not None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fh: TextIO | None = None
        self._reported: dict[str, str] = {}
        self.samples = 0
        self.late_ticks = 0
        self.cpu_s = 0.0          # the sampler thread's own CPU time
        self.write_error: str | None = None
        gpus = self.nvml.gpus if self.nvml else []
        self._gpu_trackers = {g.uuid: CounterTracker(
            1e-3, max_power_w=2 * g.power_limit_w if g.power_limit_w else None) for g in gpus}
        self._gpu_power: dict[str, float | None] = {g.uuid: None for g in gpus}
        self._gpu_integrators = {g.uuid: PowerIntegrator() for g in gpus}
        zones = self.rapl.zones if self.rapl else []
        self._rapl_trackers = {z.name: CounterTracker(1e-6, wrap=z.max_range_uj or None)
                               for z in zones}
        self._cpu_s: float | None = None

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
            self._read_fast()
            if self.track_cpu_time:
                self._cpu_s = self.cpu.process_cpu_seconds()
            return self._snapshot_locked()

    def snapshot(self) -> Snapshot:
        """Totals as of the last read, without touching the hardware (cheap)."""
        with self._lock:
            return self._snapshot_locked()

    def _snapshot_locked(self) -> Snapshot:
        t_mono, t_wall = time.monotonic(), time.time()
        s = Snapshot(t_mono, t_wall, cpu_s=self._cpu_s)
        gpus = self.nvml.gpus if self.nvml else []
        for g in gpus:
            tr = self._gpu_trackers[g.uuid]
            s.gpu_j[g.uuid] = tr.total_j if g.energy and tr.last_raw is not None else None
            s.gpu_resets[g.uuid] = tr.resets
            s.gpu_glitches[g.uuid] = tr.glitches
            s.suspect = s.suspect or tr.suspect
            s.gpu_power_w[g.uuid] = self._gpu_power[g.uuid]
            integ = self._gpu_integrators[g.uuid]
            s.gpu_int_j[g.uuid] = integ.joules if integ.samples else None
            s.gpu_power_samples[g.uuid] = integ.samples
        for name, tr in self._rapl_trackers.items():
            s.rapl_j[name] = tr.total_j if tr.last_raw is not None else None
        if self._last_t is not None:
            s.t_mono, s.t_wall = self._last_t
        return s

    _last_t: tuple[float, float] | None = None

    def _read_fast(self, energy: bool = True) -> dict[str, Any]:
        """Caller holds the lock. Returns the raw values for the telemetry line."""
        gpu: dict[str, Any] = {}
        rapl: dict[str, Any] = {}
        if self.nvml:
            for g in self.nvml.gpus:
                v = self.nvml.read_fast(g, energy=energy)
                t = time.monotonic()
                if energy:
                    self._gpu_trackers[g.uuid].update(v["energy_mj"], t)
                self._gpu_power[g.uuid] = v["power_w"]
                self._gpu_integrators[g.uuid].add(t, v["power_w"])
                gpu[g.uuid] = v
        if self.rapl:
            t = time.monotonic()
            raw = self.rapl.read()
            for name, value in raw.items():
                self._rapl_trackers[name].update(value, t)
            rapl = raw
        self._last_t = (time.monotonic(), time.time())
        return {"gpu": gpu, "rapl": rapl}

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
            if self.has_fast:
                raw = self._read_fast(energy=slow)
            else:
                raw = {"gpu": {}, "rapl": {}}
                self._last_t = (time.monotonic(), time.time())
            t_mono, t_wall = self._last_t or (time.monotonic(), time.time())
            if slow and self.track_cpu_time:
                self._cpu_s = self.cpu.process_cpu_seconds()
        line: dict[str, Any] = {"schema": SCHEMA, "type": "sample", "host": self.host,
                                "session": self.session, "t_wall": round(t_wall, 4),
                                "t_mono": round(t_mono, 4), "slow": slow}
        gpus = {}
        for g in self.nvml.gpus if self.nvml else []:
            v = raw["gpu"][g.uuid]
            entry = {"power_w": _r(v["power_w"]), "power_avg_w": _r(v["power_avg_w"])}
            if "energy_mj" in v:
                entry["energy_mj"] = v["energy_mj"]
            if slow:
                entry.update(self.nvml.read_slow(g))
            gpus[g.uuid] = entry
        line["gpu"] = gpus
        line["rapl"] = raw["rapl"]
        if slow and self.cpu is not None:
            line["cpu"] = self.cpu.read_slow()
        self.samples += 1
        if self._fh is not None:
            self._write_notes()
            self._write(line)

    # ---------------------------------------------------------------- file
    def unavailable(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for src in self._sources_given:
            if src.reason:
                out["gpu" if isinstance(src, NvmlSource) else "rapl"] = src.reason
            out.update(src.unavailable)
        return out

    def _header(self) -> dict[str, Any]:
        from wattkd.energy import versions

        unavailable = self.unavailable()
        self._reported.update(unavailable)
        return {"schema": SCHEMA, "type": "header", "host": self.host, "session": self.session,
                "t_wall": round(time.time(), 4), "t_mono": round(time.monotonic(), 4),
                "interval_s": self.interval, "slow_interval_s": self.slow_interval,
                "gpus": [g.describe() for g in (self.nvml.gpus if self.nvml else [])],
                "rapl": [{"zone": z.name, "kind": z.kind, "max_range_uj": z.max_range_uj}
                         for z in (self.rapl.zones if self.rapl else [])],
                "unavailable": unavailable, "versions": versions(
                    self.nvml.driver if self.nvml else None)}

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


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


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


def open_sources(*, cpu: bool = True, nvml_lib: Any = None,
                 rapl_root: str | Path | None = None
                 ) -> tuple[NvmlSource, RaplSource, CpuSource | None]:
    """Open NVML, RAPL and psutil sources; log one line on what is (not) available."""
    nvml = NvmlSource(nvml_lib).open()
    rapl = RaplSource(rapl_root or os.environ.get("WATTKD_POWERCAP_ROOT",
                                                  "/sys/class/powercap")).open()
    cpu_src = CpuSource() if cpu else None
    log.info("energy counters: GPU %s; CPU %s (without RAPL, CPU energy is `estimated` "
             "from CPU time only if telemetry.cpu_watts_per_core is set)",
             f"{len(nvml.gpus)} x NVML" if nvml.available else f"unavailable ({nvml.reason})",
             f"RAPL {[z.name for z in rapl.zones]}" if rapl.available
             else f"unavailable ({rapl.reason})")
    return nvml, rapl, cpu_src


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
    nvml, rapl, cpu = open_sources(nvml_lib=nvml_lib, rapl_root=powercap_root)
    sampler = Sampler(nvml, rapl, cpu, interval=interval, slow_interval=slow_interval,
                      output=output)
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
        nvml.close()
    log.info("monitor: %d samples, sampler CPU %.3f s, %d late ticks", sampler.samples,
             sampler.cpu_s, sampler.late_ticks)
