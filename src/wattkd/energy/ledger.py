"""Phase ledger: named, nestable energy windows around the stages of a run -> phases.jsonl.

    meter = make_meter(cfg.telemetry, run_dir)
    with meter:                                   # starts the sampler, measures idle power
        with meter.phase("train", tokens=0) as w:
            ...; w.add_tokens(n)
        meter.energy_j()                          # metered so far (energy budgets)

Each window reads every counter at both edges (after torch.cuda.synchronize when CUDA is in
use), so its energy is a counter difference, not a sum of power samples. The integrated power
samples of the same window are recorded beside it as a cross-check.

One meter per node: in a multi-process job only local rank 0 (LOCAL_RANK / SLURM_LOCALID) reads
the hardware, for every GPU visible to it; other local ranks get records flagged
`not-metered-here` and `energy_j()` returns None there (broadcast rank 0's value if needed).

phases.jsonl (schema 2): one JSON object per line, appended with a single write. A window is
on disk from the moment it opens: a `begin` record, `progress` records while it is open (every
telemetry.progress_every_s from a timer thread, and whenever the caller says so with
`meter.progress("checkpoint")`), then its end record (kinds below). A window whose session died
has no end record: `energy.recovery` closes it at its last progress record or telemetry sample
(`status: recovered`, the unmeasured tail inside its uncertainty), on read and when the next
session on the host starts. Schema-1 ledgers (end records only) still read.
  begin     {"schema": 2, "kind": "begin", "window": "phase" | "run", "phase", "seq", "depth",
             "parent", "host", "session", "pid", "start_wall", "tokens", "source",
             "progress_every_s", "interval_s", "slow_interval_s", "counter_period_s", "flags",
             "notes", "meta"}
  progress  {"schema": 2, "kind": "progress", "window", "phase", "seq", "host", "session",
             "t_wall", "duration_s", "tokens" (so far), "reason": "timer" | "checkpoint" | ...,
             "energy_j", "source", "estimated", "uncertainty_j"}  (cumulative since begin)
  end       {"schema": 2, "kind": "phase" | "run" | "idle", "phase": name, "seq": n (per meter session),
   "depth": 0 for top level, "parent": name | null, "host", "session", "start_wall", "end_wall",
   "duration_s", "tokens", "status": "ok" | "error",
   "energy_j":      {"gpu": J|null, "cpu": J|null, "dram": J|null [, "node": J|null, ...]},
                    (the core three always; another component, e.g. `node`, only in sessions
                     where a source measures it: energy.components)
   "source":        {component: the LABEL of the source(s) that measured it ("nvml-counter",
                     "rapl", "estimated-cpu-time", several joined by "+") | "unavailable"},
   "estimated": true if any component is an estimate,
   "uncertainty_j": {"gpu": J|null, "cpu": null, "dram": null}  (null: not characterised),
   "dynamic_energy_j": {component: energy - idle power x duration | null},
   "per_gpu": {uuid: {"index", "cuda_index", "name", "mig", "energy_j", "uncertainty_j",
                      "integrated_power_j", "power_samples", "resets"}},
   "idle_power_w": {"gpu", "cpu", "dram", "per_gpu", "window_s", "source"},
   "integrated_power_j": {"gpu": J|null, "power_source", "samples", "ratio": integrated/counter,
                          "diff_j": counter - integrated},
   "counter_period_s", "counter_period_source", "flags": [str], "notes": [str], "meta": {...}}
`kind: run` covers start() (after the idle window) to stop(); `kind: idle` is the idle window.
GPU uncertainty = sum over GPUs of counter_period x (power at start + power at end)
+ gpu_gain_error x energy. CPU energy is `estimated-cpu-time` = this process tree's CPU seconds
x telemetry.cpu_watts_per_core, and only where no RAPL counter exists and the user enabled it.
Flags: short-window, high-uncertainty, counter-reset, counter-glitch, partial-gpu, mig-shared-counter,
estimated-cpu, counter-power-mismatch, no-power-samples, error:<Exception>, not-metered-here,
telemetry-disabled.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import statistics
import sys
import threading
import time
import uuid as _uuid
from collections.abc import Mapping
from itertools import pairwise
from pathlib import Path
from types import TracebackType
from typing import Any

from wattkd.config import TelemetryConfig
from wattkd.energy.components import CORE, record_components, total_j
from wattkd.energy.monitor import (
    Sampler,
    Snapshot,
    device_id,
    ensure_trailing_newline,
    host_name,
)
from wattkd.energy.recovery import close_dead_windows
from wattkd.energy.source import UNAVAILABLE, Device, EnergySource
from wattkd.energy.sources import CpuSource, discover

log = logging.getLogger(__name__)

SCHEMA = 2
# Counter update period used when the idle window is too short to measure it: the published
# period of the first source that has one (NVML: ~100 ms on H200, docs/metrics.md).
DEFAULT_COUNTER_PERIOD_S = 0.1
MISMATCH_TOLERANCE = 0.2      # |integrated/counter - 1| above this is flagged
HIGH_UNCERTAINTY = 0.1        # uncertainty/energy above this is flagged


def _is_node_leader() -> bool:
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = os.environ.get(var)
        if value is not None and value.strip().isdigit():
            return int(value) == 0
    return True


def _cuda_sync() -> None:
    """Finish queued GPU work so the counter read at an edge belongs to the right window."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if torch.cuda.is_initialized():
            for i in range(torch.cuda.device_count()):
                torch.cuda.synchronize(i)
    except Exception as exc:  # noqa: BLE001 - never fail a phase over a sync problem
        log.debug("cuda synchronize failed: %s", exc)


class PhaseWindow:
    """One open energy window; `record` is its phases.jsonl record once it has closed."""

    def __init__(self, meter: _MeterBase, name: str, tokens: int, meta: dict[str, Any]) -> None:
        self._meter = meter
        self.name = name
        self.tokens = _check_tokens(tokens, name)
        self.meta = meta
        self.record: dict[str, Any] | None = None
        self.depth = 0
        self.parent: str | None = None
        self.seq = 0
        self._start: Snapshot | None = None
        self._t0 = (0.0, 0.0)

    def add_tokens(self, n: int) -> None:
        self.tokens += _check_tokens(n, self.name)

    def __enter__(self) -> PhaseWindow:  # noqa: PYI034
        self._meter._open_window(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        self._meter._close_window(self, exc_type)
        return False


def _check_tokens(n: Any, phase: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"phase {phase!r}: tokens must be an int >= 0, got {n!r}")
    return n


class _MeterBase:
    """Window bookkeeping shared by the real meter and the null meter."""

    def __init__(self, cfg: TelemetryConfig | None, run_dir: Path | None,
                 host: str | None) -> None:
        self.cfg = cfg or TelemetryConfig()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.host = host or host_name()
        self.session = _uuid.uuid4().hex[:12]
        self._stack: list[PhaseWindow] = []
        self._seq = 0
        self._write_records = self.run_dir is not None
        self._base_flags: list[str] = []
        self._base_notes: list[str] = []
        self._checked_tail = False
        self._pending: list[bytes] = []          # records a failed write still holds
        self._write_error: str | None = None
        self._append_lock = threading.Lock()
        # energy_j / source / uncertainty_j keys of this session's records: the core, plus
        # each other component a source of this session measures (energy.components)
        self._components: tuple[str, ...] = CORE

    # ---- public
    @property
    def started(self) -> bool:
        """True between start() and stop() (a NullMeter counts as always started)."""
        return bool(getattr(self, "_started", True))

    def phase(self, name: str, tokens: int = 0, **meta: Any) -> PhaseWindow:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"phase name must be a non-empty string, got {name!r}")
        return PhaseWindow(self, name, tokens, meta)

    def __enter__(self) -> _MeterBase:  # noqa: PYI034
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def stop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    # ---- windows
    def _read(self) -> Snapshot | None:
        return None

    def _open_window(self, w: PhaseWindow) -> None:
        _cuda_sync()
        w._start = self._read()
        w._t0 = (time.monotonic(), time.time())
        w.depth = len(self._stack)
        w.parent = self._stack[-1].name if self._stack else None
        self._seq += 1
        w.seq = self._seq
        self._stack.append(w)
        self._append(self._begin_record("phase", w.name, w.seq, w.depth, w.parent, w._t0[1],
                                        w.tokens, w.meta))

    def _begin_record(self, window: str, name: str, seq: int, depth: int, parent: str | None,
                      start_wall: float, tokens: int, meta: dict[str, Any]) -> dict[str, Any]:
        """The record that puts an opening window on disk (what recovery needs to close it)."""
        return {"schema": SCHEMA, "kind": "begin", "window": window, "phase": name, "seq": seq,
                "depth": depth, "parent": parent, "host": self.host, "session": self.session,
                "pid": os.getpid(), "start_wall": round(start_wall, 4), "tokens": tokens,
                "source": self.sources, "progress_every_s": self.cfg.progress_every_s,
                "interval_s": self.cfg.interval_s, "slow_interval_s": self.cfg.slow_interval_s,
                "counter_period_s": getattr(self, "counter_period_s", None),
                "flags": list(self._base_flags), "notes": list(self._base_notes),
                "meta": _jsonable(meta)}

    @property
    def sources(self) -> dict[str, str]:
        """Component -> source label ("nvml-counter", "rapl", "estimated-cpu-time", ...)."""
        return dict.fromkeys(self._components, UNAVAILABLE)

    def progress(self, reason: str = "checkpoint") -> None:
        """Write a progress record for every open window (the train loop calls this at each
        checkpoint): if the process dies now, the ledger still holds the energy so far."""
        self._write_progress(reason)

    def _open_windows(self) -> list[tuple[str, str, int, Snapshot | None, float, int]]:
        """(window, name, seq, start snapshot, start wall, tokens so far) of every open window."""
        return [("phase", w.name, w.seq, w._start, w._t0[1], w.tokens) for w in list(self._stack)]

    def _write_progress(self, reason: str) -> None:
        """Progress records from a fresh read (the sampler's latest snapshot can hold a counter
        value older than its time stamp: energy is read at the slow cadence)."""
        if not self._write_records:
            return
        windows = self._open_windows()
        if not windows:
            return
        now = self._read()
        t_wall = now.t_wall if now is not None else time.time()
        for window, name, seq, start, start_wall, tokens in windows:
            rec = self._record("progress", name, start, now, (0.0, start_wall),
                               (0.0, t_wall), tokens, {}, [])
            duration = rec["duration_s"] if start is not None and now is not None else round(
                max(t_wall - start_wall, 0.0), 6)
            self._append({"schema": SCHEMA, "kind": "progress", "window": window, "phase": name,
                          "seq": seq, "host": self.host, "session": self.session,
                          "t_wall": round(t_wall, 4), "duration_s": duration, "tokens": tokens,
                          "reason": reason, "energy_j": rec["energy_j"], "source": rec["source"],
                          "estimated": rec["estimated"], "uncertainty_j": rec["uncertainty_j"]})

    def _close_window(self, w: PhaseWindow, exc_type: Any) -> None:
        _cuda_sync()
        end = self._read()
        t1 = (time.monotonic(), time.time())
        if w in self._stack:
            self._stack.remove(w)
        flags = [f"error:{exc_type.__name__}"] if exc_type is not None else []
        rec = self._record("phase", w.name, w._start, end, w._t0, t1, w.tokens, w.meta, flags)
        rec.update(seq=w.seq, depth=w.depth, parent=w.parent,
                   status="error" if exc_type is not None else "ok")
        w.record = rec
        self._append(rec)

    def _record(self, kind: str, name: str, a: Snapshot | None, b: Snapshot | None,
                t0: tuple[float, float], t1: tuple[float, float], tokens: int,
                meta: dict[str, Any], flags: list[str]) -> dict[str, Any]:
        if a is not None and b is not None:
            t0, t1 = (a.t_mono, a.t_wall), (b.t_mono, b.t_wall)
        duration = max(t1[0] - t0[0], 0.0)
        comps = self._components
        rec: dict[str, Any] = {
            "schema": SCHEMA, "kind": kind, "phase": name, "seq": 0, "depth": 0,
            "parent": None, "host": self.host, "session": self.session,
            "start_wall": round(t0[1], 4), "end_wall": round(t1[1], 4),
            "duration_s": round(duration, 6), "tokens": tokens, "status": "ok",
            "energy_j": dict.fromkeys(comps), "source": dict.fromkeys(comps, UNAVAILABLE),
            "estimated": False, "uncertainty_j": dict.fromkeys(comps),
            "dynamic_energy_j": dict.fromkeys(comps), "per_gpu": {},
            "idle_power_w": self.idle_power_w,
            "integrated_power_j": {"gpu": None, "power_source": None, "samples": 0,
                                   "ratio": None, "diff_j": None},
            "counter_period_s": None, "counter_period_source": None,
            "flags": list(self._base_flags) + flags, "notes": list(self._base_notes),
            "meta": _jsonable(meta)}
        self._fill_energy(rec, a, b, duration)
        return rec

    def _fill_energy(self, rec: dict[str, Any], a: Snapshot | None, b: Snapshot | None,
                     duration: float) -> None:
        """Energy fields of a record; the null meter leaves them unavailable."""

    def _append(self, rec: dict[str, Any]) -> None:
        if not self._write_records or self.run_dir is None:
            return
        path = self.run_dir / "phases.jsonl"
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not self._checked_tail:
                ensure_trailing_newline(path)
                self._checked_tail = True
        except OSError:
            pass  # the write below fails too, and says so
        line = (json.dumps(rec, separators=(",", ":"), allow_nan=False) + "\n").encode()
        with self._append_lock:  # the progress timer appends from its own thread
            self._pending.append(line)
            self._flush_pending(path)

    def _flush_pending(self, path: Path) -> None:
        data = b"".join(self._pending)
        # One write() on an O_APPEND descriptor: records from several processes or hosts do not
        # interleave, and a crash leaves at most one truncated last line. A full or read-only
        # disk must not stop the job: records wait in memory and go out with the next append.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            if self._write_error is None:
                log.error("energy ledger %s: write failed (%s); keeping records in memory and "
                          "retrying with the next one", path, exc)
            self._write_error = str(exc)
            return
        if written != len(data):  # a short write (disk full mid-record): end the cut line;
            ensure_trailing_newline(path)  # the records go out again whole (readers skip it)
            log.error("energy ledger %s: short write; the records are written again", path)
            self._write_error = "short write"
            return
        if self._write_error is not None:
            log.warning("energy ledger %s: writes work again; %d held records written", path,
                        len(self._pending))
            self._write_error = None
        self._pending = []

    @property
    def idle_power_w(self) -> dict[str, Any]:
        """Idle power (W) per component measured before the first phase (None: not measured)."""
        return _no_idle()


class NullMeter(_MeterBase):
    """Measures nothing (telemetry disabled); records still carry tokens and durations."""

    def __init__(self, cfg: TelemetryConfig | None = None, run_dir: Path | None = None, *,
                 host: str | None = None, reason: str = "telemetry-disabled") -> None:
        super().__init__(cfg, run_dir, host)
        self._base_flags = [reason]

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None

    def energy_j(self) -> float | None:
        return None

    def __enter__(self) -> NullMeter:  # noqa: PYI034
        return self


class EnergyMeter(_MeterBase):
    """Meters a run: sampler thread, idle power, phase windows, a `run` record at stop()."""

    def __init__(self, cfg: TelemetryConfig, run_dir: Path | None, *, host: str | None = None,
                 nvml_lib: Any = None, powercap_root: str | Path | None = None,
                 leader: bool | None = None,
                 source_options: Mapping[str, Any] | None = None) -> None:
        super().__init__(cfg, run_dir, host)
        self.leader = _is_node_leader() if leader is None else leader
        # what discovery hands the sources (simulated hardware in tests)
        self._source_options = {"nvml_lib": nvml_lib, "powercap_root": powercap_root,
                                **(source_options or {})}
        self._sampler: Sampler | None = None
        self.energy_sources: list[EnergySource] = []   # the sources read (available ones)
        self._started = False
        self._stopped = False
        self._run_start: Snapshot | None = None
        self._run_t0 = (0.0, 0.0)
        self._sources = dict.fromkeys(CORE, UNAVAILABLE)
        self._idle: dict[str, Any] = _no_idle()
        self.counter_period_s = DEFAULT_COUNTER_PERIOD_S
        self.counter_period_source = "default (~100 ms, docs/metrics.md)"
        if not self.leader:
            self._write_records = False
            self._base_flags = ["not-metered-here"]
            self._base_notes = ["local rank != 0: the node's local rank 0 meters this node"]

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._started:
            return
        self._started = True
        if not self.leader:
            return
        found = discover(self.cfg, self._source_options)
        self.energy_sources = [src for src in found if src.available]
        period = next((s.COUNTER_PERIOD_S for s in self.energy_sources if s.COUNTER_PERIOD_S),
                      DEFAULT_COUNTER_PERIOD_S)
        self.counter_period_s = period
        self.counter_period_source = f"default (~{period * 1000:g} ms, docs/metrics.md)"
        out = self.run_dir / "telemetry" / f"{self.host}.jsonl" if self.run_dir else None
        self._sampler = Sampler(found, stats=CpuSource(), host=self.host,
                                interval=self.cfg.interval_s,
                                slow_interval=self.cfg.slow_interval_s, output=out)
        self.session = self._sampler.session
        self._components = record_components(
            d.component for src in self.energy_sources for d in src.devices if d.counter)
        self._sources = dict.fromkeys(self._components, UNAVAILABLE)
        self._idle = _no_idle(self._components)
        for comp in self._components:
            labels = [src.LABEL for src in self.energy_sources
                      if any(d.counter and d.component == comp for d in src.devices)]
            self._sources[comp] = "+".join(labels) or UNAVAILABLE
        self._session_notes(found)
        self._sampler.start()
        atexit.register(self.stop)
        if self._write_records and self.run_dir is not None:
            close_dead_windows(self.run_dir, self.host, self.session)
        self._measure_idle()
        self._run_start = self._read()
        self._run_t0 = (self._run_start.t_mono, self._run_start.t_wall)
        self._append(self._begin_record("run", "run", 0, 0, None, self._run_t0[1], 0, {}))
        self._progress_stop = threading.Event()
        self._progress_thread = threading.Thread(target=self._progress_loop,
                                                 name="wattkd-ledger-progress", daemon=True)
        self._progress_thread.start()

    _progress_thread: threading.Thread | None = None

    def _session_notes(self, found: list[EnergySource]) -> None:
        """Flags and notes every record carries: why a component has no source (with the
        estimate's hint where one exists), then each source's own (partial device set, ...)."""
        for src in found:
            comp = src.COMPONENTS[0]
            if (not src.available and src.reason and not src.ESTIMATED
                    and self._sources.get(comp, UNAVAILABLE) == UNAVAILABLE):
                hints = [e.reason for e in found if e.ESTIMATED and not e.available
                         and comp in e.COMPONENTS and e.reason]
                self._base_notes.append(f"{comp} unavailable: " + "; ".join([src.reason,
                                                                             *hints]))
            flags, notes = src.flags_and_notes()
            self._base_flags += flags
            self._base_notes += notes

    def _progress_loop(self) -> None:
        """At least every telemetry.progress_every_s, a progress record per open window."""
        while not self._progress_stop.wait(self.cfg.progress_every_s):
            try:
                self._write_progress("timer")
            except Exception:
                log.exception("energy ledger progress record failed")

    def _open_windows(self) -> list[tuple[str, str, int, Snapshot | None, float, int]]:
        out = super()._open_windows()
        if self._run_start is not None and not self._stopped:
            open_top = sum(w.tokens for w in list(self._stack) if w.depth == 0)
            out.append(("run", "run", 0, self._run_start, self._run_t0[1],
                        self._session_tokens + open_top))
        return out

    def stop(self) -> None:
        if not self._started or self._stopped:
            return
        self._stopped = True
        if self._sampler is None:
            return
        atexit.unregister(self.stop)
        if self._progress_thread is not None:
            self._progress_stop.set()
            self._progress_thread.join(timeout=10)
        for w in list(self._stack):
            log.warning("energy meter stopped with phase %r still open", w.name)
        _cuda_sync()
        end = self._read()
        top = self._session_tokens
        rec = self._record("run", "run", self._run_start, end, self._run_t0,
                           (end.t_mono, end.t_wall), top, {}, [])
        self._append(rec)
        if self._pending:
            log.error("energy ledger: %d records could not be written (%s); this session's "
                      "windows are missing from %s", len(self._pending), self._write_error,
                      self.run_dir)
        self._sampler.stop()
        for src in self._sampler.sources_given:
            src.close()

    _session_tokens = 0

    def _close_window(self, w: PhaseWindow, exc_type: Any) -> None:
        super()._close_window(w, exc_type)
        if w.depth == 0:
            self._session_tokens += w.tokens

    def _open_window(self, w: PhaseWindow) -> None:
        if not self._started:
            raise RuntimeError(f"EnergyMeter.phase({w.name!r}) entered before start(); use "
                               "`with meter:` or call meter.start() first")
        super()._open_window(w)

    # ------------------------------------------------------------------ reads
    def _read(self) -> Snapshot | None:
        """An edge read (phase, run, idle window): a drop or spike gets one more read, which
        says whether it was a glitch, so no edge carries an unjudged counter reset."""
        if self._sampler is None:
            return None
        snap = self._sampler.read_now()
        if snap.suspect:
            time.sleep(0.01)
            snap = self._sampler.read_now()
        return snap

    def energy_j(self) -> float | None:
        """Energy (J) since start() (after the idle window), measured + estimated components.

        Cheap: uses the sampler's latest reads (<= one interval old), never the hardware.
        """
        if self._sampler is None or self._run_start is None:
            return None
        e = self._energies(self._run_start, self._sampler.snapshot(), 0.0)
        return total_j({c: e[c] for c in self._components})

    @property
    def idle_power_w(self) -> dict[str, Any]:
        """Idle power (W) per component measured before the first phase (None: not measured)."""
        return dict(self._idle)

    @property
    def sources(self) -> dict[str, str]:
        """Component -> source label ("nvml-counter", "rapl", "estimated-cpu-time", ...)."""
        return dict(self._sources)

    # ------------------------------------------------------------------ energy
    def _energies(self, a: Snapshot, b: Snapshot, duration: float) -> dict[str, Any]:
        """Per component: energy (J), its uncertainty (`<comp>_unc`), per-device figures
        (`devices`: (source, device, figures); GPUs also as ledger `per_gpu` entries) and the
        GPUs' integrated power (`gpu_int`)."""
        devices: list[tuple[EnergySource, Device, dict[str, Any]]] = []
        vals: dict[str, list[float]] = {c: [] for c in self._components}
        uncs: dict[str, list[float | None]] = {c: [] for c in self._components}
        missing: set[str] = set()
        for src in self.energy_sources:
            for dev in src.devices:
                f = self._device_energy(src, dev, a, b, duration)
                devices.append((src, dev, f))
                if not dev.counter:
                    continue
                if f["energy_j"] is None:
                    if not src.PARTIAL:
                        missing.add(dev.component)
                    continue
                vals[dev.component].append(f["energy_j"])
                uncs[dev.component].append(f["uncertainty_j"])
        out: dict[str, Any] = {"devices": devices, "per_gpu": {
            d.key: {**d.info, **f} for _, d, f in devices if d.component == "gpu"}}
        for comp in self._components:
            ok = vals[comp] and comp not in missing
            out[comp] = sum(vals[comp]) if ok else None
            out[f"{comp}_unc"] = sum(uncs[comp]) if ok and None not in uncs[comp] else None
        ints = [f["integrated_power_j"] for _, d, f in devices if d.component == "gpu"
                and f["energy_j"] is not None and f["integrated_power_j"] is not None]
        out["gpu_int"] = sum(ints) if ints and len(ints) == len(vals["gpu"]) else None
        return out

    def _device_energy(self, src: EnergySource, dev: Device, a: Snapshot, b: Snapshot,
                       duration: float) -> dict[str, Any]:
        """One device's figures between two snapshots (GPUs' rounded: their ledger entry)."""
        i = device_id(src, dev)
        e = _diff(a.energy_j.get(i), b.energy_j.get(i))
        unc = None
        if e is not None and src.CHARACTERISED:
            unc = src.uncertainty_j(e, duration, a.power_w.get(i), b.power_w.get(i),
                                    self.counter_period_s, self.cfg)
        integ = _diff(a.integrated_j.get(i), b.integrated_j.get(i))
        rnd = _r if dev.component == "gpu" else (lambda v: v)
        return {"energy_j": rnd(e), "uncertainty_j": rnd(unc), "integrated_power_j": rnd(integ),
                "power_samples": b.power_samples.get(i, 0) - a.power_samples.get(i, 0),
                "resets": b.resets.get(i, 0) - a.resets.get(i, 0),
                "glitches": b.glitches.get(i, 0) - a.glitches.get(i, 0)}

    def _fill_energy(self, rec: dict[str, Any], a: Snapshot | None, b: Snapshot | None,
                     duration: float) -> None:
        if a is None or b is None:
            return
        e = self._energies(a, b, duration)
        rec["source"] = dict(self._sources)
        estimated = []
        for comp in self._components:
            rec["energy_j"][comp] = _r(e[comp])
            rec["uncertainty_j"][comp] = _r(e[f"{comp}_unc"])
            if rec["energy_j"][comp] is None:
                rec["source"][comp] = UNAVAILABLE
            elif any(src.ESTIMATED for src, d, _ in e["devices"] if d.component == comp):
                estimated.append(comp)
        rec["estimated"] = bool(estimated)
        rec["flags"] += [f"estimated-{comp}" for comp in estimated]
        rec["per_gpu"] = e["per_gpu"]
        rec["counter_period_s"] = self.counter_period_s
        rec["counter_period_source"] = self.counter_period_source
        idle = self._idle
        for comp in self._components:
            if e[comp] is not None and idle.get(comp) is not None:
                rec["dynamic_energy_j"][comp] = _r(e[comp] - idle[comp] * duration)
        if e["gpu"] is not None:
            self._gpu_checks(rec, e, duration)

    def _gpu_checks(self, rec: dict[str, Any], e: dict[str, Any], duration: float) -> None:
        """Flags on the headline GPU figure: short window, uncertainty, counter events, and the
        integrated-power cross-check."""
        flags, notes = rec["flags"], rec["notes"]
        gpu = e["gpu"]
        gpus = [(src, d, f) for src, d, f in e["devices"] if d.component == "gpu"]
        if duration < self.cfg.min_window_s:
            flags.append("short-window")
            notes.append(f"window {duration:.3g} s < telemetry.min_window_s "
                         f"{self.cfg.min_window_s:g} s: counter quantisation at the edges "
                         "dominates the figure")
        if e["gpu_unc"] is not None and gpu > 0 and e["gpu_unc"] / gpu > HIGH_UNCERTAINTY:
            flags.append("high-uncertainty")
        reset = "/".join(sorted({src.NAME for src, _, f in gpus if f["resets"]}))
        if reset:
            flags.append("counter-reset")
            notes.append(f"an {reset} counter decreased (driver reload) inside this window; the "
                         "sampling interval containing the reset may be missing")
        glitch = "/".join(sorted({src.NAME for src, _, f in gpus if f["glitches"]}))
        if glitch:
            flags.append("counter-glitch")
            notes.append(f"implausible {glitch} counter reads (above the power limit, or a drop "
                         "the next read undid) were excluded inside this window")
        ip = rec["integrated_power_j"]
        ip["power_source"] = "+".join(sorted({d.power_source for _, d, _ in gpus
                                              if d.power_source})) or None
        ip["samples"] = sum(f["power_samples"] for _, _, f in gpus)
        if e["gpu_int"] is not None and ip["samples"] >= 2:
            ip["gpu"] = _r(e["gpu_int"])
            ip["diff_j"] = _r(gpu - e["gpu_int"])
            ip["ratio"] = round(e["gpu_int"] / gpu, 6) if gpu > 0 else None
            if (ip["ratio"] is not None and duration >= self.cfg.min_window_s
                    and abs(ip["ratio"] - 1) > MISMATCH_TOLERANCE):
                flags.append("counter-power-mismatch")
        else:
            flags.append("no-power-samples")

    # ------------------------------------------------------------------ idle
    def _measure_idle(self) -> None:
        """Idle power over cfg.idle_seconds before any phase; also times the counter updates."""
        secs = self.cfg.idle_seconds
        measurable = any(v != UNAVAILABLE for v in self._sources.values())
        if secs <= 0 or not measurable or self._sampler is None:
            self._idle["source"] = ("not measured (telemetry.idle_seconds = 0)" if secs <= 0
                                    else "not measured (no energy source)")
            return
        log.info("measuring idle power for %.3g s", secs)
        _cuda_sync()
        a = self._read()
        changes = self._poll_counter(secs)
        b = self._read()
        dt = b.t_mono - a.t_mono
        e = self._energies(a, b, dt)
        idle: dict[str, Any] = {"window_s": round(dt, 4), "per_gpu": {},
                                "source": dict(self._sources)}
        for comp in self._components:
            idle[comp] = _r(e[comp] / dt) if e[comp] is not None and dt > 0 else None
        for u, p in e["per_gpu"].items():
            idle["per_gpu"][u] = _r(p["energy_j"] / dt) if p["energy_j"] is not None else None
        if len(changes) >= 4:
            gaps = [t1 - t0 for t0, t1 in pairwise(changes)]
            self.counter_period_s = round(statistics.median(gaps), 4)
            self.counter_period_source = f"measured at idle ({len(gaps)} updates)"
        self._idle = idle
        rec = self._record("idle", "idle", a, b, (0, 0), (0, 0), 0, {}, [])
        self._append(rec)

    def _poll_counter(self, secs: float) -> list[float]:
        """Wait `secs`, polling the first counter with a published update period (NVML's) to
        find when it changes."""
        deadline = time.monotonic() + secs
        src, dev = next(((s, d) for s in self.energy_sources if s.COUNTER_PERIOD_S
                         for d in s.devices if d.counter), (None, None))
        if src is None or dev is None:
            time.sleep(secs)
            return []
        changes: list[float] = []
        last = None
        while time.monotonic() < deadline:
            v = src.read_counter(dev)
            t = time.monotonic()
            if v is not None and last is not None and v != last:
                changes.append(t)
            last = v if v is not None else last
            time.sleep(0.01)
        return changes


def _no_idle(components: tuple[str, ...] = CORE) -> dict[str, Any]:
    return {**dict.fromkeys(components), "per_gpu": {}, "window_s": 0.0,
            "source": "not measured"}


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else max(b - a, 0.0)


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 6)


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(meta, default=str))


def make_meter(cfg: TelemetryConfig, run_dir: Path | None) -> EnergyMeter | NullMeter:
    """The meter a stage should use: a NullMeter when telemetry is disabled."""
    if not cfg.enabled:
        return NullMeter(cfg, run_dir)
    return EnergyMeter(cfg, run_dir)
