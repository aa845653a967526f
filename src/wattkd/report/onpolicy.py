"""On-policy runs' energy by phase, as report figures (docs/metrics.md, "Phases of an
on-policy step").

An on-policy run's ledger holds, inside its `train` windows, a `step` window per metered step
and in it `rollout`, `score` and `update` windows (training/rollouts.StepPhases). Per phase:
E (its windows summed over devices, sessions and hosts, as E_run sums `train` windows), its
tokens, J per token (J per rollout / scored / update token) and its share of the step windows'
energy; and the check that the phases add up to the step windows within their stated
uncertainty. Off-policy runs have no step windows (`step_split` is None for them).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from wattkd.report.collect import RunData
from wattkd.report.energy import phase_energy, window_tokens
from wattkd.report.metrics import Quantity, ratio, total

__all__ = ["DEFINITIONS", "PHASES", "STEP", "PhaseFigure", "StepSplit", "split_json",
           "step_split"]

PHASES = ("rollout", "score", "update")
STEP = "step"
TOKEN_NAMES = {"rollout": "rollout tokens", "score": "scored tokens", "update": "update tokens"}

DEFINITIONS = [
    ("On-policy phases", (
        "Inside an on-policy run's `train` windows, every `phase_every`-th step is a `step` "
        "window holding `rollout` (the student generates), `score` (the teacher forward) and "
        "`update` (student forward, backward, optimizer step) windows. Per phase: E = the sum "
        "of its windows (devices, sessions and hosts summed, like E_run).")),
    ("J per rollout / scored / update token", (
        "E(phase) / its tokens. Rollout tokens: tokens the student generated (up to and "
        "including EOS); scored tokens and update tokens: positions the teacher scored / the "
        "student trained on (micro-batch × (prompt + completion)); all × world size. ± = the "
        "phase's uncertainty / tokens.")),
    ("Phase share", (
        "E(phase) / E(step windows), in %; ± from both relative uncertainties added. Shares "
        "are those of the metered steps.")),
    ("Phase time share", (
        "Σ duration(phase windows) / Σ duration(step windows), in %: where the metered steps' "
        "wall-clock time goes. It carries no counter quantisation, so it still resolves the "
        "split where windows much shorter than the counter's update period leave the energy "
        "shares' uncertainty larger than the shares (energy share / time share = the phase's "
        "power relative to the step's mean power).")),
    ("Phase check", (
        "Σ E(phases) − E(step windows), ± the sum of every one of those windows' "
        "uncertainties: `within` when |difference| ≤ ±, `outside` otherwise (also listed "
        "under Read first); `unchecked` where a figure has no uncertainty (estimated). The "
        "difference is the energy of the step's time outside its phase windows (`Time "
        "outside phases`: the first batch's read before the rollout, and each window's own "
        "edge reads and ledger records, ~1-2 ms per window edge on a CPU host).")),
]


@dataclass(frozen=True)
class PhaseFigure:
    name: str                 # rollout | score | update
    energy: Quantity          # J, its windows summed
    tokens: int
    windows: int
    per_token: Quantity       # J per rollout / scored / update token
    share: Quantity           # % of the step windows' energy
    seconds: float = 0.0      # its windows' wall time (per host)
    time_share: float | None = None   # % of the step windows' wall time


@dataclass(frozen=True)
class StepSplit:
    component: str
    steps: int                # step windows (metered steps)
    step_energy: Quantity     # J, the step windows summed
    step_tokens: int
    phases: dict[str, PhaseFigure]
    difference: Quantity      # Σ phases − step windows, ± the windows' summed uncertainties
    check: str                # within | outside | unchecked
    check_text: str
    outside_s: float          # step windows' time not inside a phase window (per host)


def _windows(run: RunData, name: str) -> list[dict[str, Any]]:
    return [r for r in run.phases or [] if r.get("kind", "phase") == "phase"
            and r.get("phase") == name]


def _count(recs: list[dict[str, Any]]) -> int:
    """Windows per host, the largest (every host meters the same steps)."""
    per_host: dict[str, int] = defaultdict(int)
    for r in recs:
        per_host[str(r.get("host"))] += 1
    return max(per_host.values(), default=0)


def _seconds(recs: list[dict[str, Any]]) -> float:
    """Wall time of windows, per host (every host meters the same steps)."""
    hosts = len({r.get("host") for r in recs}) or 1
    return math.fsum(float(r.get("duration_s", 0.0)) for r in recs) / hosts


def _phase(run: RunData, name: str, component: str, step: Quantity, step_s: float
           ) -> PhaseFigure:
    recs = _windows(run, name)
    if not recs:
        why = f"no {name} windows in the metered steps"
        return PhaseFigure(name, Quantity.missing(why, "J"), 0, 0,
                           Quantity.missing(why, "J/token"), Quantity.missing(why, "%"))
    energy, _ = phase_energy(run, name, component)
    tokens = window_tokens(recs)
    if not energy.ok:
        per = Quantity.missing(energy.gap or "", "J/token")
    elif not tokens:
        per = Quantity.missing(f"no {TOKEN_NAMES[name]} in the metered steps", "J/token")
    else:
        per = Quantity(energy.value / tokens, "J/token",  # type: ignore[operator]
                       None if energy.unc is None else energy.unc / tokens, energy.source,
                       energy.estimated, note=energy.note)
    share = ratio(energy, step, "")
    if share.ok:
        share = Quantity(100.0 * share.value, "%",  # type: ignore[operator]
                         None if share.unc is None else 100.0 * share.unc, share.source,
                         share.estimated, note=energy.note)
    seconds = _seconds(recs)
    return PhaseFigure(name, energy, tokens, _count(recs), per, share, seconds,
                       100.0 * seconds / step_s if step_s > 0 else None)


def _check(phases: list[Quantity], step: Quantity) -> tuple[Quantity, str, str]:
    """Σ phases − step, ± the summed uncertainties, and whether it lies inside them."""
    inner = total(phases, unit="J")
    if not inner.ok or not step.ok:
        why = inner.gap if not inner.ok else step.gap
        return Quantity.missing(why or "", "J"), "unchecked", f"unchecked: {why}"
    diff = inner.value - step.value  # type: ignore[operator]
    uncs = [q.unc for q in phases] + [step.unc]
    tol = None if None in uncs else math.fsum(uncs)  # type: ignore[arg-type]
    q = Quantity(diff, "J", tol, inner.source, inner.estimated or step.estimated)
    if tol is None:
        return q, "unchecked", ("unchecked: no uncertainty recorded for these windows "
                                "(estimated)")
    if abs(diff) <= tol:
        return q, "within", f"within ± {tol:.3g} J"
    return q, "outside", f"outside ± {tol:.3g} J"


def step_split(run: RunData, component: str) -> StepSplit | None:
    """The run's per-phase figures on `component`; None when its ledger has no step window."""
    steps = _windows(run, STEP)
    if not steps:
        return None
    step, _ = phase_energy(run, STEP, component)
    step_s = _seconds(steps)
    phases = {n: _phase(run, n, component, step, step_s) for n in PHASES}
    present = [p.energy for p in phases.values() if p.windows]
    diff, check, text = _check(present, step)
    outside = step_s - math.fsum(p.seconds for p in phases.values())
    return StepSplit(component, _count(steps), step, window_tokens(steps), phases, diff, check,
                     text, outside)


def split_json(s: StepSplit) -> dict[str, Any]:
    """The split as report.json holds it (Quantities as in the tables' JSON)."""
    return {"component": s.component, "steps": s.steps, "step_energy": s.step_energy.to_json(),
            "step_tokens": s.step_tokens, "difference": s.difference.to_json(),
            "check": s.check, "check_text": s.check_text, "outside_s": s.outside_s,
            "phases": {n: {"energy": p.energy.to_json(), "tokens": p.tokens,
                           "windows": p.windows, "j_per_token": p.per_token.to_json(),
                           "share_percent": p.share.to_json(), "seconds": p.seconds,
                           "time_share_percent": p.time_share}
                       for n, p in s.phases.items()}}
