"""Energy of a teacher-cache build: what building it cost, per component and session.

The cache's energy is the sum of its build sessions' `teacher_cache` phase windows (a resumed
build has several). A session that was killed wrote no phase record: its energy is recovered
from the telemetry its sampler wrote until the kill (GPU counters only, labelled), or, where
that is impossible, the session is listed as unmetered and the total is flagged as a lower
bound. Nothing is silently added or dropped.

Who shares that cost (users.jsonl, the split per run) is `wattkd.amortisation`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from wattkd.energy.components import CORE, basis_order, components_of, label_of
from wattkd.energy.metrics import read_phases, read_telemetry, telemetry_energy

log = logging.getLogger(__name__)

__all__ = ["session_energy", "summarize_energy"]


# ----------------------------------------------------------------------------- build energy
def session_energy(cache_dir: Path, session: dict[str, Any],
                   end_wall: float | None) -> dict[str, Any]:
    """Energy of one build session: its phase record, else recovered from telemetry."""
    rec = session.get("record")
    if rec is None:  # killed: the ledger closes its window at its last progress / sample
        rec = _recovered_record(cache_dir, session)
        if rec is not None:
            return {"status": "recovered", "energy_j": dict(rec["energy_j"]),
                    "source": dict(rec["source"]), "estimated": bool(rec.get("estimated")),
                    "uncertainty_j": rec.get("uncertainty_j", {}).get("gpu"),
                    "duration_s": rec.get("duration_s"), "flags": rec.get("flags", [])}
    if rec is not None:
        return {"status": "metered", "energy_j": dict(rec["energy_j"]),
                "source": dict(rec["source"]), "estimated": bool(rec.get("estimated")),
                "uncertainty_j": rec.get("uncertainty_j", {}).get("gpu"),
                "duration_s": rec.get("duration_s"), "flags": rec.get("flags", [])}
    out: dict[str, Any] = {"status": "unmetered", "energy_j": dict.fromkeys(CORE),
                           "source": dict.fromkeys(CORE, "unavailable"),
                           "estimated": False, "uncertainty_j": None, "duration_s": None,
                           "flags": ["interrupted"]}
    start = session.get("start_wall")
    if start is None or not (cache_dir / "telemetry").is_dir():
        return out
    try:
        tel = read_telemetry(cache_dir / "telemetry")
        sid = session.get("session")
        mine = type(tel)(s for s in tel if not sid or s.get("session") == sid)
        mine.headers = tel.headers
        got = telemetry_energy(mine, start_wall=start, end_wall=end_wall, component="gpu")
    except (OSError, ValueError) as exc:
        log.warning("cannot recover the energy of interrupted session %s from telemetry: %s",
                    session.get("session"), exc)
        return out
    if got["energy_j"] is not None:
        out.update(status="recovered-from-telemetry",
                   duration_s=None if got["t1"] is None else got["t1"] - start)
        out["energy_j"]["gpu"] = round(float(got["energy_j"]), 6)
        out["source"]["gpu"] = got["source"]
        out["flags"].append("ends-at-last-telemetry-sample")
    return out


def _recovered_record(cache_dir: Path, session: dict[str, Any]) -> dict[str, Any] | None:
    """The energy ledger's recovered `teacher_cache` window of a killed build session."""

    if not session.get("session") or not (cache_dir / "phases.jsonl").is_file():
        return None
    try:
        recs = read_phases(cache_dir)
    except (OSError, ValueError) as exc:
        log.warning("%s: ledger unreadable, recovering from telemetry instead (%s)", cache_dir,
                    exc)
        return None
    return next((r for r in recs if r.get("status") == "recovered" and r.get("kind") == "phase"
                 and r.get("phase") == "teacher_cache"
                 and r.get("session") == session["session"]), None)


def summarize_energy(cache_dir: Path, sessions: list[dict[str, Any]], tokens: int
                     ) -> dict[str, Any]:
    """The manifest's `energy` block: per-component totals over sessions and a headline."""
    per = []
    for i, s in enumerate(sessions):
        nxt = sessions[i + 1].get("start_wall") if i + 1 < len(sessions) else None
        e = session_energy(cache_dir, s, nxt)
        e.update(session=s.get("session"), host=s.get("host"), tokens=s.get("tokens", 0),
                 parts=s.get("parts", []), start_wall=s.get("start_wall"))
        per.append(e)
    totals: dict[str, float | None] = {}
    sources: dict[str, str] = {}
    notes: list[str] = []
    partial: list[str] = []
    for comp in components_of(*per):
        vals = [p["energy_j"].get(comp) for p in per]
        have = [v for v in vals if v is not None]
        totals[comp] = round(sum(have), 6) if have else None
        labels = sorted({p["source"][comp] for p in per if p["energy_j"].get(comp) is not None})
        sources[comp] = ("+".join(labels) if labels else "unavailable")
        if have and len(have) < len(vals):
            partial.append(comp)
            notes.append(f"{comp}: {len(vals) - len(have)} of {len(vals)} build sessions have "
                         "no figure (interrupted, no telemetry): the total is a lower bound")
    headline = next((c for c in basis_order(totals) if totals[c] is not None), None)
    value = totals[headline] if headline else None
    estimated = headline is not None and sources[headline].startswith("estimated")
    if headline not in (None, "gpu"):
        notes.append(f"no GPU energy counter: the headline figure is the {label_of(headline)}'s")
    unmetered = sum(p["status"] == "unmetered" for p in per)
    recovered = sum(p["status"] == "recovered-from-telemetry" for p in per)
    if recovered:
        notes.append(f"{recovered} interrupted session(s): GPU energy recovered from telemetry "
                     "up to its last sample before the interruption")
    closed = sum(p["status"] == "recovered" for p in per)
    if closed:
        notes.append(f"{closed} killed session(s): energy recovered by the ledger at the last "
                     "progress record / telemetry sample (unmeasured tail inside ±)")
    return {"energy_j": value, "component": headline,
            "source": sources[headline] if headline else "unavailable",
            "estimated": estimated, "components": totals, "sources": sources,
            "tokens": tokens, "j_per_token": None if value is None or not tokens
            else value / tokens,
            "complete": not partial and not unmetered and value is not None,
            "lower_bound": bool(headline in partial) if headline else False,
            "sessions": per, "notes": notes}
