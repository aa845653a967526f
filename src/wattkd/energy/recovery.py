"""What a crash leaves in the energy ledger, read back without losing or double-counting a joule.

A killed session leaves (a) a window with a `begin` record, maybe `progress` records, and no end
record, and (b) maybe a cut last line. `read_ledger` turns a phases.jsonl file into one record
per window:
  * an open window of a dead session is closed at its last progress record, extended by the
    counter samples (of every source that writes telemetry) its sampler wrote to telemetry after that record (same session),
    `status: recovered`, flag `recovered`. The unmeasured tail (last counter sample -> last sign
    of life + one sampling interval, plus the gap before the first sample after the progress
    record) is not added to the value: tail seconds x the highest power seen is added to the
    uncertainty instead;
  * a window record with negative energy is refused: that component becomes unavailable (flag
    `refused-negative`, the file and line in its notes), so no figure is ever negative;
  * a cut line is skipped where a crash can leave one, and named.
`Ledger.labels()` lists every skipped, recovered or refused item for the report's "Read first".
`close_dead_windows` (called by EnergyMeter.start) writes the recovered end records of dead
sessions on this host, so the next session closes what the previous one left open.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wattkd.energy.components import CORE, components_of
from wattkd.energy.killed_tokens import count_killed_tokens
from wattkd.energy.monitor import ensure_trailing_newline
from wattkd.energy.source import UNAVAILABLE
from wattkd.energy.sources import source_class
from wattkd.energy.telemetry import (
    Telemetry,
    counter_times,
    peak_power_w,
    read_jsonl_lines,
    read_telemetry,
    telemetry_energy,
)
from wattkd.runinfo import pid_alive

log = logging.getLogger(__name__)

END_KINDS = {"phase": "phase", "run": "run"}     # end-record kind -> window


class Ledger(list):
    """Window records of a phases.jsonl file (a list of dicts), with what reading it found.

    `skipped`: cut lines left out; `recovered`: windows of dead sessions closed at their last
    evidence; `refused`: records whose energy could not be believed. Each item is a dict with a
    `label` (one sentence naming file and line or session).
    """

    def __init__(self, records: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(records)
        self.path: Path | None = None
        self.skipped: list[dict[str, Any]] = []
        self.recovered: list[dict[str, Any]] = []
        self.refused: list[dict[str, Any]] = []

    def labels(self) -> list[str]:
        return [i["label"] for i in self.skipped + self.recovered + self.refused]


def _key(rec: dict[str, Any], window: str) -> tuple[Any, ...]:
    return (rec.get("host"), rec.get("session"), window, rec.get("seq", 0))


def read_ledger(path: Path, telemetry: Telemetry | None = None,
                recover: bool = True) -> Ledger:
    """Window records of `path` (schema 1 or 2) with recovered / refused / skipped items.

    `telemetry`: samples to extend recovered windows with; default: the run folder's
    telemetry/ next to the file, when present.
    """
    path = Path(path)
    objs, lines, skipped = read_jsonl_lines(path, "phase record")
    led = Ledger()
    led.path = path
    led.skipped = [{"file": str(path), "line": n, "label": f"{path.name}:{n}: {why}"}
                   for n, why in skipped]
    begins: dict[tuple[Any, ...], dict[str, Any]] = {}
    progress: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    ended: set[tuple[Any, ...]] = set()
    for obj, n in zip(objs, lines, strict=True):
        kind = obj.get("kind", "phase")
        if kind == "begin":
            begins[_key(obj, obj.get("window", "phase"))] = obj
        elif kind == "progress":
            progress.setdefault(_key(obj, obj.get("window", "phase")), []).append(obj)
        else:
            if kind in END_KINDS:
                ended.add(_key(obj, END_KINDS[kind]))
            led.append(_refuse_negative(obj, path, n, led.refused))
    open_keys = [k for k in begins if k not in ended]
    if open_keys and recover:
        if telemetry is None:
            telemetry = _telemetry_near(path)
        idle = idle_by_session(objs)
        for k in open_keys:
            rec = recover_window(begins[k], progress.get(k, []), telemetry,
                                 idle.get((k[0], k[1])))
            led.append(rec)
        count_killed_tokens(path.parent / "metrics.jsonl", objs,
                            [r for r in led if r.get("status") == "recovered"
                             and (r.get("host"), r.get("session"), r.get("kind"),
                                  r.get("seq", 0)) in open_keys])
    for rec in led:
        if rec.get("status") == "recovered":
            led.recovered.append({"session": rec.get("session"), "host": rec.get("host"),
                                  "phase": rec.get("phase"), "kind": rec.get("kind"),
                                  "label": f"{path.name}: " + _recovered_label(rec)})
    return led


def _telemetry_near(path: Path) -> Telemetry | None:
    tdir = path.parent / "telemetry"
    if not tdir.is_dir() or not any(tdir.glob("*.jsonl")):
        return None
    try:
        return read_telemetry(tdir)
    except (OSError, ValueError) as exc:
        log.warning("%s: telemetry unreadable for window recovery (%s)", tdir, exc)
        return None


def _refuse_negative(rec: dict[str, Any], path: Path, line: int,
                     refused: list[dict[str, Any]]) -> dict[str, Any]:
    energy = rec.get("energy_j") or {}
    bad = {c: v for c, v in energy.items() if isinstance(v, int | float) and v < 0}
    if not bad:
        return rec
    rec = json.loads(json.dumps(rec))
    for comp, v in bad.items():
        rec["energy_j"][comp] = None
        rec.setdefault("source", {})[comp] = "unavailable"
        msg = (f"{path.name}:{line}: `{rec.get('phase')}` window refused: {comp} energy "
               f"{v:g} J is negative (energy is never negative)")
        rec.setdefault("notes", []).append(msg)
        refused.append({"file": str(path), "line": line, "phase": rec.get("phase"),
                        "component": comp, "energy_j": v, "label": msg})
        log.warning("%s", msg)
    rec["flags"] = [*rec.get("flags", []), "refused-negative"]
    return rec


def _recovered_label(rec: dict[str, Any]) -> str:
    r = rec.get("recovered") or {}
    return (f"`{rec.get('phase')}` {rec.get('kind')} window of session {rec.get('session')} "
            f"(host {rec.get('host')}) recovered: the session ended without closing it; closed "
            f"at its last {r.get('closed_at', 'evidence')}, {r.get('unmeasured_s', 0):.3g} s "
            "unmeasured inside the uncertainty")


# ----------------------------------------------------------------------------- recovery
def _source_types(label: str | None) -> list[Any]:
    """The registered classes behind a record's source label ("a+b" when several)."""
    if not label or label == UNAVAILABLE:
        return []
    types = [source_class(part) for part in label.split("+")]
    return [] if None in types else types


def _readable(label: str | None, comp: str) -> bool:
    """The component's counters are in telemetry (every source behind the label writes some)."""
    types = _source_types(label)
    return bool(types) and all(c.TELEMETRY_KEY and comp in c.COMPONENTS for c in types)


def _estimated(label: str | None) -> bool:
    return any(c.ESTIMATED for c in _source_types(label))


def idle_by_session(objs: Sequence[dict[str, Any]]) -> dict[tuple[Any, Any], dict[str, Any]]:
    """(host, session) -> the idle power its meter measured (its `idle` record)."""
    return {(o.get("host"), o.get("session")): o["idle_power_w"] for o in objs
            if o.get("kind") == "idle" and isinstance(o.get("idle_power_w"), dict)}


def recover_window(begin: dict[str, Any], progress: Sequence[dict[str, Any]],
                   telemetry: Telemetry | None,
                   idle_power_w: dict[str, Any] | None = None) -> dict[str, Any]:
    """The end record of a window whose session died, from its begin/progress records, the
    telemetry its sampler wrote (same session) and the idle power that session measured."""
    last = max(progress, key=lambda p: p.get("t_wall", 0.0)) if progress else None
    start = float(begin.get("start_wall", 0.0))
    comps = components_of(begin, last)
    sources = dict(begin.get("source") or dict.fromkeys(CORE, UNAVAILABLE))
    t_meas = float(last["t_wall"]) if last else start
    energy = {c: (last["energy_j"].get(c) if last else
                  (0.0 if sources.get(c, UNAVAILABLE) != UNAVAILABLE else None))
              for c in comps}
    unc = {c: (last.get("uncertainty_j") or {}).get(c) if last else
           (0.0 if _source_types(sources.get(c)) and all(
               t.CHARACTERISED for t in _source_types(sources.get(c))) else None)
           for c in comps}
    tokens = int(last.get("tokens", begin.get("tokens", 0))) if last else int(
        begin.get("tokens", 0))
    sid = begin.get("session")
    mine = [s for s in (telemetry or []) if s.get("session") == sid]
    alive = max([t_meas, *(float(s["t_wall"]) for s in mine)])
    closed_at, unmeasured, n_samples, t_ends = _extend_from_telemetry(
        begin, sources, energy, unc, mine, telemetry, t_meas, alive, start)
    closed_at = closed_at or ("progress record" if last else "begin record")
    info: dict[str, Any] = {"progress_records": len(progress), "telemetry_samples": n_samples}
    duration = max(alive - start, 0.0)
    secs = max(unmeasured.values(), default=max(alive - t_meas, 0.0))
    info.update(closed_at=closed_at, last_progress_wall=None if last is None else t_meas,
                alive_until_wall=round(alive, 4), unmeasured_s=round(secs, 4))
    est = [c for c in comps if _estimated(sources.get(c)) and energy[c] is not None]
    flags = [*begin.get("flags", []), "recovered"] + [f"estimated-{c}" for c in est]
    notes = [*begin.get("notes", []),
             (f"session {sid} ended without closing this window (killed?): closed at its last "
              f"{closed_at}; {secs:.3g} s after that are not measured and are inside the "
              "uncertainty")]
    notes += [f"estimated {c.upper()} energy ends at the last progress record" for c in est]
    unbounded = [c for c in comps if energy[c] is not None and unc[c] is None
                 and c in unmeasured and _characterised(sources.get(c))]
    notes += [f"{c}: no power was seen before the session died, so its {unmeasured[c]:.3g} s "
              "unmeasured span cannot be bounded: no uncertainty given" for c in unbounded]
    dynamic = dict.fromkeys(comps)
    for c in comps:
        idle_w = (idle_power_w or {}).get(c)
        if energy[c] is not None and isinstance(idle_w, int | float):
            dynamic[c] = round(float(energy[c]) - idle_w * max(t_ends.get(c, t_meas) - start,
                                                               0.0), 6)
    return {"schema": begin.get("schema", 2), "kind": begin.get("window", "phase"),
            "phase": begin.get("phase"), "seq": begin.get("seq", 0),
            "depth": begin.get("depth", 0), "parent": begin.get("parent"),
            "host": begin.get("host"), "session": sid, "start_wall": round(start, 4),
            "end_wall": round(alive, 4), "duration_s": round(duration, 6), "tokens": tokens,
            "status": "recovered",
            "energy_j": {c: None if v is None else round(float(v), 6) for c, v in energy.items()},
            "source": {c: sources.get(c, UNAVAILABLE) if energy[c] is not None
                       else UNAVAILABLE for c in comps},
            "estimated": bool(est),
            "uncertainty_j": {c: None if v is None else round(float(v), 6)
                              for c, v in unc.items()},
            "dynamic_energy_j": dynamic, "per_gpu": {},
            **({"idle_power_w": idle_power_w} if idle_power_w is not None else {}),
            "flags": flags, "notes": notes, "meta": begin.get("meta", {}), "recovered": info}


def _extend_from_telemetry(begin: dict[str, Any], sources: dict[str, str],
                           energy: dict[str, Any], unc: dict[str, Any],
                           mine: list[dict[str, Any]], telemetry: Telemetry | None,
                           t_meas: float, alive: float, start: float
                           ) -> tuple[str | None, dict[str, float], int, dict[str, float]]:
    """Add the counter samples written after the last progress record to `energy` (in place)
    and the unmeasured spans x the highest power seen to `unc` (None when no power was ever
    seen: nothing bounds them); returns (closed at, unmeasured seconds per component,
    telemetry samples used, wall time each component's measured energy ends)."""
    # the sampler writes a line at least every slow interval (only then, where no source
    # has fast reads): a live session would have written one within that
    interval = max(float(begin.get("interval_s") or 0.1),
                   float(begin.get("slow_interval_s") or 0.0))
    closed_at: str | None = None
    unmeasured: dict[str, float] = {}
    t_ends: dict[str, float] = {}
    n_samples = 0
    sid = begin.get("session")
    for comp in list(energy):
        if energy[comp] is None or not _readable(sources.get(comp), comp):
            continue
        t_end = t_meas
        gap = 0.0
        if mine:
            later = Telemetry(s for s in mine if s["t_wall"] >= t_meas)
            later.headers = [h for h in getattr(telemetry, "headers", [])
                             if h.get("session") == sid]
            got = telemetry_energy(later, component=comp)
            counted = counter_times(later, comp)
            if got["energy_j"] is not None and len(counted) >= 2:
                energy[comp] = float(energy[comp]) + float(got["energy_j"])
                t_end, gap = counted[-1], counted[0] - t_meas
                n_samples = max(n_samples, len(counted))
                closed_at = "telemetry sample"
        tail = max(alive - t_end, 0.0) + (interval if mine else float(
            begin.get("progress_every_s") or 0.0))
        unmeasured[comp] = gap + tail
        t_ends[comp] = t_end
        if unc[comp] is not None:
            watts = _max_power(mine, comp, float(energy[comp]), t_end - start)
            unc[comp] = None if watts <= 0 < unmeasured[comp] else \
                float(unc[comp]) + watts * unmeasured[comp]
    return closed_at, unmeasured, n_samples, t_ends


def _max_power(samples: Sequence[dict[str, Any]], comp: str, energy: float,
               duration: float) -> float:
    """The highest power the session is known to have drawn: the window's mean, a power
    sample, or the counter's increase between two telemetry samples (the power just before a
    kill can be far above the window's mean)."""
    watts = energy / duration if duration > 0 else 0.0
    peak = peak_power_w(samples, comp)
    return watts if peak is None else max(watts, peak)


def _characterised(label: str | None) -> bool:
    types = _source_types(label)
    return bool(types) and all(t.CHARACTERISED for t in types)


# ------------------------------------------------------------------------------ writing
def close_dead_windows(run_dir: Path, host: str, session: str) -> list[dict[str, Any]]:
    """Append the recovered end record of every window a dead session on `host` left open."""
    path = Path(run_dir) / "phases.jsonl"
    if not path.is_file():
        return []
    try:
        objs, _, _ = read_jsonl_lines(path, "phase record")
    except (OSError, ValueError) as exc:
        log.warning("%s: not closing windows of earlier sessions (%s)", path, exc)
        return []
    begins = {_key(o, o.get("window", "phase")): o for o in objs if o.get("kind") == "begin"}
    ended = {_key(o, END_KINDS[o["kind"]]) for o in objs if o.get("kind") in END_KINDS}
    dead = [k for k, b in begins.items() if k not in ended and b.get("host") == host
            and b.get("session") != session and not pid_alive(b.get("pid"))]
    if not dead:
        return []
    telemetry = _telemetry_near(path)
    progress: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for o in objs:
        if o.get("kind") == "progress":
            progress.setdefault(_key(o, o.get("window", "phase")), []).append(o)
    idle = idle_by_session(objs)
    out = [recover_window(begins[k], progress.get(k, []), telemetry, idle.get((k[0], k[1])))
           for k in dead]
    count_killed_tokens(path.parent / "metrics.jsonl", objs, out)
    ensure_trailing_newline(path)
    data = "".join(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n" for r in out)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)
    for r in out:
        log.warning("energy ledger: %s", _recovered_label(r))
    return out
