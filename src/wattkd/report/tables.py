"""Report tables: built once from an `Analysis`, rendered to HTML/Markdown, written as CSV/JSON.

A cell is a `Quantity` (number with unit, ± uncertainty, source, `estimated`, or a gap with
its reason) or plain text. Text renderers show a gap as "—" with a numbered footnote giving
the reason, and append "(estimated)" to every estimated figure. CSV flattens a Quantity column
`x` into x, x_unc, x_source, x_estimated, x_gap, x_note; JSON keeps the structure.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wattkd.atomic import atomic_write_text
from wattkd.energy.components import label_of
from wattkd.report.analysis import Analysis, RunResult
from wattkd.report.metrics import GAP_MARK, Quantity

Cell = Quantity | str | int | float | None


@dataclass
class Column:
    key: str
    title: str
    unit: str = ""
    numeric: bool = True

    @property
    def header(self) -> str:
        return f"{self.title} [{self.unit}]" if self.unit else self.title


@dataclass
class Table:
    name: str                      # file stem: tables/<name>.csv
    title: str
    description: str
    columns: list[Column]
    rows: list[dict[str, Cell]] = field(default_factory=list)

    def add(self, **cells: Cell) -> None:
        unknown = set(cells) - {c.key for c in self.columns}
        if unknown:
            raise KeyError(f"table {self.name}: unknown columns {sorted(unknown)}")
        self.rows.append(cells)


# ------------------------------------------------------------------------------ formatting
def fmt_number(v: float, digits: int = 4) -> str:
    """Readable fixed significance: 123,457 / 12.35 / 0.01234 / 1.234e-06."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 10 ** digits:
        return f"{v:,.0f}"
    if a >= 1e-3:
        s = f"{v:.{digits}g}"
        return s if "e" not in s else f"{v:,.0f}"
    return f"{v:.{digits - 1}e}"


def fmt_cell(cell: Cell) -> str:
    """Cell text without footnote markers ("—" for a gap)."""
    if isinstance(cell, Quantity):
        if not cell.ok:
            return GAP_MARK
        text = fmt_number(cell.value)  # type: ignore[arg-type]
        if cell.unc is not None:
            text += f" ± {fmt_number(cell.unc, 2)}"
        if cell.estimated:
            text += " (estimated)"
        return text
    if cell is None:
        return ""
    if isinstance(cell, float):
        return fmt_number(cell)
    if isinstance(cell, int):
        return f"{cell:,}"
    return str(cell)


def sort_key(cell: Cell) -> str:
    """Value used by the HTML table sorter (numbers sort numerically, gaps last)."""
    if isinstance(cell, Quantity):
        return "" if not cell.ok else repr(cell.value)
    if isinstance(cell, int | float) and not isinstance(cell, bool):
        return repr(cell)
    return str(cell or "")


class Footnotes:
    """Numbered notes of one table; the same text gets the same number."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def ref(self, text: str) -> int:
        if text not in self.items:
            self.items.append(text)
        return self.items.index(text) + 1

    def refs(self, cell: Cell) -> list[int]:
        if not isinstance(cell, Quantity):
            return []
        out = []
        if cell.gap:
            out.append(self.ref(cell.gap))
        if cell.note:
            out.append(self.ref(cell.note))
        return out


# -------------------------------------------------------------------------------- builders
def _e_col(comp: str, est: bool, title: str = "E_run") -> Column:
    return Column(f"e_run_{comp}", f"{title} {label_of(comp)}{' (estimated)' if est else ''}",
                  "J")


def methods_table(a: Analysis) -> Table:
    b, q = a.basis_label, a.quality_label
    t = Table("methods", "Methods: energy, quality and efficiency",
              f"One row per KD method; K = its run directories (students, repeats included). "
              f"E_avg = mean E_run over them (spread: sample std, min–max); E_total = E_run + "
              f"amortised teacher-cache share; {q} relative to the teacher; Eff_overall at EPT "
              f"batch size {a.ept_batch if a.ept_batch is not None else GAP_MARK}; energy basis "
              f"{b}.",
              [Column("method", "Method", numeric=False), Column("kind", "Kind", numeric=False),
               Column("k", "K"), Column("e_avg", f"E_avg ({b})", "J"),
               Column("e_std", "E_run std", "J"), Column("e_range", "E_run min–max", "J",
                                                         numeric=False),
               Column("e_total", f"E_total mean ({b})", "J"), Column("quality", q),
               Column("quality_std", f"{q} std"), Column("eff", "Eff_overall"),
               Column("k_eff", "K (Eff)"), Column("j_per_point", "Energy per retained point",
                                                  "J/pt")])
    for m in a.methods:
        sp = m.e_spread
        t.add(method=m.method, kind=m.kind, k=len(m.runs), e_avg=m.e_avg,
              e_std=_std_q(sp, m.e_avg),
              e_range=(f"{fmt_number(sp.min)}–{fmt_number(sp.max)}"
                       + (" (estimated)" if m.e_avg.estimated else "") if sp else m.e_avg),
              e_total=m.e_total, quality=m.om,
              quality_std=_std_q(m.om_spread, m.om, unit=""), eff=m.eff, k_eff=m.k_eff,
              j_per_point=m.j_per_point)
    return t


def _like(value: float, base: Quantity) -> Quantity:
    """A figure derived from `base` (min, max of its values): same unit, source, estimate."""
    return Quantity(value, base.unit, source=base.source, estimated=base.estimated)


def _std_q(sp: Any, base: Quantity, unit: str = "J") -> Quantity:
    if sp is None:
        return Quantity.missing(base.gap or "no values", unit)
    if sp.std is None:
        return Quantity.missing("a single run: no spread", unit)
    return Quantity(sp.std, unit, source=base.source, estimated=base.estimated)


def _comps(a: Analysis) -> list[str]:
    return list(a.teacher.e_run)


def _est(a: Analysis, comp: str) -> bool:
    """The column header says `estimated` only when every figure in it is (cells say it per
    run otherwise)."""
    ok = [r for r in [*a.students, a.teacher] if r.e_run[comp].ok]
    return bool(ok) and all(r.e_run[comp].estimated for r in ok)


def runs_table(a: Analysis) -> Table:
    b, q = a.basis_label, a.quality_label
    comps = _comps(a)
    cols = [Column("run", "Run", numeric=False), Column("method", "Method", numeric=False),
            Column("kind", "Kind", numeric=False), Column("student", "Student", numeric=False),
            Column("repeat", "Repeat"), Column("status", "Status", numeric=False)]
    cols += [_e_col(c, _est(a, c)) for c in comps]
    cols += [Column("sources", "Energy sources", numeric=False),
             Column("tokens", "Tokens trained"), Column("ept_train", f"EPT_train ({b})",
                                                        "J/token"),
             Column("cache_share", "Teacher-cache share", "J"),
             Column("finetune_share", "Teacher fine-tune share", "J"),
             Column("e_total", f"E_total ({b})", "J"), Column("quality", q),
             Column("j_per_point", "Energy per retained point", "J/pt")]
    t = Table("runs", "Runs: training energy",
              "E_run = energy of the run's `train` windows, summed over devices and resumed "
              "sessions; CPU beside GPU, never added. EPT_train = E_run / tokens trained. "
              "E_total = E_run + the run's share of the teacher-cache energy (cache energy / "
              "students sharing it). Energy per retained point = E_total / (100 × quality). The "
              "teacher row is the reference (its own pretraining, if metered).",
              cols)
    for r in [*a.students, a.teacher]:
        cells: dict[str, Cell] = {
            "run": r.label, "method": r.run.method, "kind": r.run.kind, "student": r.student,
            "repeat": r.run.repeat if r.run.kind != "teacher" else "n/a",
            "status": r.run.status, "sources": _sources(r),
            "tokens": r.tokens_train if r.tokens_train else Quantity.missing(
                r.e_run[a.basis].gap or "no tokens recorded in the train windows"),
            "ept_train": r.ept_train,
            "cache_share": r.cache_share if r.cache_share is not None else r.cache_note,
            "finetune_share": r.finetune_share if r.finetune_share is not None else "n/a",
            "e_total": r.e_total, "quality": r.quality, "j_per_point": r.j_per_point}
        if r.run.kind == "teacher":
            cells["j_per_point"] = "reference"
        for c in comps:
            cells[f"e_run_{c}"] = r.e_run[c]
        t.add(**cells)
    return t


def _sources(r: RunResult) -> str:
    parts = []
    for c, q in r.e_run.items():
        if q.ok:
            parts.append(f"{label_of(c)}: {q.source}" + (" (estimated)" if q.estimated
                                                            and "estimated" not in (q.source or "")
                                                            else ""))
        else:
            parts.append(f"{label_of(c)}: unavailable")
    return "; ".join(parts)


def configs_table(a: Analysis) -> Table:
    b = a.basis_label
    t = Table("configs", "Configurations: repeats (E_avg)",
              "One row per method × student configuration. E_avg = mean E_run over its R "
              "repeats (± = mean measurement uncertainty); std = sample standard deviation "
              "(n−1).",
              [Column("method", "Method", numeric=False), Column("kind", "Kind", numeric=False),
               Column("student", "Student", numeric=False), Column("r", "R"),
               Column("e_avg", f"E_avg ({b})", "J"), Column("e_std", "std", "J"),
               Column("e_min", "min", "J"), Column("e_max", "max", "J"),
               Column("ept_train", f"EPT_train mean ({b})", "J/token")])
    for c in a.configs:
        sp = c.e_spread
        t.add(method=c.method, kind=c.kind, student=c.student, r=len(c.runs), e_avg=c.e_avg,
              e_std=_std_q(sp, c.e_avg),
              e_min=_like(sp.min, c.e_avg) if sp else c.e_avg,
              e_max=_like(sp.max, c.e_avg) if sp else c.e_avg,
              ept_train=c.ept_train)
    return t


def phases_table(a: Analysis) -> Table:
    comps = _comps(a)
    cols = [Column("run", "Run", numeric=False), Column("phase", "Phase", numeric=False),
            Column("windows", "Windows"), Column("duration_s", "Duration", "s"),
            Column("tokens", "Tokens")]
    cols += [Column(f"e_{c}", f"{label_of(c)}{' (estimated)' if _est(a, c) else ''}", "J")
             for c in comps]
    cols += [Column(f"dyn_{c}", f"{label_of(c)} above idle", "J") for c in comps]
    t = Table("phases", "Energy per phase",
              "Top-level windows of each run's energy ledger (phases.jsonl), grouped by name. "
              "'Above idle' subtracts idle power × duration (dynamic energy).", cols)
    for r in [*a.students, a.teacher]:
        if not r.phases:
            gap = Quantity.missing(r.run.gaps.get("phases", "no phase windows"))
            t.add(run=r.label, phase=GAP_MARK, **{c.key: gap for c in cols if c.numeric})
            continue
        for p in r.phases:
            cells: dict[str, Cell] = {"run": r.label, "phase": p.phase, "windows": p.records,
                                      "duration_s": round(p.duration_s, 3),
                                      "tokens": p.tokens}
            for c in comps:
                cells[f"e_{c}"] = p.energy[c]
                cells[f"dyn_{c}"] = p.dynamic[c]
            t.add(**cells)
    return t


def ept_table(a: Analysis) -> Table:
    b = label_of(a.basis)
    t = Table("ept", "Inference energy per token",
              f"From each run's ept.json (warm-up excluded), {b} energy. EPT_in = E / input "
              "tokens, EPT_out = E / output tokens, EPT_total = E / all tokens; dynamic = "
              f"(E − idle power × duration) / all tokens. Eff_overall uses EPT_total at batch "
              f"size {a.ept_batch if a.ept_batch is not None else GAP_MARK} ({a.ept_batch_note}).",
              [Column("run", "Run", numeric=False), Column("method", "Method", numeric=False),
               Column("batch", "Batch size"), Column("ept_in", f"EPT_in ({b})", "J/token"),
               Column("ept_out", f"EPT_out ({b})", "J/token"),
               Column("ept_total", f"EPT_total ({b})", "J/token"),
               Column("ept_dyn", f"EPT_total dynamic ({b})", "J/token"),
               Column("ept_dyn_in", f"EPT_in dynamic ({b})", "J/token"),
               Column("ept_dyn_out", f"EPT_out dynamic ({b})", "J/token")])
    for r in [a.teacher, *a.students]:
        if not r.ept:
            gap = Quantity.missing(r.run.gaps.get("ept", "no EPT result"), "J/token")
            t.add(run=r.label, method=r.run.method, batch=gap, ept_in=gap, ept_out=gap,
                  ept_total=gap, ept_dyn=gap, ept_dyn_in=gap, ept_dyn_out=gap)
            continue
        for bs, p in sorted(r.ept.items()):
            t.add(run=r.label, method=r.run.method, batch=bs, ept_in=p.ept_in, ept_out=p.ept_out,
                  ept_total=p.ept_total, ept_dyn=p.ept_dynamic, ept_dyn_in=p.ept_dynamic_in,
                  ept_dyn_out=p.ept_dynamic_out)
    return t


def quality_table(a: Analysis) -> Table:
    q = a.quality_label
    if a.quality_basis == "tasks":
        desc = (f"Suite {a.suite!r}: each task's primary score (± stderr from lm-eval) and "
                f"the ratio to the teacher; {q} = mean of the ratios (± from the stderrs, "
                "independent tasks). Compared only under the teacher's protocol hash.")
    elif a.quality_basis == "perplexity":
        desc = (f"No task scores exist, so quality is {q} = ppl(teacher) / ppl(student) = "
                "exp(nll_teacher − nll_student) on the same held-out tokens: 1.0 matches the "
                "teacher. It is not OM_perf and is labelled as such everywhere.")
    else:
        desc = "No evaluation results: quality cannot be computed."
    cols = [Column("run", "Run", numeric=False), Column("method", "Method", numeric=False)]
    for task in a.tasks:
        cols.append(Column(f"s:{task}", task))
        cols.append(Column(f"r:{task}", f"{task} ÷ teacher"))
    if a.quality_basis == "perplexity":
        cols.append(Column("ppl", "Perplexity"))
    cols.append(Column("quality", q))
    t = Table("quality", f"Quality retention ({q})", desc, cols)
    for r in [a.teacher, *a.students]:
        cells: dict[str, Cell] = {"run": r.label, "method": r.run.method, "quality": r.quality}
        for task in a.tasks:
            cells[f"s:{task}"] = r.task_scores.get(task, Quantity.missing(
                f"no score for {task}" if r.task_scores else
                (r.quality.gap or "no evaluation")))
            cells[f"r:{task}"] = "reference" if r is a.teacher else r.task_ratios.get(
                task, Quantity.missing(r.quality.gap or "no ratio"))
        if a.quality_basis == "perplexity":
            doc = r.run.perplexity
            v = doc.get("perplexity") if doc else None
            cells["ppl"] = (Quantity(float(v)) if isinstance(v, int | float) and math.isfinite(v)
                            else Quantity.missing(r.run.gaps.get("perplexity",
                                                                 "perplexity not finite")))
        t.add(**cells)
    return t


# ---------------------------------------------------------------------------------- files
def table_json(t: Table) -> dict[str, Any]:
    def enc(c: Cell) -> Any:
        return c.to_json() if isinstance(c, Quantity) else c

    return {"name": t.name, "title": t.title, "description": t.description,
            "columns": [{"key": c.key, "title": c.title, "unit": c.unit} for c in t.columns],
            "rows": [{c.key: enc(row.get(c.key)) for c in t.columns} for row in t.rows]}


def table_csv(t: Table) -> str:
    qty_cols = {c.key for c in t.columns
                if any(isinstance(row.get(c.key), Quantity) for row in t.rows)}
    header: list[str] = []
    for c in t.columns:
        header.append(c.key)
        if c.key in qty_cols:
            header += [f"{c.key}_{s}" for s in ("unc", "unit", "source", "estimated", "gap",
                                                "note")]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in t.rows:
        out: list[Any] = []
        for c in t.columns:
            v = row.get(c.key)
            if c.key in qty_cols:
                if isinstance(v, Quantity):
                    out += [_csv_num(v.value), _csv_num(v.unc), v.unit, v.source or "",
                            str(v.estimated).lower(), v.gap or "", v.note or ""]
                else:
                    out += ["" if v is None else v, "", "", "", "", "", ""]
            else:
                out.append("" if v is None else v)
        w.writerow(out)
    return buf.getvalue()


def _csv_num(v: float | None) -> str:
    return "" if v is None else repr(float(v))


def write_tables(tables: list[Table], out: Path) -> list[Path]:
    d = out / "tables"
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for t in tables:
        paths.append(atomic_write_text(d / f"{t.name}.csv", table_csv(t)))
        paths.append(atomic_write_text(d / f"{t.name}.json",
                                       json.dumps(table_json(t), indent=2, allow_nan=False)
                                       + "\n"))
    return paths
