"""Report figures (matplotlib, Agg): PNG + SVG bytes, each labelled with its energy source.

Every energy axis says which component it shows and whether it is measured or `estimated`,
and every figure states its uncertainty (error bars, or a line saying it is not recorded).
A figure that cannot be drawn (no input) is returned as a `Plot` with `gap` set, so the report
shows why it is missing instead of an empty chart.
"""

from __future__ import annotations

import io
import logging
import math
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from wattkd.distill.methods.registry import report_colours
from wattkd.energy.components import additive, label_of
from wattkd.report.analysis import Analysis, RunResult
from wattkd.report.metrics import Quantity, pareto_front

log = logging.getLogger(__name__)

MAX_POINTS = 2000
KIND_COLOURS = report_colours()  # each method's declared colour; the teacher black


@dataclass
class Plot:
    name: str                      # file stem: plots/<name>.png|svg
    title: str
    caption: str
    png: bytes = b""
    svg: bytes = b""
    gap: str | None = None         # why it was not drawn
    omitted: list[str] = field(default_factory=list)   # "run: reason" left out of the figure
    notes: list[str] = field(default_factory=list)     # caveats of figures it shows (footnotes)


def _plt() -> Any:
    import matplotlib  # lazy: slow import, report figures only

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "wattkd", "svg.fonttype": "none", "figure.dpi": 100,
                         "axes.grid": True, "grid.alpha": 0.3, "font.size": 9})
    return plt


def _render(fig: Any, plot: Plot) -> Plot:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plot.png = buf.getvalue()
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    plot.svg = buf.getvalue()
    plt.close(fig)
    return plot


def _colour(kind: str, i: int = 0) -> str:
    if kind in KIND_COLOURS:
        return KIND_COLOURS[kind]
    palette = ["#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#d62728"]
    return palette[i % len(palette)]


def energy_source_text(qs: Sequence[Quantity], component: str) -> str:
    """'GPU energy: nvml-counter (measured); ± measurement uncertainty' for a figure footer."""
    have = [q for q in qs if q.ok]
    if not have:
        return f"{label_of(component)} energy: unavailable"
    sources = sorted({s for q in have for s in (q.source or "unknown").split("+")})
    est = any(q.estimated for q in have)
    kind = "estimated" if est else "measured"
    unc = ("error bars: ± measurement uncertainty" if all(q.unc is not None for q in have)
           else "uncertainty not characterised for some or all points (no error bar)")
    return f"{label_of(component)} energy: {', '.join(sources)} ({kind}); {unc}"


def _footer(fig: Any, text: str, *, bottom: float = 0.12, left: float = 0.1,
            top: float = 0.92) -> None:
    """Source/uncertainty line under the axes (manual layout: tight bbox doubles render time)."""
    lines = textwrap.wrap(text, width=int(fig.get_figwidth() * 16))
    inch = 1 / fig.get_figheight()
    fig.subplots_adjust(bottom=bottom + (0.16 * len(lines) + 0.1) * inch, left=left, right=0.97,
                        top=top)
    fig.text(0.01, 0.01, "\n".join(lines), ha="left", va="bottom", fontsize=7.5,
             color="#333333")


def _energy_axis(a: Analysis, what: str, unit: str = "J") -> str:
    est = "estimated" in a.basis_label
    return f"{what} [{unit}] — {label_of(a.basis)}{', estimated' if est else ', measured'}"


# ----------------------------------------------------------------------------- figures
def energy_vs_quality(a: Analysis) -> Plot:
    q = a.quality_label
    plot = Plot("energy_vs_quality", f"Energy vs {q} per method",
                f"Each small marker is one student run (E_total vs {q}); large diamonds are the "
                "method means. The dashed line joins the Pareto front of the methods (less "
                "energy, more retained quality).")
    pts = [r for r in a.students if r.e_total.ok and r.quality.ok]
    plot.omitted = [f"{r.label}: {r.e_total.gap or r.quality.gap}" for r in a.students
                    if r not in pts]
    if not pts:
        plot.gap = "no student has both an energy figure and a quality figure"
        return plot
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, m in enumerate(a.methods):
        rs = [r for r in m.runs if r in pts]
        if not rs:
            continue
        c = _colour(m.kind, i)
        ax.errorbar([r.e_total.value for r in rs], [r.quality.value for r in rs],
                    xerr=[r.e_total.unc or 0 for r in rs], yerr=[r.quality.unc or 0 for r in rs],
                    fmt="o", ms=5, color=c, alpha=0.55, capsize=2, lw=0.8)
        if m.e_total.ok and m.om.ok:
            ax.errorbar([m.e_total.value], [m.om.value], xerr=[m.e_total.unc or 0],
                        yerr=[m.om.unc or 0], fmt="D", ms=9, color=c, capsize=3,
                        markeredgecolor="black", label=f"{m.method} ({m.kind})")
        else:
            ax.plot([], [], "o", color=c, label=f"{m.method} ({m.kind}, no mean)")
    means = [m for m in a.methods if m.e_total.ok and m.om.ok]
    if means:
        front = sorted((means[i] for i in pareto_front([(m.e_total.value, m.om.value)
                                                        for m in means])),
                       key=lambda m: m.e_total.value)
        ax.plot([m.e_total.value for m in front], [m.om.value for m in front], "--", color="#d62728",
                lw=1.2, zorder=0, label="Pareto front")
        for m in front:
            ax.annotate(m.method, (m.e_total.value, m.om.value), textcoords="offset points",
                        xytext=(6, 6), fontsize=8, color="#d62728")
    ax.axhline(1.0, color="black", lw=0.6, ls=":", label="teacher = 1")
    ax.set_xlabel(_energy_axis(a, "E_total per student (E_run + teacher-cache share)"))
    ax.set_ylabel(f"{q} (teacher = 1) [–]")
    ax.set_title(plot.title)
    ax.legend(fontsize=7.5, loc="best")
    _footer(fig, energy_source_text([r.e_total for r in pts], a.basis)
            + ("; quality error bars: ± from task stderr" if a.quality_basis == "tasks" else ""))
    return _render(fig, plot)


def phase_bars(a: Analysis) -> Plot:
    plot = Plot("phase_energy", "Energy per phase (stacked)",
                f"{label_of(a.basis)} energy of each top-level phase window per run, stacked; "
                "the error bar is the summed uncertainty of the stack.")
    runs = [*a.students, a.teacher]
    drawn = [r for r in runs if any(p.energy[a.basis].ok for p in r.phases)]
    plot.omitted = [f"{r.label}: {r.run.gaps.get('phases') or 'no ' + label_of(a.basis) + ' energy'}"
                    for r in runs if r not in drawn]
    if not drawn:
        plot.gap = f"no run has {label_of(a.basis)} energy per phase"
        return plot
    plt = _plt()
    phases: list[str] = []
    for r in drawn:
        for p in r.phases:
            if p.phase not in phases:
                phases.append(p.phase)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(drawn) + 2), 4.5))
    bottoms = [0.0] * len(drawn)
    cmap = plt.get_cmap("tab10")
    for j, ph in enumerate(phases):
        vals = []
        for r in drawn:
            p = next((p for p in r.phases if p.phase == ph), None)
            vals.append(p.energy[a.basis].value if p and p.energy[a.basis].ok else 0.0)
        ax.bar(range(len(drawn)), vals, bottom=bottoms, color=cmap(j % 10), label=ph)
        bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
    errs = []
    for r in drawn:
        us = [p.energy[a.basis].unc for p in r.phases if p.energy[a.basis].ok]
        errs.append(sum(u for u in us if u is not None) if all(u is not None for u in us)
                    else 0.0)
    ax.errorbar(range(len(drawn)), bottoms, yerr=errs, fmt="none", color="black", capsize=3)
    ax.set_xticks(range(len(drawn)), [r.label for r in drawn], rotation=30, ha="right")
    ax.set_axisbelow(True)
    ax.set_ylabel(_energy_axis(a, "energy"))
    ax.set_title(plot.title)
    ax.legend(title="phase", fontsize=7.5)
    qs = [p.energy[a.basis] for r in drawn for p in r.phases]
    _footer(fig, energy_source_text(qs, a.basis), bottom=0.2)
    return _render(fig, plot)


def _thin(xs: list[float], *ys: list[Any]) -> tuple[list[float], ...]:
    if len(xs) <= MAX_POINTS:
        return (xs, *ys)
    step = math.ceil(len(xs) / MAX_POINTS)
    return (xs[::step], *(y[::step] for y in ys))


def power_traces(a: Analysis) -> list[Plot]:
    """One figure per run: GPU power (W) and utilisation (%) over time, one line per GPU."""
    return [power_trace(r) for r in [*a.students, a.teacher]]


def power_trace(r: RunResult) -> Plot:
    """GPU power and utilisation of one run over time (a gap when it has no telemetry)."""
    name = "power_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", r.label)
    plot = Plot(name, f"Power and utilisation — {r.label}",
                "Per-GPU board power and utilisation from the telemetry sampler, over time "
                "since the first sample (all hosts).")
    gap = r.run.gaps.get("telemetry")
    if gap or r.run.telemetry is None:
        plot.gap = gap or "no telemetry"
        return plot
    return _trace_figure(plot, r.run.telemetry)


def _trace_figure(plot: Plot, tel: Any) -> Plot:
    samples = list(tel)
    if not samples:
        plot.gap = "telemetry holds no samples"
        return plot
    t0 = samples[0]["t_wall"]
    names: dict[str, str] = {}
    power_src: set[str] = set()
    for h in tel.headers:
        for g in h.get("gpus", []):
            names[g["uuid"]] = f"{h.get('host')}:GPU{g.get('index')}"
            power_src.add(str(g.get("power_source")))
    series: dict[str, dict[str, list[Any]]] = {}
    cpu_t: list[float] = []
    cpu_u: list[float] = []
    for s in samples:
        t = s["t_wall"] - t0
        for u, v in (s.get("gpu") or {}).items():
            d = series.setdefault(u, {"t": [], "p": [], "ut": [], "u": []})
            if v.get("power_w") is not None:
                d["t"].append(t)
                d["p"].append(v["power_w"])
            if v.get("util_pct") is not None:
                d["ut"].append(t)
                d["u"].append(v["util_pct"])
        cpu = s.get("cpu") or {}
        if cpu.get("util_pct") is not None:
            cpu_t.append(t)
            cpu_u.append(cpu["util_pct"])
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    for i, (u, d) in enumerate(sorted(series.items(), key=lambda kv: names.get(kv[0], kv[0]))):
        label = names.get(u, u[:12])
        t, p = _thin(d["t"], d["p"])
        ax1.plot(t, p, lw=0.9, label=label, color=plt.get_cmap("tab10")(i % 10))
        t, ut = _thin(d["ut"], d["u"])
        ax2.plot(t, ut, lw=0.9, label=label, color=plt.get_cmap("tab10")(i % 10))
    if cpu_t:
        t, cu = _thin(cpu_t, cpu_u)
        ax2.plot(t, cu, lw=0.9, ls="--", color="black", label="CPU (host)")
    if not series:
        ax1.text(0.5, 0.5, "no GPU in the telemetry (no NVML on this host)",
                 transform=ax1.transAxes, ha="center", va="center", color="#d62728")
    src = ", ".join(sorted(power_src)) or "none"
    ax1.set_ylabel("board power [W]")
    ax1.set_ylim(bottom=0)
    ax2.set_ylabel("utilisation [%]")
    ax2.set_ylim(0, 105)
    ax2.set_xlabel("time since first sample [s]")
    ax1.set_title(plot.title)
    if series:
        ax1.legend(fontsize=7, ncol=4, loc="upper right")
    if series or cpu_t:
        ax2.legend(fontsize=7, ncol=4, loc="upper right")
    _footer(fig, f"power source: NVML {src} (measured; 'power-usage' is a ~1 s average on "
                 "H100-class cards, so short spikes are smoothed); energy figures come from the "
                 "counters, not from this trace; no per-sample uncertainty")
    return _render(fig, plot)


def ept_vs_batch(a: Analysis) -> Plot:
    plot = Plot("ept_vs_batch", "Inference EPT vs batch size",
                f"EPT_total ({label_of(a.basis)}) from each run's ept.json; the teacher in "
                "black. Error bars: ± measurement uncertainty per token.")
    runs = [a.teacher, *a.students]
    drawn = [r for r in runs if any(p.ept_total.ok for p in r.ept.values())]
    plot.omitted = [f"{r.label}: {r.run.gaps.get('ept') or 'no ' + label_of(a.basis) + ' EPT'}"
                    for r in runs if r not in drawn]
    if not drawn:
        plot.gap = "no run has an EPT result with energy"
        return plot
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    kinds = [r.run.kind for r in drawn]
    for i, r in enumerate(drawn):
        pts = [(b, p.ept_total) for b, p in sorted(r.ept.items()) if p.ept_total.ok]
        same = kinds[: i].count(r.run.kind)
        ax.errorbar([b for b, _ in pts], [q.value for _, q in pts],
                    yerr=[q.unc or 0 for _, q in pts], marker="o", ms=4, capsize=2,
                    lw=2 if r is a.teacher else 1, color=_colour(r.run.kind, i),
                    ls=["-", "--", ":", "-."][same % 4], label=r.label)
    # lazy: slow import, report figures only
    from matplotlib.ticker import FuncFormatter, NullFormatter

    sizes = sorted({b for r in drawn for b in r.ept})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("batch size [sequences]")
    ax.set_ylabel(_energy_axis(a, "EPT_total", "J/token"))
    ax.set_title(plot.title)
    ax.legend(fontsize=7.5)
    qs = [p.ept_total for r in drawn for p in r.ept.values()]
    _footer(fig, energy_source_text(qs, a.basis)
            + (f"; Eff_overall uses batch size {a.ept_batch}" if a.ept_batch else ""), left=0.13)
    return _render(fig, plot)


def loss_vs_energy(a: Analysis) -> Plot:
    plot = Plot("loss_vs_energy", "Training loss vs cumulative energy",
                "Training loss (lines) and held-out loss (markers) against the energy metered "
                "so far, as logged in metrics.jsonl by the training loop.")
    runs = [*a.students]
    series = []
    for r in runs:
        tr = [(m["energy_j"], m["loss"]) for m in r.run.metrics
              if m.get("kind", "train") == "train" and m.get("energy_j") is not None
              and m.get("loss") is not None]
        ev = [(m["energy_j"], m.get("heldout_loss", m.get("heldout_nll"))) for m in r.run.metrics
              if m.get("kind") == "eval" and m.get("energy_j") is not None
              and m.get("heldout_loss", m.get("heldout_nll")) is not None]
        if tr or ev:
            series.append((r, tr, ev))
        else:
            plot.omitted.append(f"{r.label}: " + (r.run.gaps.get("metrics") or
                                                  "no logged step has an energy figure"))
    if not series:
        plot.gap = "no run logged training loss with energy (metrics.jsonl energy_j is null)"
        return plot
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (r, tr, ev) in enumerate(series):
        c = _colour(r.run.kind, i)
        same = [s[0].run.kind for s in series[:i]].count(r.run.kind)
        if tr:
            ax.plot([x for x, _ in tr], [y for _, y in tr], color=c, lw=1,
                    ls=["-", "--", ":", "-."][same % 4], label=r.label)
        if ev:
            ax.plot([x for x, _ in ev], [y for _, y in ev], "s", color=c, ms=4)
    comps = _logged_components(a)
    ax.set_xlabel(f"cumulative metered energy [J] — {comps}")
    ax.set_ylabel("loss [nats/token]")
    ax.set_title(plot.title)
    ax.legend(fontsize=7.5)
    _footer(fig, f"energy axis: the training loop's running meter total ({comps}); per-point "
                 "uncertainty not recorded (each run's final E_run ± is in the Runs table); "
                 "squares: held-out loss")
    return _render(fig, plot)


def _logged_components(a: Analysis) -> str:
    """What meter.energy_j() summed for these runs: every available component."""
    parts = []
    have = {c: [q for r in a.students for q in [r.e_run.get(c)] if q is not None and q.ok]
            for c in a.teacher.e_run}
    for comp in additive(c for c, qs in have.items() if qs):  # a node meter holds GPU and CPU
        est = any(q.estimated for q in have[comp])
        parts.append(f"{label_of(comp)} {'estimated' if est else 'measured'}")
    return " + ".join(parts) if parts else "source unknown"


def plot_notes(a: Analysis, plot: Plot) -> Plot:
    """Footnotes of a figure: the caveats (recovered, refused, skipped, flagged) of the
    figures it draws, named by run."""
    runs = [*a.students, a.teacher]
    if plot.name == "ept_vs_batch":
        qs = [(r, p.ept_total) for r in runs for p in r.ept.values()]
    elif plot.name in ("energy_vs_quality", "loss_vs_energy"):
        qs = [(r, r.e_total) for r in a.students]
    elif plot.name == "phase_energy":
        qs = [(r, p.energy[a.basis]) for r in runs for p in r.phases]
    else:
        qs = []
    for r, q in qs:
        if q.ok and q.note:
            for n in q.note.split("; "):
                if f"{r.label}: {n}" not in plot.notes:
                    plot.notes.append(f"{r.label}: {n}")
    return plot
