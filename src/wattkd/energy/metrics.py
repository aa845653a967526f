"""Energy metrics as pure functions on the ledger (phases.jsonl) and telemetry files.

Definitions (docs/metrics.md; the one meaning of E_run in code, docs and report):
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

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wattkd.energy.components import check
from wattkd.energy.recovery import read_ledger
from wattkd.energy.telemetry import (
    KNOWN_SCHEMAS,
    Telemetry,
    read_jsonl_lines,
    read_telemetry,
    telemetry_energy,
)

# the file readers live in energy.telemetry; they are part of this module's public interface
__all__ = ["E_RUN_PHASE", "KNOWN_SCHEMAS", "EnergyFigure", "PowerFigure",
           "Telemetry", "average_power", "e_avg", "e_metered", "e_run", "ept", "ept_train",
           "read_jsonl_lines", "read_phases", "read_telemetry", "telemetry_energy"]

log = logging.getLogger(__name__)

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


def read_phases(path: str | Path, telemetry: Telemetry | None = None) -> list[dict[str, Any]]:
    """One record per window of a phases.jsonl file (or of a run directory's phases.jsonl):
    windows of dead sessions recovered, negative ones refused, cut lines skipped; the returned
    `recovery.Ledger` names each of those (`.labels()`)."""
    p = Path(path)
    if p.is_dir():
        p = p / "phases.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"no energy ledger at {p} (expected a phases.jsonl file)")
    return read_ledger(p, telemetry)

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
    check(component)
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
