"""report.html: one self-contained file (inline CSS, plots as base64 PNG, a tiny inline table
sorter), no network access (a Content-Security-Policy forbids any). Links to the CSV/JSON/SVG
files written beside it are plain downloads; the page renders without them.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from datetime import datetime, timezone

from wattkd.report.analysis import Analysis, definitions
from wattkd.report.metrics import Quantity
from wattkd.report.plots import Plot
from wattkd.report.tables import Footnotes, Table, fmt_cell, sort_key

TXT_CLASS = ' class="txt"'
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       "script-src 'unsafe-inline'")

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;
max-width:1280px;padding:16px 24px;color:#1d1d1f}
h1{margin:.2em 0}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta{color:#555}.warn{background:#fff4e5;border-left:4px solid #f0a000;padding:8px 12px}
.warn li{margin:.2em 0}nav a{margin-right:1em}
table{border-collapse:collapse;margin:.6em 0;font-size:13px;display:block;overflow-x:auto}
th,td{border:1px solid #d0d0d0;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#f3f3f3;cursor:pointer;user-select:none;white-space:normal;min-width:3.5em;
vertical-align:bottom}
th.txt,td.txt{text-align:left}th[aria-sort=ascending]::after{content:" ▲"}
th[aria-sort=descending]::after{content:" ▼"}
td.gap{color:#b00020}td.est{background:#fffbe6}sup a{text-decoration:none}
.fn{font-size:12px;color:#444;margin-top:0}.fn li{margin:.1em 0}
figure{margin:1.2em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:12.5px;color:#444}.gapbox{border:1px dashed #b00020;color:#b00020;
padding:18px;text-align:center}dl dt{font-weight:600;margin-top:.5em}dl dd{margin-left:1.2em}
.dl{font-size:12px}
"""

SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){
    th.addEventListener('click',function(){
      var asc=th.getAttribute('aria-sort')!=='ascending';
      t.querySelectorAll('th').forEach(function(h){h.removeAttribute('aria-sort');});
      th.setAttribute('aria-sort',asc?'ascending':'descending');
      var num=th.dataset.type==='num', body=t.tBodies[0];
      var rows=Array.prototype.slice.call(body.rows);
      rows.sort(function(a,b){
        var x=a.cells[i].dataset.sort, y=b.cells[i].dataset.sort;
        if(x===''&&y!=='')return 1; if(y===''&&x!=='')return -1;
        var c=num?(parseFloat(x)-parseFloat(y)):x.localeCompare(y);
        return asc?c:-c;});
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
});
"""


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


def table_html(t: Table) -> str:
    fn = Footnotes()
    head = "".join(
        f'<th scope="col" data-type="{"num" if c.numeric else "txt"}"'
        f'{"" if c.numeric else TXT_CLASS}>{_e(c.header)}</th>' for c in t.columns)
    body = []
    for row in t.rows:
        cells = []
        for c in t.columns:
            v = row.get(c.key)
            classes = [] if c.numeric else ["txt"]
            title = ""
            if isinstance(v, Quantity):
                if not v.ok:
                    classes.append("gap")
                if v.estimated:
                    classes.append("est")
                if v.source:
                    title = f' title="source: {_e(v.source)}"'
            refs = "".join(f'<sup><a href="#fn-{t.name}-{n}">{n}</a></sup>'
                           for n in fn.refs(v))
            cls = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f'<td{cls}{title} data-sort="{_e(sort_key(v))}">{_e(fmt_cell(v))}'
                         f"{refs}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    notes = ""
    if fn.items:
        notes = '<ol class="fn">' + "".join(
            f'<li id="fn-{t.name}-{i}">{_e(text)}</li>' for i, text in enumerate(fn.items, 1)
        ) + "</ol>"
    return (f'<section id="{t.name}"><h2>{_e(t.title)}</h2><p>{_e(t.description)}</p>'
            f'<table class="sortable" id="table-{t.name}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>{notes}"
            f'<p class="dl">Data: <a href="tables/{t.name}.csv">CSV</a> · '
            f'<a href="tables/{t.name}.json">JSON</a></p></section>')


def figure_html(p: Plot) -> str:
    omitted = ""
    if p.omitted:
        omitted = " Not shown: " + "; ".join(_e(o) for o in p.omitted) + "."
    if p.notes:
        omitted += " Notes: " + "; ".join(_e(n) for n in p.notes) + "."
    if p.gap:
        return (f'<figure id="fig-{p.name}" class="gap"><div class="gapbox">— {_e(p.title)}: '
                f"not drawn ({_e(p.gap)})</div><figcaption>{_e(p.caption)}{omitted}"
                "</figcaption></figure>")
    data = base64.b64encode(p.png).decode("ascii")
    return (f'<figure id="fig-{p.name}"><img alt="{_e(p.title)}" '
            f'src="data:image/png;base64,{data}"><figcaption><b>{_e(p.title)}.</b> '
            f'{_e(p.caption)}{omitted} <a href="plots/{p.name}.svg">SVG</a> · '
            f'<a href="plots/{p.name}.png">PNG</a></figcaption></figure>')


def inputs_html(a: Analysis) -> str:
    rows = []
    for r in [*a.students, a.teacher]:
        for what, why in a.missing_inputs(r).items():
            rows.append(f'<tr><td class="txt">{_e(r.label)}</td><td class="txt">{_e(what)}</td>'
                        f'<td class="txt gap">{_e(why)}</td></tr>')
    if not rows:
        return ('<section id="inputs"><h2>Missing inputs</h2><p>Every run has every input.'
                "</p></section>")
    return ('<section id="inputs"><h2>Missing inputs</h2><p>What each run lacks; figures that '
            "need it are shown as — with a reason.</p><table class=\"sortable\" "
            'id="table-inputs"><thead><tr><th class="txt" data-type="txt">Run</th>'
            '<th class="txt" data-type="txt">Input</th><th class="txt" data-type="txt">Reason'
            "</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table></section>")


def render(a: Analysis, tables: Sequence[Table], plots: Sequence[Plot], *,
           title: str = "wattkd report") -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    warn = ""
    if a.warnings:
        warn = ('<section id="warnings" class="warn"><b>Read first</b><ul>'
                + "".join(f"<li>{_e(w)}</li>" for w in a.warnings) + "</ul></section>")
    nav = "<nav>" + "".join(f'<a href="#{t.name}">{_e(t.title.split(":")[0])}</a>'
                            for t in tables) + '<a href="#figures">Figures</a>' \
        + '<a href="#inputs">Missing inputs</a><a href="#definitions">Definitions</a></nav>'
    defs = ('<section id="definitions"><h2>Definitions</h2><dl>'
            + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in definitions(a))
            + "</dl></section>")
    meta = (f'<p class="meta">{len(a.students)} student runs, {len(a.methods)} methods; '
            f"teacher: {_e(a.teacher.run.path)}; energy basis: {_e(a.basis_label)}; quality: "
            f"{_e(a.quality_label)}; generated {now}.</p>")
    figs = ('<section id="figures"><h2>Figures</h2>'
            + "".join(figure_html(p) for p in plots) + "</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
            f"<header><h1>{_e(title)}</h1>{meta}</header>{warn}{nav}"
            + "".join(table_html(t) for t in tables) + figs + inputs_html(a) + defs
            + f"<script>{SCRIPT}</script></body></html>\n")
