"""Energy of a run's phase windows as report Quantities (E_run and per-phase figures), with
the notes its ledger flags carry. Shared by the analysis and the teacher-side cost shares, so
neither imports the other.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from wattkd.energy.components import label_of
from wattkd.energy.metrics import e_run as ledger_e_run
from wattkd.report.collect import RunData
from wattkd.report.metrics import Quantity

__all__ = ["FLAG_NOTES", "GPU_FLAGS", "phase_energy", "window_tokens"]

FLAG_NOTES = {
    "short-window": "window shorter than telemetry.min_window_s: counter quantisation at the "
                    "edges dominates",
    "high-uncertainty": "uncertainty above 10% of the figure",
    "counter-reset": "an NVML counter reset inside the window; an interval may be missing",
    "counter-power-mismatch": "integrated power and counter disagree by more than 20%",
    "partial-gpu": "some GPUs have no energy counter; the figure sums the others",
    "mig-shared-counter": "MIG: the counter covers every instance on the GPU",
    "counter-glitch": "implausible NVML counter reads were excluded",
    "recovered": "includes windows of sessions that died (closed at their last progress record "
                 "or telemetry sample; the unmeasured tail is inside ±)",
}
# what an estimate is, by source label (others: named generically)
ESTIMATE_NOTES = {"estimated-cpu-time": "CPU energy estimated from CPU time × "
                  "telemetry.cpu_watts_per_core; its uncertainty is not characterised"}
# notes about the GPU counter: never shown on a CPU or DRAM figure
GPU_FLAGS = {"short-window", "high-uncertainty", "counter-reset", "counter-power-mismatch",
             "partial-gpu", "mig-shared-counter", "counter-glitch"}


def _unavailable_reason(recs: Sequence[dict[str, Any]], comp: str) -> str:
    for r in recs:
        for note in r.get("notes") or []:
            if note.startswith(f"{comp} unavailable"):
                return f"{label_of(comp)} energy unavailable ({note.split(':', 1)[-1].strip()})"
        if "telemetry-disabled" in (r.get("flags") or []):
            return f"{label_of(comp)} energy unavailable (telemetry disabled for this run)"
    return f"{label_of(comp)} energy unavailable (source: unavailable)"


def phase_energy(run: RunData, phase: str | None, comp: str) -> tuple[Quantity, Any]:
    """Energy of every window named `phase` (None: the whole metered sessions) as a Quantity."""
    if run.phases is None:
        return Quantity.missing(run.gaps.get("phases", "no energy ledger"), "J"), None
    try:
        fig = ledger_e_run(run.phases, phase, comp)
    except ValueError as exc:
        return Quantity.missing(f"no {phase or 'run'} energy window: {exc}", "J"), None
    if fig.value is None:
        recs = [r for r in run.phases if phase is None or r.get("phase") == phase]
        refused = [n for r in recs for n in r.get("notes") or []
                   if "refused" in n and f" {comp} energy" in n]
        partial = [f for f in fig.flags if f.startswith("partial")]
        reason = (refused[0] if refused else partial[0] if partial
                  else _unavailable_reason(recs, comp))
        return Quantity.missing(reason, "J"), fig
    q = Quantity(fig.value, "J", fig.uncertainty, fig.source, fig.estimated)
    notes = [FLAG_NOTES[f] for f in fig.flags if f in FLAG_NOTES
             and (comp == "gpu" or f not in GPU_FLAGS)]
    if phase == "train":  # cut lines and refusals elsewhere in the ledger still concern E_run
        notes += [n for n in run.energy_notes if "`train`" in n or "truncated line" in n]
    if fig.estimated:
        notes.append(ESTIMATE_NOTES.get(str(fig.source), f"{label_of(comp)} energy estimated "
                                        f"({fig.source}); its uncertainty is not characterised"))
    elif q.unc is None:
        notes.append("uncertainty not recorded by the energy ledger")
    for n in notes:
        q = q.with_note(n)
    return q, fig


def window_tokens(recs: Sequence[dict[str, Any]]) -> int:
    """Tokens of windows: summed over sessions, max over hosts (each host logs global tokens)."""
    per_host: dict[str, int] = defaultdict(int)
    for r in recs:
        per_host[str(r.get("host"))] += int(r.get("tokens") or 0)
    return max(per_host.values(), default=0)
