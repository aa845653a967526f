"""The original monitor.py's telemetry.jsonl -> wattkd telemetry samples and one `train` window.

Its lines are {"timestamp": ISO, "gpus": [{gpu_index, gpu_name, power_watts, energy_mJ,
memory_used_MB, memory_total_MB, gpu_utilization_percent, ...}], "cpu": {...}}, one a second.
`energy_mJ` is NVML's total-energy counter multiplied by 1000: NVML returns mJ, so the field
holds µJ. The unit is not trusted from the name: it is the power of 1000 (J, mJ or µJ) that
makes the counter's increase match the integral of `power_watts` over the same samples.
The window energy then comes from wattkd's own counter reader (`telemetry_energy`: resets and
glitches judged as for wattkd's telemetry), with the power integral as the cross-check.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from wattkd.config import TelemetryConfig
from wattkd.energy.counters import PowerIntegrator
from wattkd.energy.sources import NvmlSource
from wattkd.energy.telemetry import Telemetry, telemetry_energy
from wattkd.importers.seed_layout import SeedImportError

__all__ = ["UNITS", "SeedTelemetry", "detect_unit", "read_seed_telemetry"]

UNITS = {"J": 1.0, "mJ": 1e3, "uJ": 1e6}   # raw units per joule
UNIT_TOLERANCE = 0.1                         # |log10(ratio / unit)|: within a factor 1.26
COUNTER_PERIOD_S = 0.1                       # NVML counter update period (docs/metrics.md)
MISMATCH = 0.2                               # counter vs power integral (ledger's rule)


@dataclass
class SeedTelemetry:
    """One telemetry.jsonl read: wattkd samples, the window's energy and what was found."""

    lines: list[dict[str, Any]]            # wattkd telemetry lines (header + samples)
    window: dict[str, Any]                 # the `train` end record for phases.jsonl
    unit: str | None                       # detected unit of energy_mJ, None: undetermined
    ratio: float | None                    # counter increase (raw) / power integral (J)
    duration_s: float
    gpus: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _epoch(ts: Any, where: str) -> float:
    try:
        return datetime.fromisoformat(str(ts)).timestamp()
    except ValueError:
        raise SeedImportError(f"{where}: timestamp {ts!r} is not an ISO 8601 time") from None


def parse_lines(path: Path, rel: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Records of the file; a cut last line (the monitor killed mid-write) is skipped and
    named, any other unreadable line is an error naming file and line."""
    raw = path.read_text(encoding="utf-8", errors="replace").splitlines()
    numbered = [(i + 1, ln) for i, ln in enumerate(raw) if ln.strip()]
    recs, notes = [], []
    for pos, (n, line) in enumerate(numbered):
        try:
            obj = json.loads(line)
        except ValueError:
            if pos == len(numbered) - 1:
                notes.append(f"{rel}/telemetry.jsonl:{n}: truncated last line skipped (the "
                             "monitor was stopped while writing it)")
                continue
            raise SeedImportError(f"{rel}/telemetry.jsonl:{n}: not valid JSON (a cut line is "
                                  "only expected as the last line)") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("gpus"), list):
            raise SeedImportError(f"{rel}/telemetry.jsonl:{n}: expected an object with "
                                  "'timestamp' and a 'gpus' list")
        obj["_t"] = _epoch(obj.get("timestamp"), f"{rel}/telemetry.jsonl:{n}")
        recs.append(obj)
    if len(recs) < 2:
        raise SeedImportError(f"{rel}/telemetry.jsonl: {len(recs)} readable sample(s); at "
                              "least 2 are needed for an energy window")
    return recs, notes


def _gpu_map(rec: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(g["gpu_index"]): g for g in rec["gpus"] if g.get("gpu_index") is not None}


def detect_unit(recs: list[dict[str, Any]]) -> tuple[str | None, float | None]:
    """(unit, ratio): ratio = counter increase / integral of power over the same intervals,
    both summed over GPUs; the unit is the power of 1000 it matches (None: none does)."""
    counted, joules = 0.0, 0.0
    for a, b in itertools.pairwise(recs):
        dt = b["_t"] - a["_t"]
        ga, gb = _gpu_map(a), _gpu_map(b)
        for i in ga.keys() & gb.keys():
            ea, eb = ga[i].get("energy_mJ"), gb[i].get("energy_mJ")
            pa, pb = ga[i].get("power_watts"), gb[i].get("power_watts")
            if None in (ea, eb, pa, pb) or dt <= 0 or eb < ea:
                continue
            counted += eb - ea
            joules += 0.5 * (pa + pb) * dt
    if joules <= 0 or counted <= 0:
        return None, None
    ratio = counted / joules
    for unit, per_j in UNITS.items():
        if abs(math.log10(ratio / per_j)) <= UNIT_TOLERANCE:
            return unit, ratio
    return None, ratio


def _uuid(rel: str, index: int) -> str:
    return f"seed-{rel.replace(' ', '_').replace('/', '-')}-gpu{index}"


def _wattkd_lines(recs: list[dict[str, Any]], rel: str, per_j: float | None
                  ) -> list[dict[str, Any]]:
    """Header + samples in wattkd's telemetry schema 1 (energy_mj = the counter in mJ)."""
    host, session, t0 = f"seed-{rel.replace(' ', '_').replace('/', '-')}", "seed-import", recs[0]["_t"]
    gpus = {i: g for r in recs for i, g in _gpu_map(r).items()}
    dts = sorted(b["_t"] - a["_t"] for a, b in itertools.pairwise(recs))
    header = {"schema": 1, "type": "header", "host": host, "session": session, "t_wall": t0,
              "t_mono": 0.0, "interval_s": dts[len(dts) // 2], "slow_interval_s": dts[len(dts) // 2],
              "gpus": [{"uuid": _uuid(rel, i), "index": i, "cuda_index": i,
                        "name": g.get("gpu_name"), "mig": False,
                        "energy_source": NvmlSource.LABEL, "power_source": "power-usage",
                        "power_avg": False, "power_limit_w": None} for i, g in sorted(gpus.items())],
              "rapl": [], "unavailable": {"rapl": "not recorded by the original monitor"},
              "imported": {"format": "seed", "file": f"{rel}/telemetry.jsonl"}}
    out = [header]
    for r in recs:
        gsec = {}
        for i, g in _gpu_map(r).items():
            e = g.get("energy_mJ")
            mb = 1024 ** 2
            gsec[_uuid(rel, i)] = {
                "power_w": g.get("power_watts"), "power_avg_w": None,
                "energy_mj": None if e is None or per_j is None else e * 1e3 / per_j,
                "util_pct": g.get("gpu_utilization_percent"), "temp_c": g.get("temperature_C"),
                "mem_used_b": None if g.get("memory_used_MB") is None else g["memory_used_MB"] * mb,
                "mem_total_b": None if g.get("memory_total_MB") is None else g["memory_total_MB"] * mb,
                "sm_clock_mhz": None}
        cpu = r.get("cpu") or {}
        out.append({"schema": 1, "type": "sample", "host": host, "session": session,
                    "t_wall": r["_t"], "t_mono": r["_t"] - t0, "slow": True, "gpu": gsec,
                    "cpu": {"util_pct": cpu.get("cpu_utilization_percent"),
                            "ram_used_b": None, "ram_total_b": None}})
    return out


def read_seed_telemetry(path: Path, rel: str) -> SeedTelemetry:
    """Read, detect the counter's unit, and build the run's `train` window from the counters."""
    recs, notes = parse_lines(path, rel)
    unit, ratio = detect_unit(recs)
    lines = _wattkd_lines(recs, rel, UNITS[unit] if unit else None)
    tel = Telemetry([ln for ln in lines if ln["type"] == "sample"])
    tel.headers = [lines[0]]
    fig = telemetry_energy(tel, component="gpu")
    window = _window(lines, fig, unit, ratio, rel)
    if unit is None:
        notes.append(f"{rel}: the energy_mJ counter matches no unit (counter / power integral "
                     f"= {ratio if ratio is None else f'{ratio:.4g}'}): E_run is the integral of "
                     "power_watts instead")
    gpus = [g["name"] for g in lines[0]["gpus"]]
    return SeedTelemetry(lines, window, unit, ratio, window["duration_s"], gpus, notes)


def _window(lines: list[dict[str, Any]], fig: dict[str, Any], unit: str | None,
            ratio: float | None, rel: str) -> dict[str, Any]:
    """The ledger's end record (schema 2) of the whole monitored job, as a `train` window."""
    header, samples = lines[0], lines[1:]
    per_gpu: dict[str, dict[str, Any]] = {}
    gain = TelemetryConfig().gpu_gain_error
    for g in header["gpus"]:
        integ = PowerIntegrator()
        for s in samples:
            integ.add(s["t_mono"], (s["gpu"].get(g["uuid"]) or {}).get("power_w"))
        e = fig["devices"].get(f"{header['session']}:{g['uuid']}") if unit else integ.joules
        powers = [(s["gpu"].get(g["uuid"]) or {}).get("power_w") for s in samples]
        powers = [p for p in powers if p is not None]
        unc = None if e is None else (COUNTER_PERIOD_S * (powers[0] + powers[-1]) if powers
                                      else 0.0) + gain * e
        per_gpu[g["uuid"]] = {"index": g["index"], "cuda_index": g["index"], "name": g["name"],
                              "mig": False, "energy_j": e, "uncertainty_j": unc,
                              "integrated_power_j": integ.joules, "power_samples": integ.samples,
                              "resets": 0, "glitches": 0}
    vals = [v["energy_j"] for v in per_gpu.values()]
    energy = math.fsum(vals) if vals and None not in vals else None
    uncs = [v["uncertainty_j"] for v in per_gpu.values()]
    integrated = math.fsum(v["integrated_power_j"] for v in per_gpu.values())
    flags = ["imported"]
    if unit is None:
        flags.append("energy-unit-undetermined")
    rat = energy / integrated if energy and integrated else None
    if rat is not None and abs(rat - 1) > MISMATCH:
        flags.append("counter-power-mismatch")
    if fig.get("glitches"):
        flags.append("counter-glitch")
    t0, t1 = samples[0]["t_wall"], samples[-1]["t_wall"]
    source = NvmlSource.LABEL if unit else NvmlSource.POWER_LABEL
    return {
        "schema": 2, "kind": "phase", "phase": "train", "seq": 0, "depth": 0, "parent": None,
        "host": header["host"], "session": header["session"], "start_wall": t0, "end_wall": t1,
        "duration_s": t1 - t0, "tokens": 0, "status": "ok",
        "energy_j": {"gpu": energy, "cpu": None, "dram": None},
        "source": {"gpu": source, "cpu": "unavailable", "dram": "unavailable"},
        "estimated": False,
        "uncertainty_j": {"gpu": math.fsum(uncs) if energy is not None and None not in uncs
                          else None, "cpu": None, "dram": None},
        "dynamic_energy_j": {"gpu": None, "cpu": None, "dram": None}, "per_gpu": per_gpu,
        "integrated_power_j": {"gpu": integrated, "power_source": "power-usage",
                               "samples": len(samples), "ratio": rat,
                               "diff_j": None if energy is None else energy - integrated},
        "counter_period_s": COUNTER_PERIOD_S,
        "counter_period_source": "default (~100 ms, docs/metrics.md)",
        "flags": flags,
        "notes": ["cpu unavailable: the original monitor recorded no CPU energy",
                  (f"imported from {rel}/telemetry.jsonl: the whole monitored job (model loading "
                  "and saving included; the original has no phase markers)"),
                  (f"energy_mJ unit: {unit or 'undetermined'} (counter / power integral = "
                  f"{'n/a' if ratio is None else f'{ratio:.6g}'})")],
        "meta": {"imported": "seed", "energy_unit": unit, "unit_ratio": ratio},
    }
