"""The report's steady-state EPT section (wattkd.ept/2): figures per batch size, the
student/teacher ratio per batch size, J/token against batch size and energy against latency
with its Pareto front. wattkd.ept/1 files stay readable: their points have gaps here and
keep their figures in the `ept` table.
"""

from __future__ import annotations

from typing import Any

from wattkd.energy.components import label_of
from wattkd.report.analysis import _protocol_gap
from wattkd.report.ept_steady import V1_GAP
from wattkd.report.metrics import Quantity, pareto_front, ratio
from wattkd.report.plots import Plot, _colour, _energy_axis, _footer, _plt, _render
from wattkd.report.plots import energy_source_text as src_text
from wattkd.report.tables import Column, Table


def _get(p: Any, key: str, unit: str) -> Quantity:
    return p.steady.get(key) or Quantity.missing(V1_GAP, unit)


def _spread_text(p: Any, key: str = "j_out_decode") -> str:
    s = p.spread.get(key)
    if not s or s.get("std") is None:
        return "—"
    return f"std {s['std']:.3g} (min {s['min']:.4g}, max {s['max']:.4g}, n={s['n']})"


def _steady_runs(a: Any) -> list[Any]:
    return [r for r in [a.teacher, *a.students] if any(p.steady for p in r.ept.values())]


def steady_table(a: Any) -> Any:
    """Steady-state EPT per run and batch size (wattkd.ept/2)."""
    b = label_of(a.basis)
    t = Table("ept_steady", "Inference EPT in steady state (prefill and decode)",
              f"From each run's ept.json (wattkd.ept/2; warm-up and compilation excluded), {b} "
              "energy, mean over repeats ± the counter's uncertainty. J/in-token = prefill "
              "energy / input tokens; J/out-token = (request − prefill energy) / tokens of the "
              "decoding steps; J/request = request energy / sequences; dynamic = above idle "
              "power. Spread: standard deviation over repeats of J/out-token.",
              [Column("run", "Run", numeric=False), Column("method", "Method", numeric=False),
               Column("engine", "Engine", numeric=False), Column("batch", "Batch size"),
               Column("ms_step", "Decoding step", "ms"),
               Column("tok_s", "Throughput (in + out)", "tokens/s"),
               Column("j_in", f"J/in-token prefill ({b})", "J/token"),
               Column("j_out", f"J/out-token decode ({b})", "J/token"),
               Column("spread", "J/out-token spread", numeric=False),
               Column("j_req", f"J/request ({b})", "J"),
               Column("power", f"Mean power ({b})", "W"),
               Column("dyn_out", f"J/out-token decode dynamic ({b})", "J/token"),
               Column("flags", "Flags", numeric=False)])
    for r in [a.teacher, *a.students]:
        for bs, p in sorted(r.ept.items()):
            if not p.steady:
                continue
            t.add(run=r.label, method=r.run.method, engine=p.engine, batch=bs,
                  ms_step=_get(p, "ms_per_step", "ms"),
                  tok_s=_get(p, "tokens_per_s", "tokens/s"),
                  j_in=_get(p, "j_in_prefill", "J/token"),
                  j_out=_get(p, "j_out_decode", "J/token"), spread=_spread_text(p),
                  j_req=_get(p, "j_per_request", "J"), power=_get(p, "mean_power", "W"),
                  dyn_out=_get(p, "dyn_j_out_decode", "J/token"),
                  flags=", ".join(p.flags) or "—")
    return t


def ratio_table(a: Any) -> Any:
    """Student/teacher ratio per batch size (same EPT protocol and engine, else the refusal)."""
    t = Table("ept_ratio", "Student/teacher inference EPT per batch size",
              "Student figure / teacher figure at the same batch size, both from wattkd.ept/2 "
              "results measured under one EPT protocol (engine included); a student measured "
              "differently is refused, the differing keys named.",
              [Column("run", "Run", numeric=False), Column("method", "Method", numeric=False),
               Column("batch", "Batch size"), Column("j_out", "J/out-token decode ratio"),
               Column("j_in", "J/in-token prefill ratio"), Column("j_req", "J/request ratio"),
               Column("ms_step", "Decoding step time ratio")])
    teacher = a.teacher
    for r in a.students:
        common = sorted(b for b in r.ept if b in teacher.ept and r.ept[b].steady
                        and teacher.ept[b].steady)
        if not common:
            continue
        gap = _protocol_gap(r.run.ept, teacher.run.ept, (r.label, "teacher"),
                            ignore=("batch_sizes",))
        for bs in common:
            s, tp = r.ept[bs], teacher.ept[bs]
            cells = {}
            for col, key, unit in (("j_out", "j_out_decode", "J/token"),
                                   ("j_in", "j_in_prefill", "J/token"),
                                   ("j_req", "j_per_request", "J"),
                                   ("ms_step", "ms_per_step", "ms")):
                cells[col] = (Quantity.missing("EPT " + gap) if gap else
                              ratio(_get(s, key, unit), _get(tp, key, unit), ""))
            t.add(run=r.label, method=r.run.method, batch=bs, **cells)
    return t


def decode_vs_batch(a: Any) -> Any:
    """J per output token (decode) against batch size, one line per run."""
    plot = Plot("ept_decode_vs_batch", "J per output token (decode) vs batch size",
                f"Decode energy per output token ({label_of(a.basis)}, wattkd.ept/2: "
                "request − prefill energy), mean over repeats; error bars ± counter "
                "uncertainty; the teacher in black.")
    drawn = [r for r in _steady_runs(a)
             if any(_get(p, "j_out_decode", "J/token").ok for p in r.ept.values())]
    plot.omitted = [f"{r.label}: no steady-state J/out-token"
                    for r in [a.teacher, *a.students] if r not in drawn]
    if not drawn:
        plot.gap = "no run has wattkd.ept/2 figures with energy (re-run wattkd ept)"
        return plot
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(drawn):
        pts = [(b, _get(p, "j_out_decode", "J/token")) for b, p in sorted(r.ept.items())]
        pts = [(b, q) for b, q in pts if q.ok]
        ax.errorbar([b for b, _ in pts], [q.value for _, q in pts],
                    yerr=[q.unc or 0 for _, q in pts], marker="o", ms=4, capsize=2,
                    lw=2 if r is a.teacher else 1, color=_colour(r.run.kind, i), label=r.label)
    sizes = sorted({b for r in drawn for b in r.ept})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_yscale("log")
    ax.set_xlabel("batch size [sequences]")
    ax.set_ylabel(_energy_axis(a, "J/out-token (decode)", "J/token"))
    ax.set_title(plot.title)
    ax.legend(fontsize=7.5)
    qs = [_get(p, "j_out_decode", "J/token") for r in drawn for p in r.ept.values()]
    _footer(fig, src_text(qs, a.basis), left=0.13)
    return _render(fig, plot)


def energy_vs_latency(a: Any) -> Any:
    """J per output token against time per decoding step (each run x batch size), with the
    Pareto front: the points no other point beats on both energy and latency."""
    plot = Plot("ept_energy_vs_latency", "Inference energy vs latency (Pareto front)",
                f"J per output token of decode ({label_of(a.basis)}) against ms per "
                "decoding step, one point per run and batch size (labelled with the batch "
                "size); the dashed line joins the Pareto front (lower energy and lower "
                "latency are better).")
    pts: list[tuple[Any, int, float, float]] = []
    for r in _steady_runs(a):
        for b, p in sorted(r.ept.items()):
            e, lat = _get(p, "j_out_decode", "J/token"), _get(p, "ms_per_step", "ms")
            if e.ok and lat.ok:
                pts.append((r, b, float(lat.value), float(e.value)))  # type: ignore[arg-type]
    if not pts:
        plot.gap = "no run has wattkd.ept/2 figures with energy (re-run wattkd ept)"
        return plot
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    runs: list[Any] = []
    for p in pts:
        if not any(p[0] is r for r in runs):
            runs.append(p[0])
    for i, r in enumerate(runs):
        mine = [p for p in pts if p[0] is r]
        ax.plot([p[2] for p in mine], [p[3] for p in mine], "o", ms=5,
                color=_colour(r.run.kind, i), label=r.label)
        for _, b, x, y in mine:
            ax.annotate(str(b), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    front = sorted((pts[i] for i in pareto_front([(p[3], -p[2]) for p in pts])),
                   key=lambda p: p[2])
    ax.plot([p[2] for p in front], [p[3] for p in front], "--", color="#555555", lw=1,
            label="Pareto front")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("latency: time per decoding step [ms]")
    ax.set_ylabel(_energy_axis(a, "J/out-token (decode)", "J/token"))
    ax.set_title(plot.title)
    ax.legend(fontsize=7.5)
    qs = [_get(p, "j_out_decode", "J/token") for r in runs for p in r.ept.values()]
    _footer(fig, src_text(qs, a.basis) + "; point labels: batch size", left=0.13)
    return _render(fig, plot)
