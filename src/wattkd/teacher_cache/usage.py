"""Energy accounting of a cache: what building it cost, and who shares that cost.

The cache's energy is the sum of its build sessions' `teacher_cache` phase windows (a resumed
build has several). A session that was killed wrote no phase record: its energy is recovered
from the telemetry its sampler wrote until the kill (GPU counters only, labelled), or, where
that is impossible, the session is listed as unmetered and the total is flagged as a lower
bound. Nothing is silently added or dropped.

Amortisation: every run that trains from the cache appends itself to `users.jsonl` in the
cache folder (`record_cache_use`), and `amortisation()` splits the cache energy equally over
the distinct runs listed (the cache is a fixed cost paid once for all of them).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from wattkd.energy.components import CORE, basis_order, components_of, label_of
from wattkd.energy.metrics import read_phases, read_telemetry, telemetry_energy
from wattkd.teacher_cache.manifest import CacheError, manifest_sha256, read_cache_manifest

log = logging.getLogger(__name__)

__all__ = [
    "USERS",
    "amortisation",
    "cache_users",
    "record_cache_use",
    "session_energy",
    "summarize_energy",
]

USERS = "users.jsonl"


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


# ------------------------------------------------------------------------------ amortisation
def record_cache_use(cache_dir: str | Path, run_dir: str | Path) -> dict[str, Any]:
    """Register `run_dir` as a user of the cache and return what the run records about it.

    The returned dict goes into the run's run.json as `teacher_cache`. Registering twice (a
    resumed run) is harmless: users are counted once per (run_dir, cache sha256).
    """
    root = Path(cache_dir).resolve()
    m = read_cache_manifest(root)
    sha = manifest_sha256(root)
    run = str(Path(run_dir).resolve())
    if not any(u["run_dir"] == run and u["cache_sha256"] == sha for u in cache_users(root)):
        line = json.dumps({"schema": 1, "run_dir": run, "cache_sha256": sha,
                           "t_wall": round(time.time(), 3),
                           "host": socket.gethostname().split(".")[0]}) + "\n"
        append_line(root / USERS, line.encode())
    e = m.get("energy") or {}
    return {"path": str(root), "sha256": sha, "energy_j": e.get("energy_j"),
            "source": e.get("source", "unavailable"), "estimated": bool(e.get("estimated")),
            "component": e.get("component"), "complete": bool(e.get("complete")),
            "tokens": m["tokens"], "j_per_token": e.get("j_per_token"),
            "signals": m["signals"].get("spec"), "encoding": m["encoding"]}


def cache_users(cache_dir: str | Path, sha256: str | None = None) -> list[dict[str, Any]]:
    """Distinct runs registered on the cache (optionally only those of one manifest sha256)."""
    path = Path(cache_dir) / USERS
    if not path.is_file():
        return []
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            key = (obj["run_dir"], obj["cache_sha256"])
        except (ValueError, KeyError, TypeError):
            log.warning("%s:%d: skipping an unreadable line", path, i + 1)
            continue
        if sha256 is None or obj["cache_sha256"] == sha256:
            seen.setdefault(key, obj)
    return list(seen.values())


def amortisation(cache_dir: str | Path) -> dict[str, Any]:
    """Split the cache's energy equally over the runs that used this cache (this manifest).

    Returns {path, sha256, energy_j, source, estimated, complete, tokens, users [run dirs],
    share_j (per run, None without users or energy)}.
    """
    root = Path(cache_dir).resolve()
    m = read_cache_manifest(root)
    sha = manifest_sha256(root)
    users = sorted(u["run_dir"] for u in cache_users(root, sha))
    e = m.get("energy") or {}
    value = e.get("energy_j")
    return {"path": str(root), "sha256": sha, "energy_j": value,
            "source": e.get("source", "unavailable"), "estimated": bool(e.get("estimated")),
            "complete": bool(e.get("complete")), "tokens": m["tokens"], "users": users,
            "share_j": None if value is None or not users else value / len(users)}


def append_line(path: Path, data: bytes) -> None:
    """One write on an O_APPEND descriptor under an exclusive lock: concurrent students of a
    Slurm array never interleave their lines."""
    if not path.parent.is_dir():
        raise CacheError(f"{path.parent}: cache folder missing")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data)
    finally:
        os.close(fd)
