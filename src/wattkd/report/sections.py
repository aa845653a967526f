"""The report's tables and figures in report order. Assembled here, above tables.py, plots.py
and the EPT section (which builds on both), so none of those imports another's builders.
"""

from __future__ import annotations

from typing import Any

from rich.progress import track

from wattkd.report.analysis import Analysis
from wattkd.report.ept_section import decode_vs_batch, energy_vs_latency, ratio_table, steady_table
from wattkd.report.onpolicy_section import onpolicy_plot, onpolicy_table
from wattkd.report.plots import (
    Plot,
    energy_vs_quality,
    ept_vs_batch,
    loss_vs_energy,
    phase_bars,
    plot_notes,
    power_trace,
)
from wattkd.report.tables import (
    Table,
    configs_table,
    ept_table,
    methods_table,
    phases_table,
    quality_table,
    runs_table,
)

__all__ = ["build_plots", "build_tables"]


def build_tables(a: Analysis) -> list[Table]:
    steady = [t for t in (steady_table(a), ratio_table(a)) if t.rows]  # wattkd.ept/2 only
    onpolicy = [t for t in (onpolicy_table(a),) if t.rows]            # on-policy runs only
    return [methods_table(a), runs_table(a), configs_table(a), phases_table(a), *onpolicy,
            ept_table(a), *steady, quality_table(a)]


def build_plots(a: Analysis, *, progress: bool = True) -> list[Plot]:
    """Every figure of the report, in report order (a rich progress bar: each takes ~1 s)."""
    jobs: list[Any] = [energy_vs_quality, phase_bars, ept_vs_batch, decode_vs_batch,
                       energy_vs_latency, loss_vs_energy]
    jobs += [onpolicy_plot] if a.onpolicy else []                    # on-policy runs only
    jobs += [lambda a, r=r: power_trace(r) for r in [*a.students, a.teacher]]
    if not progress:
        return [plot_notes(a, job(a)) for job in jobs]
    return [plot_notes(a, job(a)) for job in track(jobs, description="report figures",
                                                   transient=True)]
