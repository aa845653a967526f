"""Reading the energy layer's JSONL files: cut-line tolerant lines, merged telemetry, and the
energy the raw counters in telemetry samples hold.

Each source's telemetry section is read back by its own class (`EnergySource.telemetry_*`),
so this module knows no source by name. Multi-host: telemetry has one file per host, and a
device reported by two overlapping samplers is kept once.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from wattkd.energy.components import check
from wattkd.energy.counters import CounterTracker, PowerIntegrator
from wattkd.energy.sources import source_types

log = logging.getLogger(__name__)

KNOWN_SCHEMAS = {1, 2}


_SESSION = re.compile(r'"session"\s*:\s*"([^"]*)"')
# a record's wall-clock stamp, complete (the comma after it was written): with the fields
# before it, it tells one record from every other (two records never share host, session,
# kind and time to 0.1 ms)
_STAMP = re.compile(r'"(?:t_wall|start_wall)"\s*:\s*-?[0-9][0-9.eE+-]*\s*,')


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
        if _STAMP.search(raw[i]):
            return "a short write (disk full?); the record follows whole on the next line"
        return (f"cut after {len(raw[i])} characters, too few to tell which record it was (no "
                "time stamp yet): if the next line is not its rewrite, that record is lost")
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
        skipped.extend(f"{path.parent.name}/{path.name}:{n}: {why}" for n, why in cut)
    return objs


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


def _telemetry_types() -> list[Any]:
    return [c for c in source_types() if c.TELEMETRY_KEY]


def _dedupe(samples: list[dict[str, Any]], dropped: list[str]) -> list[dict[str, Any]]:
    spans: dict[str, list[float]] = {}
    devices: dict[str, set[str]] = {}
    types = _telemetry_types()
    for s in samples:
        sid = s.get("session", "")
        span = spans.setdefault(sid, [math.inf, -math.inf])
        span[0] = min(span[0], s["t_wall"])
        span[1] = max(span[1], s["t_wall"])
        devs = devices.setdefault(sid, set())
        for cls in types:
            devs.update(cls.telemetry_device_id(s.get("host"), k)
                        for k in s.get(cls.TELEMETRY_KEY, {}))
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
            for cls in types:
                key = cls.TELEMETRY_KEY
                s[key] = {k: v for k, v in s.get(key, {}).items()
                          if cls.telemetry_device_id(s.get("host"), k) not in d}
        out.append(s)
    return out


def telemetry_energy(samples: Sequence[dict[str, Any]], start_wall: float | None = None,
                     end_wall: float | None = None, component: str = "gpu"
                     ) -> dict[str, Any]:
    """Energy (J) per device from the raw counters in telemetry samples within a window.

    Counters are differenced within each sampler session only (a gap between sessions is not
    metered). Devices without a counter fall back to integrated power where their source
    records power (labelled, e.g. `nvml-power-integrated`).
    Returns {"energy_j", "source", "devices": {key: J}, "samples", "t0", "t1", "glitches"}.
    """
    check(component)
    headers = getattr(samples, "headers", [])
    window = [s for s in samples if (start_wall is None or s["t_wall"] >= start_wall)
              and (end_wall is None or s["t_wall"] <= end_wall)]
    types = [c for c in _telemetry_types() if component in c.COMPONENTS]
    trackers: dict[str, CounterTracker] = {}
    integrators: dict[str, tuple[str, PowerIntegrator]] = {}
    labels: set[str] = set()
    for s in sorted(window, key=lambda x: (x.get("session", ""), x["t_mono"])):
        sid, t = s.get("session", ""), s["t_mono"]
        for cls in types:
            section = s.get(cls.TELEMETRY_KEY)
            for k, raw in cls.telemetry_counters(section, component).items():
                key = f"{sid}:{k}"
                if key not in trackers:
                    trackers[key] = cls.telemetry_tracker(headers, sid, k)
                    labels.add(cls.LABEL)
                trackers[key].update(raw, t)
            if cls.POWER_LABEL:
                for k, watts in cls.telemetry_power(section).items():
                    integrators.setdefault(f"{sid}:{k}", (cls.POWER_LABEL, PowerIntegrator())
                                           )[1].add(t, watts)
    devices: dict[str, float] = {k: tr.total_j for k, tr in trackers.items()}
    glitches = sum(tr.glitches for tr in trackers.values())
    for k, (label, integ) in integrators.items():
        if k not in devices and integ.samples >= 2:
            devices[k] = integ.joules
            labels.add(label)
    t0 = min((s["t_wall"] for s in window), default=None)
    t1 = max((s["t_wall"] for s in window), default=None)
    return {"energy_j": sum(devices.values()) if devices else None,
            "source": "+".join(sorted(labels)) or "unavailable", "devices": devices,
            "samples": len(window), "t0": t0, "t1": t1, "glitches": glitches}


def counter_times(samples: Iterable[dict[str, Any]], component: str) -> list[float]:
    """Sorted wall times of the samples that carry a counter value of `component`."""
    types = [c for c in _telemetry_types() if component in c.COMPONENTS]
    return sorted(float(s["t_wall"]) for s in samples
                  if any(c.telemetry_counters(s.get(c.TELEMETRY_KEY), component) for c in types))


def sample_power_w(sample: dict[str, Any], component: str) -> float | None:
    """Total power (W) of `component` in one sample; None unless every device reports one."""
    types = [c for c in _telemetry_types() if component in c.COMPONENTS and c.POWER_LABEL]
    p = [w for c in types for w in c.telemetry_power(sample.get(c.TELEMETRY_KEY)).values()]
    return float(sum(p)) if p and None not in p else None


def peak_power_w(samples: Sequence[dict[str, Any]], component: str) -> float | None:
    """The highest power (W) of `component` the samples show: power fields, and the counter's
    increase between consecutive counter samples of a session (devices summed). A bound for
    an unmeasured span of the same session that needs no power field (RAPL, node meters)."""
    headers = getattr(samples, "headers", [])
    types = [c for c in _telemetry_types() if component in c.COMPONENTS]
    peak: float | None = None
    for s in samples:
        p = sample_power_w(s, component)
        if p is not None:
            peak = p if peak is None else max(peak, p)
    trackers: dict[str, CounterTracker] = {}
    last: dict[str, tuple[float, float]] = {}      # session -> (t, total J) at its last counter
    for s in sorted(samples, key=lambda x: (x.get("session", ""), x["t_mono"])):
        sid, t, seen = s.get("session", ""), float(s["t_mono"]), False
        for cls in types:
            for k, raw in cls.telemetry_counters(s.get(cls.TELEMETRY_KEY), component).items():
                tr = trackers.setdefault(f"{sid}:{k}", cls.telemetry_tracker(headers, sid, k))
                tr.update(raw, t)
                seen = True
        if not seen:
            continue
        total = sum(tr.total_j for key, tr in trackers.items() if key.startswith(f"{sid}:"))
        if sid in last and t > last[sid][0]:
            rate = (total - last[sid][1]) / (t - last[sid][0])
            peak = rate if peak is None else max(peak, rate)
        last[sid] = (t, total)
    return peak
