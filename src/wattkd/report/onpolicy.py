"""On-policy runs' energy by phase, beside off-policy runs (docs/metrics.md, "Phases of an
on-policy step").

An on-policy run's ledger holds, inside its `train` window, a `step` window per metered step
and in it `rollout`, `score` and `update` windows (training/rollouts.StepPhases). Per phase:
E (the sum of its windows, `energy.metrics.e_run`), tokens, J per token (J per rollout token,
per scored token, per update token) and the share of the step windows' energy. Any run, on- or
off-policy, also gets EPT_train (E_run / tokens trained), so the rows compare at the same
token budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wattkd.energy.metrics import e_run, read_phases

PHASES = ("rollout", "score", "update")
STEP = "step"


def phase_split(phases: Sequence[dict[str, Any]], component: str = "gpu"
                ) -> dict[str, Any] | None:
    """Per-phase figures of one run's ledger records, None when it has no step windows."""
    if not any(r.get("kind", "phase") == "phase" and r.get("phase") == STEP for r in phases):
        return None
    step = e_run(phases, STEP, component)
    out: dict[str, Any] = {"component": component, "step_energy_j": step.value,
                           "step_uncertainty_j": step.uncertainty, "step_tokens": step.tokens,
                           "source": step.source, "estimated": step.estimated}
    total = 0.0
    for name in PHASES:
        try:
            fig = e_run(phases, name, component)
        except ValueError:   # no window of this phase (e.g. no rollout with lambda 0)
            out[name] = {"energy_j": 0.0, "uncertainty_j": 0.0, "tokens": 0, "seconds": 0.0,
                         "j_per_token": None, "share": 0.0}
            continue
        e = fig.value
        out[name] = {"energy_j": e, "uncertainty_j": fig.uncertainty, "tokens": fig.tokens,
                     "seconds": fig.duration_s,
                     "j_per_token": None if e is None or not fig.tokens else e / fig.tokens,
                     "share": None if e is None or not step.value else e / step.value}
        total += e or 0.0
    out["phases_energy_j"] = total
    return out


def run_row(run_dir: Path, component: str = "gpu") -> dict[str, Any]:
    """One run's row: EPT_train and, for on-policy runs, the phase split."""
    phases = read_phases(run_dir)
    train = e_run(phases, "train", component)
    return {"run": str(run_dir), "train_energy_j": train.value, "tokens": train.tokens,
            "ept_train": None if train.value is None or not train.tokens
            else train.value / train.tokens,
            "phases": phase_split(phases, component)}


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The table: one line per run, phase columns empty for off-policy runs."""
    def num(v: Any, spec: str = ".3g") -> str:
        return "" if v is None else format(v, spec)

    lines = [("| run | tokens | J/token (train) | J/rollout tok | J/scored tok | J/update tok | "
             "rollout % | score % | update % |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["phases"] or {}
        cells = [num(p.get(n, {}).get("j_per_token")) for n in PHASES]
        shares = [num(None if p.get(n, {}).get("share") is None else 100 * p[n]["share"],
                      ".1f") for n in PHASES]
        lines.append(f"| {Path(r['run']).parent.name}/{Path(r['run']).name} | {r['tokens']} | "
                     f"{num(r['ept_train'])} | " + " | ".join(cells + shares) + " |")
    return "\n".join(lines)
