"""Energy metrics as pure functions on the ledger (phases.jsonl) and telemetry files.

Definitions (DESIGN.md; the one meaning of E_run in code, docs and report):
  E_run      energy of a run's `train` windows: sum over devices of (counter at end - counter
             at start), summed over hosts and sessions (resumed and recovered ones), J. The GPU
             is the headline component; CPU (RAPL or an `estimated` figure) is reported beside
             it, never silently added or dropped. `e_run(phases, "name")` is the same sum over
             the windows of another phase; `e_metered` is everything a meter saw (its `run`
             records: training plus evaluation, EPT, ... in the same folder), which is not E_run.
  E_avg      mean E_run over the repeats of one configuration, with its sample std and n.
  EPT_train  E_train / tokens trained (J/token).
  P_avg      energy over a wall-clock window / its duration, devices summed.
Multi-host: every host's meter writes its own records (summed here); telemetry has one file per
host, and a GPU (UUID) or RAPL zone reported by two overlapping samplers is kept once.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wattkd.energy.sources import CounterTracker, PowerIntegrator

log = logging.getLogger(__name__)

KNOWN_SCHEMAS = {1, 2}
COMPONENTS = ("gpu", "cpu", "dram")
E_RUN_PHASE = "train"       # E_run is the energy of these windows


@dataclass(frozen=True)
class EnergyFigure:
    """An energy figure that says where it came from. `value` in J, None if unavailable."""

    value: float | None
    source: str
    estimated: bool
    uncertainty: float | None
    component: str = "gpu"
    tokens: int = 0
    duration_s: float = 0.0
    records: int = 0
    flags: tuple[str, ...] = ()

    def label(self) -> str:
        if self.value is None:
            return f"{self.component}: unavailable"
        unc = f" ± {self.uncertainty:.3g}" if self.uncertainty is not None else ""
        est = ", estimated" if self.estimated else ""
        return f"{self.value:.6g} J{unc} ({self.source}{est})"


@dataclass(frozen=True)
class PowerFigure:
    """Average power (W) over a window, with the energy and duration it came from."""

    value: float | None
    source: str
    energy_j: float | None
    duration_s: float
    samples: int
    component: str = "gpu"
    flags: tuple[str, ...] = ()


# ------------------------------------------------------------------------------ reading
_SESSION = re.compile(r'"session"\s*:\s*"([^"]*)"')


def _session_of(line: str) -> str | None:
    m = _SESSION.search(line)
    return m.group(1) if m else None


def read_jsonl_lines(path: Path, what: str, *, schemas: set[int] | None = None,
                     check_schema: bool = True, anywhere: bool = False
                     ) -> tuple[list[dict[str, Any]], list[int], list[tuple[int, str]]]:
    """(objects, their 1-based line numbers, skipped (line, why)) of a JSONL file.

    A cut line (a writer killed mid-append) is skipped, and named in `skipped`, wherever a crash
    can leave one: the last line, or a line after which another session writes (a new header or
    begin record, a recovered window, or a record of a different session than the cut one).
    Any other unreadable line is corruption and raises, naming file and line. `anywhere`:
    files without sessions (metrics.jsonl, re-logged after a resume) skip a cut line anywhere.
    """
    known = KNOWN_SCHEMAS if schemas is None else schemas
    raw = path.read_text(encoding="utf-8", errors="replace").split("\n")
    if raw and raw[-1] == "":
        raw.pop()
    out: list[dict[str, Any]] = []
    lines: list[int] = []
    skipped: list[tuple[int, str]] = []
    prev_session: str | None = None
    for i, line in enumerate(raw):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise json.JSONDecodeError("not an object", line, 0)
        except json.JSONDecodeError:
            why = ("a writer died mid-line" if anywhere else
                   _cut_line_ok(raw, i, _session_of(line) or prev_session))
            if why is None:
                raise ValueError(f"{path}:{i + 1}: not a valid {what} line: {line[:80]!r}"
                                 ) from None
            log.warning("%s: skipping truncated line %d (%s)", path, i + 1, why)
            skipped.append((i + 1, f"truncated line skipped ({why})"))
            continue
        schema = obj.get("schema")
        if check_schema and schema not in known:
            raise ValueError(f"{path}:{i + 1}: {what} schema {schema!r} is not supported by this "
                             f"wattkd (it reads schema {sorted(known)})")
        prev_session = obj.get("session", prev_session)
        out.append(obj)
        lines.append(i + 1)
    return out, lines, skipped


def _cut_line_ok(raw: list[str], i: int, session: str | None) -> str | None:
    """Why the unreadable line i is what a crash leaves, or None (it is corruption)."""
    nxt = next((ln for ln in raw[i + 1:] if ln.strip()), None)
    if nxt is None:
        return "a writer stopped mid-line at the end of the file"
    if nxt.startswith(raw[i]):
        return "a short write (disk full?); the record follows whole"
    try:
        obj = json.loads(nxt)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    if obj.get("type") == "header" or obj.get("kind") == "begin" \
            or obj.get("status") == "recovered":
        return "a writer died mid-line; the next line starts a new session"
    if session is not None and obj.get("session") not in (None, session):
        return f"session {session} died mid-line; another session writes after it"
    return None


def _read_jsonl(path: Path, what: str, skipped: list[str] | None = None
                ) -> list[dict[str, Any]]:
    """Objects of a JSONL file; cut lines a crash can leave are skipped (named in `skipped`)."""
    objs, _, cut = read_jsonl_lines(path, what)
    if skipped is not None:
        skipped.extend(f"{path.name}:{n}: {why}" for n, why in cut)
    return objs


def read_phases(path: str | Path, telemetry: Telemetry | None = None) -> list[dict[str, Any]]:
    """One record per window of a phases.jsonl file (or of a run directory's phases.jsonl):
    windows of dead sessions recovered, negative ones refused, cut lines skipped; the returned
    `recovery.Ledger` names each of those (`.labels()`)."""
    from wattkd.energy.recovery import read_ledger  # recovery reads telemetry through here

    p = Path(path)
    if p.is_dir():
        p = p / "phases.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"no energy ledger at {p} (expected a phases.jsonl file)")
    return read_ledger(p, telemetry)


class Telemetry(list):
    """Telemetry samples of one or more hosts, sorted by wall time (a list of sample dicts).

    `headers`: the header line of every sampler session; `notes`: later unavailability notes;
    `dropped`: what was left out to avoid double counting.
    """

    def __init__(self, samples: Iterable[dict[str, Any]] = ()) -> None:
        super().__init__(samples)
        self.headers: list[dict[str, Any]] = []
        self.notes: list[dict[str, Any]] = []
        self.files: list[Path] = []
        self.dropped: list[str] = []
        self.skipped: list[str] = []


def _telemetry_files(paths_or_dir: str | Path | Sequence[str | Path]) -> list[Path]:
    items = [paths_or_dir] if isinstance(paths_or_dir, str | Path) else list(paths_or_dir)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            d = p / "telemetry" if (p / "telemetry").is_dir() else p
            files.extend(sorted(d.glob("*.jsonl")))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"telemetry path {p} does not exist")
    if not files:
        raise FileNotFoundError(f"no telemetry *.jsonl files in {paths_or_dir}")
    return files


def read_telemetry(paths_or_dir: str | Path | Sequence[str | Path]) -> Telemetry:
    """Merge telemetry files (one per host) into one wall-time-ordered sample list.

    Accepts a file, a telemetry/ folder, a run folder, or a list of those. A device reported by
    two sampler sessions at overlapping times (two samplers on one node) is kept from the
    session that started first, so no energy is counted twice.
    """
    tel = Telemetry()
    samples: list[dict[str, Any]] = []
    for f in _telemetry_files(paths_or_dir):
        tel.files.append(f)
        for obj in _read_jsonl(f, "telemetry", tel.skipped):
            kind = obj.get("type")
            if kind == "sample":
                samples.append(obj)
            elif kind == "header":
                tel.headers.append(obj)
            elif kind == "note":
                tel.notes.append(obj)
    samples = _dedupe(samples, tel.dropped)
    samples.sort(key=lambda s: s.get("t_wall", 0.0))
    tel.extend(samples)
    return tel


def _dedupe(samples: list[dict[str, Any]], dropped: list[str]) -> list[dict[str, Any]]:
    spans: dict[str, list[float]] = {}
    devices: dict[str, set[str]] = {}
    for s in samples:
        sid = s.get("session", "")
        span = spans.setdefault(sid, [math.inf, -math.inf])
        span[0] = min(span[0], s["t_wall"])
        span[1] = max(span[1], s["t_wall"])
        devs = devices.setdefault(sid, set())
        devs.update(f"gpu:{u}" for u in s.get("gpu", {}))
        devs.update(f"rapl:{s.get('host')}:{z}" for z in s.get("rapl", {}))
    order = sorted(spans, key=lambda sid: spans[sid][0])
    drop: dict[str, set[str]] = {}
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            if spans[b][0] > spans[a][1] or b in drop and devices[b] <= drop[b]:
                continue
            shared = devices[a] & devices[b] - drop.get(a, set())
            if shared:
                drop.setdefault(b, set()).update(shared)
                msg = (f"sessions {a} and {b} both report {sorted(shared)} at overlapping times; "
                       f"keeping {a} (started first) to avoid double counting")
                dropped.append(msg)
                log.warning(msg)
    if not drop:
        return samples
    out = []
    for s in samples:
        d = drop.get(s.get("session", ""))
        if d:
            s = dict(s)
            s["gpu"] = {u: v for u, v in s.get("gpu", {}).items() if f"gpu:{u}" not in d}
            s["rapl"] = {z: v for z, v in s.get("rapl", {}).items()
                         if f"rapl:{s.get('host')}:{z}" not in d}
        out.append(s)
    return out


# ------------------------------------------------------------------------------- ledger
def _select(phases: Sequence[dict[str, Any]], phase: str | None) -> tuple[list[dict], list[str]]:
    flags: list[str] = []
    if phase is None:
        recs = [r for r in phases if r.get("kind") == "run"]
        if not recs:
            recs = [r for r in phases if r.get("kind", "phase") == "phase" and r.get("depth") == 0]
            if recs:
                flags.append("no-run-record: summed top-level phases (a meter did not stop)")
        if not recs:
            raise ValueError("no run or top-level phase records in this ledger")
        return recs, flags
    recs = [r for r in phases if r.get("kind", "phase") == "phase" and r.get("phase") == phase]
    if not recs:
        names = sorted({r.get("phase") for r in phases if r.get("kind", "phase") == "phase"})
        raise ValueError(f"no phase records named {phase!r}; this ledger has: {names}")
    return recs, flags


def e_run(phases: Sequence[dict[str, Any]], phase: str = E_RUN_PHASE,
          component: str = "gpu") -> EnergyFigure:
    """E_run: the energy of every `train` window (or of every window named `phase`).

    Records of several hosts and sessions (resumed, recovered) are summed. If any record lacks
    the component, the figure is unavailable (flagged `partial`), never a silent partial sum.
    """
    if phase is None:
        raise ValueError("e_run needs a phase name (E_run is the `train` windows); use "
                         "e_metered() for everything the meters saw")
    return _energy(phases, phase, component)


def e_metered(phases: Sequence[dict[str, Any]], component: str = "gpu") -> EnergyFigure:
    """Everything the meters saw: the sum of `run` records (start() to stop() of each meter
    session, all hosts) or, without any, of top-level windows. Not E_run: it includes
    evaluation, EPT and other stages metered into the same folder."""
    return _energy(phases, None, component)


def _energy(phases: Sequence[dict[str, Any]], phase: str | None, component: str
            ) -> EnergyFigure:
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
    recs, flags = _select(phases, phase)
    values = [r["energy_j"].get(component) for r in recs]
    sources = sorted({r["source"].get(component, "unavailable") for r in recs})
    tokens = sum(int(r.get("tokens", 0)) for r in recs)
    duration = sum(float(r.get("duration_s", 0.0)) for r in recs)
    rec_flags = sorted({f for r in recs for f in r.get("flags", [])})
    missing = sum(v is None for v in values)
    if missing:
        if missing < len(values):
            flags.append(f"partial: {missing} of {len(values)} records have no {component} energy")
        return EnergyFigure(None, "unavailable", False, None, component, tokens, duration,
                            len(recs), tuple(rec_flags + flags))
    uncs = [r.get("uncertainty_j", {}).get(component) for r in recs]
    unc = sum(uncs) if None not in uncs else None
    source = sources[0] if len(sources) == 1 else "mixed:" + "+".join(sources)
    estimated = any(s.startswith("estimated") for s in sources)
    return EnergyFigure(float(sum(values)), source, estimated, unc, component, tokens,
                        duration, len(recs), tuple(rec_flags + flags))


def e_avg(values: Iterable[float | EnergyFigure | None]) -> tuple[float, float | None, int]:
    """(mean, sample std (n-1), n) over repeats; std is None for a single repeat."""
    vals: list[float] = []
    for i, v in enumerate(values):
        x = v.value if isinstance(v, EnergyFigure) else v
        if x is None:
            raise ValueError(f"E_avg: repeat {i} has no energy figure (unavailable); an "
                             "average over the others would misstate the configuration")
        vals.append(float(x))
    if not vals:
        raise ValueError("E_avg needs at least one repeat")
    n = len(vals)
    mean = sum(vals) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in vals) / (n - 1)) if n > 1 else None
    return mean, std, n


def ept(energy_j: float | None, tokens: int) -> float | None:
    """Energy per token (J/token); None when the energy is unavailable."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise ValueError(f"EPT needs a positive token count, got {tokens!r}")
    return None if energy_j is None else float(energy_j) / tokens


def ept_train(phases: Sequence[dict[str, Any]], phase: str = "train",
              component: str = "gpu") -> float | None:
    """EPT_train = E(train windows) / tokens trained in them."""
    fig = e_run(phases, phase, component)
    return ept(fig.value, fig.tokens)


# ---------------------------------------------------------------------------- telemetry
def _header_info(samples: Sequence[dict[str, Any]]) -> tuple[dict[str, float], dict[str, int]]:
    limits: dict[str, float] = {}
    ranges: dict[str, int] = {}
    for h in getattr(samples, "headers", []):
        for g in h.get("gpus", []):
            if g.get("power_limit_w"):
                limits[g["uuid"]] = 2 * g["power_limit_w"]
        for z in h.get("rapl", []):
            ranges[f"{h.get('session')}:{z['zone']}"] = z.get("max_range_uj") or 0
    return limits, ranges


def telemetry_energy(samples: Sequence[dict[str, Any]], start_wall: float | None = None,
                     end_wall: float | None = None, component: str = "gpu"
                     ) -> dict[str, Any]:
    """Energy (J) per device from the raw counters in telemetry samples within a window.

    Counters are differenced within each sampler session only (a gap between sessions is not
    metered). GPU devices without a counter fall back to integrated `power_w` (labelled).
    Returns {"energy_j", "source", "devices": {key: J}, "samples", "t0", "t1"}.
    """
    if component not in ("gpu", "cpu", "dram"):
        raise ValueError(f"component must be gpu, cpu or dram, got {component!r}")
    limits, ranges = _header_info(samples)
    window = [s for s in samples if (start_wall is None or s["t_wall"] >= start_wall)
              and (end_wall is None or s["t_wall"] <= end_wall)]
    trackers: dict[str, CounterTracker] = {}
    integrators: dict[str, PowerIntegrator] = {}
    for s in sorted(window, key=lambda x: (x.get("session", ""), x["t_mono"])):
        sid, t = s.get("session", ""), s["t_mono"]
        if component == "gpu":
            for u, v in s.get("gpu", {}).items():
                key = f"{sid}:{u}"
                if v.get("energy_mj") is not None:
                    trackers.setdefault(key, CounterTracker(1e-3, max_power_w=limits.get(u)))
                    trackers[key].update(v["energy_mj"], t)
                integrators.setdefault(key, PowerIntegrator()).add(t, v.get("power_w"))
        else:
            for z, v in s.get("rapl", {}).items():
                if not z.startswith("package" if component == "cpu" else "dram"):
                    continue
                key = f"{sid}:{z}"
                wrap = ranges.get(key) or None
                trackers.setdefault(key, CounterTracker(1e-6, wrap=wrap)).update(v, t)
    devices: dict[str, float] = {k: tr.total_j for k, tr in trackers.items()}
    glitches = sum(tr.glitches for tr in trackers.values())
    labels = {"nvml-counter" if component == "gpu" else "rapl"} if devices else set()
    for k, integ in integrators.items():
        if k not in devices and integ.samples >= 2:
            devices[k] = integ.joules
            labels.add("nvml-power-integrated")
    t0 = min((s["t_wall"] for s in window), default=None)
    t1 = max((s["t_wall"] for s in window), default=None)
    return {"energy_j": sum(devices.values()) if devices else None,
            "source": "+".join(sorted(labels)) or "unavailable", "devices": devices,
            "samples": len(window), "t0": t0, "t1": t1, "glitches": glitches}


def average_power(telemetry_samples: Sequence[dict[str, Any]], start_wall: float | None = None,
                  end_wall: float | None = None, component: str = "gpu") -> PowerFigure:
    """Average power (W) over [start_wall, end_wall] (default: the samples' span), devices
    summed: counter energy in the window / window duration."""
    e = telemetry_energy(telemetry_samples, start_wall, end_wall, component)
    flags: list[str] = []
    if e["t0"] is None or e["t1"] is None or e["t1"] <= e["t0"]:
        return PowerFigure(None, "unavailable", None, 0.0, e["samples"], component,
                           ("fewer than two samples in the window",))
    sessions = {s.get("session") for s in telemetry_samples
                if e["t0"] <= s["t_wall"] <= e["t1"]}
    if len(sessions) > 1:
        hosts = {s.get("host") for s in telemetry_samples if e["t0"] <= s["t_wall"] <= e["t1"]}
        if len(hosts) < len(sessions):
            flags.append("several sessions on one host: time between them is not metered")
    duration = e["t1"] - e["t0"]
    value = e["energy_j"] / duration if e["energy_j"] is not None else None
    return PowerFigure(value, e["source"], e["energy_j"], duration, e["samples"], component,
                       tuple(flags))
