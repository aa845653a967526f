"""The report's on-policy table: each on-policy run's energy per phase (report/onpolicy.py)
beside the off-policy runs of the same report, whose E_run and EPT_train stand at the same
token budget. Built only when some run has on-policy phases: other reports are unchanged.
"""

from __future__ import annotations

from wattkd.report.analysis import Analysis, RunResult
from wattkd.report.metrics import Quantity
from wattkd.report.onpolicy import PHASES
from wattkd.report.tables import Cell, Column, Table

__all__ = ["onpolicy_table"]

NOT_ON_POLICY = "n/a"
NO_STEPS = "n/a: no step windows (an off-policy method, or phase_every: 0)"
TITLES = {"rollout": ("Rollout tokens", "J per rollout token", "Rollout share"),
          "score": ("Scored tokens", "J per scored token", "Score share"),
          "update": ("Update tokens", "J per update token", "Update share")}


def _columns(a: Analysis) -> list[Column]:
    b = a.basis_label
    cols = [Column("run", "Run", numeric=False), Column("method", "Method", numeric=False),
            Column("kind", "Kind", numeric=False), Column("tokens", "Tokens trained"),
            Column("e_run", f"E_run ({b})", "J"), Column("ept_train", f"EPT_train ({b})",
                                                         "J/token"),
            Column("steps", "Metered steps"), Column("e_step", f"Step windows ({b})", "J")]
    for name in PHASES:
        tokens, per, _ = TITLES[name]
        cols += [Column(f"tokens_{name}", tokens), Column(f"j_{name}", f"{per} ({b})",
                                                          "J/token")]
    cols += [Column(f"share_{n}", TITLES[n][2], "%") for n in PHASES]
    cols += [Column("difference", "Phases − step windows", "J"),
             Column("outside_s", "Time outside phases", "s"),
             Column("check", "Phase check", numeric=False)]
    return cols


def _budget_note(r: RunResult, budgets: set[int]) -> str | None:
    if r.tokens_train in budgets or not budgets:
        return None
    shown = ", ".join(f"{b:,}" for b in sorted(budgets))
    return (f"token budget {r.tokens_train or 0:,} differs from the on-policy runs' ({shown}): "
            "its E_run is not at the same budget")


def onpolicy_table(a: Analysis) -> Table:
    """One row per student run; phase cells n/a for off-policy runs. No rows: no on-policy
    run in this report (the table is then left out)."""
    t = Table("onpolicy", "On-policy phases: rollout, score, update",
              "Energy per phase inside the metered steps of each on-policy run "
              f"({a.basis_label} energy), beside every run's E_run and EPT_train (= E_run / "
              "tokens trained): compare rows at the same tokens trained. J per rollout token = "
              "E(rollout windows) / tokens the student generated; J per scored / update token = "
              "E(score / update windows) / positions the teacher scored / the student trained "
              "on; share = E(phase) / E(step windows). Phase check: Σ phases − step windows "
              "against the sum of their uncertainties.", _columns(a))
    if not a.onpolicy:
        return t
    budgets = {r.tokens_train for r in a.students if r.label in a.onpolicy and r.tokens_train}
    for r in a.students:
        cells: dict[str, Cell] = {
            "run": r.label, "method": r.run.method, "kind": r.run.kind,
            "tokens": r.tokens_train if r.tokens_train else Quantity.missing(
                r.e_run[a.basis].gap or "no tokens recorded in the train windows"),
            "e_run": r.e_run[a.basis], "ept_train": r.ept_train}
        s = a.onpolicy.get(r.label)
        if s is None:
            cells["ept_train"] = r.ept_train.with_note(_budget_note(r, budgets))
            for c in t.columns[6:]:
                cells[c.key] = NOT_ON_POLICY
            cells["check"] = NO_STEPS
            t.add(**cells)
            continue
        cells.update(steps=s.steps, e_step=s.step_energy, difference=s.difference,
                     outside_s=round(s.outside_s, 4), check=s.check_text)
        for name, p in s.phases.items():
            cells[f"tokens_{name}"] = p.tokens
            cells[f"j_{name}"] = p.per_token
            cells[f"share_{name}"] = p.share
        t.add(**cells)
    return t
