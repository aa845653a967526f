"""report.md: the same tables and figures as report.html, for reading in a repository.

Gaps are "—" with a numbered reason under each table; estimated figures say `(estimated)`.
Figures are linked as plots/<name>.png (written beside report.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from wattkd.report.analysis import Analysis, definitions
from wattkd.report.plots import Plot
from wattkd.report.tables import Footnotes, Table, fmt_cell


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_md(t: Table) -> str:
    fn = Footnotes()
    lines = [f"## {t.title}", "", t.description, "",
             "| " + " | ".join(_cell(c.header) for c in t.columns) + " |",
             "|" + "|".join("---:" if c.numeric else ":---" for c in t.columns) + "|"]
    for row in t.rows:
        cells = []
        for c in t.columns:
            v = row.get(c.key)
            refs = "".join(f" [{n}]" for n in fn.refs(v))
            cells.append(_cell(fmt_cell(v) + refs))
        lines.append("| " + " | ".join(cells) + " |")
    if fn.items:
        lines.append("")
        lines += [f"{i}. {_cell(text)}" for i, text in enumerate(fn.items, 1)]
    lines += ["", f"Data: [CSV](tables/{t.name}.csv) · [JSON](tables/{t.name}.json)", ""]
    return "\n".join(lines)


def figure_md(p: Plot) -> str:
    omitted = (" Not shown: " + "; ".join(p.omitted) + ".") if p.omitted else ""
    if p.notes:
        omitted += " Notes: " + "; ".join(p.notes) + "."
    if p.gap:
        return f"**{p.title}** — not drawn ({p.gap}). {p.caption}{omitted}\n"
    return (f"![{p.title}](plots/{p.name}.png)\n\n*{p.title}.* {p.caption}{omitted} "
            f"([SVG](plots/{p.name}.svg))\n")


def render(a: Analysis, tables: Sequence[Table], plots: Sequence[Plot], *,
           title: str = "wattkd report") -> str:
    out = [f"# {title}", "",
           (f"{len(a.students)} student runs, {len(a.methods)} methods; teacher: "
            f"`{a.teacher.run.path}`; energy basis: {a.basis_label}; quality: "
            f"{a.quality_label}."),
           ""]
    if a.warnings:
        out += ["> **Read first**", ">"] + [f"> - {w}" for w in a.warnings] + [""]
    out += [table_md(t) for t in tables]
    out += ["## Figures", ""] + [figure_md(p) for p in plots]
    out += ["## Missing inputs", ""]
    rows = [(r.label, what, why) for r in [*a.students, a.teacher]
            for what, why in a.missing_inputs(r).items()]
    if rows:
        out += ["| Run | Input | Reason |", "|:---|:---|:---|"]
        out += [f"| {_cell(a_)} | {_cell(b)} | {_cell(c)} |" for a_, b, c in rows]
    else:
        out.append("Every run has every input.")
    out += ["", "## Definitions", ""]
    out += [f"- **{k}**: {v}" for k, v in definitions(a)]
    return "\n".join(out) + "\n"
