"""The report's on-policy section: each on-policy run's energy per phase (report/onpolicy.py)
beside the off-policy runs of the same report, whose E_run and EPT_train stand at the same
token budget; a table and a figure. Built only when some run has on-policy phases: other
reports are unchanged.
"""

from __future__ import annotations

from wattkd.report.analysis import Analysis, RunResult
from wattkd.report.metrics import Quantity
from wattkd.report.onpolicy import PHASES
from wattkd.report.plots import Plot, _energy_axis, _footer, _plt, _render
from wattkd.report.plots import energy_source_text as src_text
from wattkd.report.tables import Cell, Column, Table

__all__ = ["onpolicy_plot", "onpolicy_table"]

NOT_ON_POLICY = "n/a"
NO_STEPS = "n/a: no step windows (an off-policy method, or phase_every: 0)"
TITLES = {"rollout": ("Rollout tokens", "J per rollout token", "Rollout share",
                      "Rollout time share"),
          "score": ("Scored tokens", "J per scored token", "Score share", "Score time share"),
          "update": ("Update tokens", "J per update token", "Update share",
                     "Update time share")}


def _columns(a: Analysis) -> list[Column]:
    b = a.basis_label
    cols = [Column("run", "Run", numeric=False), Column("method", "Method", numeric=False),
            Column("kind", "Kind", numeric=False), Column("tokens", "Tokens trained"),
            Column("e_run", f"E_run ({b})", "J"), Column("ept_train", f"EPT_train ({b})",
                                                         "J/token"),
            Column("steps", "Metered steps"), Column("e_step", f"Step windows ({b})", "J")]
    for name in PHASES:
        tokens, per, _, _ = TITLES[name]
        cols += [Column(f"tokens_{name}", tokens), Column(f"j_{name}", f"{per} ({b})",
                                                          "J/token")]
    cols += [Column(f"share_{n}", TITLES[n][2], "%") for n in PHASES]
    cols += [Column(f"time_{n}", TITLES[n][3], "%") for n in PHASES]
    cols += [Column("difference", "Phases − step windows", "J"),
             Column("outside_s", "Time outside phases", "s"),
             Column("check", "Phase check", numeric=False)]
    return cols


def _budget_note(r: RunResult, budgets: set[int], by_energy: bool) -> str | None:
    """Why this off-policy row may not compare with the on-policy rows per token. by_energy:
    the on-policy runs stopped at their energy budget (train.energy_budget_j)."""
    if by_energy and r.run.status == "budget":
        return ("stopped at its energy budget, as the on-policy runs did: an equal-energy "
                "comparison where the budgets (train.energy_budget_j) match; tokens trained "
                "differ by design")
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
              "on; share = E(phase) / E(step windows); time share = wall time in the phase's "
              "windows / in the step windows (no counter quantisation). Phase check: Σ phases "
              "− step windows against the sum of their uncertainties.", _columns(a))
    if not a.onpolicy:
        return t
    budgets = {r.tokens_train for r in a.students if r.label in a.onpolicy and r.tokens_train}
    by_energy = all(r.run.status == "budget" for r in a.students if r.label in a.onpolicy)
    for r in a.students:
        cells: dict[str, Cell] = {
            "run": r.label, "method": r.run.method, "kind": r.run.kind,
            "tokens": r.tokens_train if r.tokens_train else Quantity.missing(
                r.e_run[a.basis].gap or "no tokens recorded in the train windows"),
            "e_run": r.e_run[a.basis], "ept_train": r.ept_train}
        s = a.onpolicy.get(r.label)
        if s is None:
            cells["ept_train"] = r.ept_train.with_note(_budget_note(r, budgets, by_energy))
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
            cells[f"time_{name}"] = (round(p.time_share, 2) if p.time_share is not None
                                     else Quantity.missing("no step time", "%"))
        t.add(**cells)
    return t


PHASE_COLOURS = {"rollout": "#1f77b4", "score": "#ff7f0e", "update": "#2ca02c",
                 "outside": "#c7c7c7", "train": "#7f7f7f"}


def onpolicy_plot(a: Analysis) -> Plot:
    """Left: each on-policy run's step energy split into its phases (%). Right: J per
    rollout / scored / update token beside every run's EPT_train (J per training token)."""
    plot = Plot("onpolicy_phases", "On-policy step energy by phase",
                "Left: share of the step windows' energy in each phase (the rest: time outside "
                "the phase windows). Right: J per rollout / scored / update token of each "
                "on-policy run beside EPT_train (E_run / tokens trained) of every run; error "
                "bars ± measurement uncertainty.")
    runs = [r for r in a.students if r.label in a.onpolicy]
    plt = _plt()
    bars = len(a.students) + len(PHASES) * len(runs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, max(3.4, 1.6 + 0.28 * bars)))
    for i, r in enumerate(runs):
        s, start = a.onpolicy[r.label], 0.0
        for name in PHASES:
            share = s.phases[name].share
            width = share.value if share.ok else 0.0
            left.barh(i, width, left=start, color=PHASE_COLOURS[name],
                      label=name if i == 0 else None)
            start += width  # type: ignore[operator]
        left.barh(i, max(0.0, 100.0 - start), left=start, color=PHASE_COLOURS["outside"],
                  label="outside phases" if i == 0 else None)
    left.set_yticks(range(len(runs)), [r.label for r in runs])
    left.set_xlim(0, 100)
    left.set_xlabel(_energy_axis(a, "share of the step windows' energy", "%"))
    left.legend(fontsize=7.5, loc="lower right")
    labels, values, errs, colours = [], [], [], []
    for r in a.students:
        bars = [("EPT_train", r.ept_train, "train")]
        if r.label in a.onpolicy:
            bars += [(f"J/{n} token", a.onpolicy[r.label].phases[n].per_token, n)
                     for n in PHASES]
        for what, q, colour in bars:
            if q.ok and q.value > 0:  # type: ignore[operator]
                labels.append(f"{r.label}: {what}")
                values.append(q.value)
                errs.append(q.unc or 0.0)
                colours.append(PHASE_COLOURS[colour])
    right.barh(range(len(values)), values, xerr=errs, color=colours, capsize=2)
    right.set_yticks(range(len(values)), labels, fontsize=7)
    right.invert_yaxis()
    right.set_xlabel(_energy_axis(a, "energy per token", "J/token"))
    fig.suptitle(plot.title)
    qs = [q for s in a.onpolicy.values() for q in [s.step_energy, *(p.energy for p in
                                                                    s.phases.values())]]
    _footer(fig, src_text(qs, a.basis), bottom=0.12, left=0.2, top=0.88)
    fig.subplots_adjust(wspace=0.9)
    return _render(fig, plot)
