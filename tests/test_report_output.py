"""`build_report` end to end on synthetic run directories: files written, HTML self-contained
and complete (DOM-level check: every table and figure present, every metric cell filled or
marked with a resolvable footnote), CSV/JSON equal to the analysis, estimates labelled."""

from __future__ import annotations

import base64
import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from report_synth import cpu_experiment, gpu_experiment
from wattkd.report import build_report
from wattkd.report.collect import ReportInputError


class Dom(HTMLParser):
    """Tables (header types + cells with text and footnote refs), images, links, ids."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.tables: dict[str, dict] = {}
        self.imgs: list[str] = []
        self.urls: list[str] = []
        self.figures: list[dict] = []
        self._table: dict | None = None
        self._cell: dict | None = None
        self._fig: dict | None = None
        self._in_sup = False
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for k in ("src", "href"):
            if k in a:
                self.urls.append(a[k])
        if tag == "table":
            self._table = {"types": [], "rows": []}
            self.tables[a.get("id", f"t{len(self.tables)}")] = self._table
        elif tag == "th" and self._table is not None:
            self._table["types"].append(a.get("data-type"))
        elif tag == "tr" and self._table is not None:
            self._table["rows"].append([])
        elif tag == "td" and self._table is not None:
            self._cell = {"text": "", "refs": [], "class": a.get("class", "")}
            self._table["rows"][-1].append(self._cell)
        elif tag == "a" and self._cell is not None and a.get("href", "").startswith("#fn-"):
            self._cell["refs"].append(a["href"][1:])
        elif tag == "sup":
            self._in_sup = True
        elif tag == "img":
            self.imgs.append(a.get("src", ""))
        elif tag == "figure":
            self._fig = {"id": a.get("id"), "class": a.get("class", ""), "text": ""}
            self.figures.append(self._fig)

    def handle_endtag(self, tag):
        if tag == "sup":
            self._in_sup = False
        elif tag == "td":
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "figure":
            self._fig = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None and not self._in_sup:
            self._cell["text"] += data
        if self._fig is not None:
            self._fig["text"] += data


def parse(path: Path) -> Dom:
    d = Dom()
    d.feed(path.read_text(encoding="utf-8"))
    return d


@pytest.fixture(scope="module")
def gpu_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = gpu_experiment(tmp_path_factory.mktemp("gpu") / "runs")
    out = root.parent / "report"
    return build_report([root], teacher=root / "teacher", out=out)


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = cpu_experiment(tmp_path_factory.mktemp("cpu") / "runs")
    return build_report([root], teacher=root / "teacher", out=root.parent / "report")


def check_complete(dom: Dom) -> None:
    """Every numeric cell holds a value, or '—' whose footnote exists; never empty or 0-by-gap."""
    for tid, t in dom.tables.items():
        body = [r for r in t["rows"] if r]
        assert body, f"{tid} has no rows"
        for row in body:
            assert len(row) == len(t["types"]), f"{tid}: ragged row"
            for cell, kind in zip(row, t["types"], strict=True):
                text = cell["text"].strip()
                if kind != "num":
                    continue
                assert text, f"{tid}: empty numeric cell in {[c['text'] for c in row]}"
                if text.startswith("—"):
                    assert cell["refs"], f"{tid}: gap without a reason"
                for ref in cell["refs"]:
                    assert ref in dom.ids, f"{tid}: footnote {ref} missing"


def test_files_written(gpu_report: Path):
    out = gpu_report.parent
    assert gpu_report.name == "report.html"
    for name in ("methods", "runs", "configs", "phases", "ept", "quality"):
        assert (out / "tables" / f"{name}.csv").is_file()
        json.loads((out / "tables" / f"{name}.json").read_text())
    for name in ("energy_vs_quality", "phase_energy", "ept_vs_batch", "loss_vs_energy",
                 "power_response_rep0", "power_teacher"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in (out / "plots" / f"{name}.svg").read_bytes()[:2000]
    assert not (out / "plots" / "power_relation_rep0.png").exists()   # no telemetry
    nb = json.loads((out / "report.ipynb").read_text())
    assert nb["nbformat"] == 4 and any("read_csv" in "".join(c["source"]) for c in nb["cells"])
    assert not [p for p in out.rglob(".*")], "temp files left behind"


def test_html_is_self_contained_and_complete(gpu_report: Path):
    dom = parse(gpu_report)
    assert {f"table-{n}" for n in ("methods", "runs", "configs", "phases", "ept", "quality")} \
        <= set(dom.tables)
    check_complete(dom)
    assert not [u for u in dom.urls if u.startswith(("http:", "https:", "//"))]
    summary = json.loads((gpu_report.parent / "report.json").read_text())
    drawn = [p for p in summary["plots"] if not p["gap"]]
    assert len(dom.imgs) == len(drawn) == 6
    for src in dom.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
    gap_fig = next(f for f in dom.figures if f["id"] == "fig-power_relation_rep0")
    assert "not drawn" in gap_fig["text"] and "no telemetry" in gap_fig["text"]
    # every figure states its energy source and uncertainty (PNG text is not parseable: SVG)
    for name in ("energy_vs_quality", "phase_energy", "ept_vs_batch"):
        svg = (gpu_report.parent / "plots" / f"{name}.svg").read_text()
        assert "nvml-counter (measured)" in svg and "uncertainty" in svg


def test_html_cells_match_the_analysis(gpu_report: Path):
    dom = parse(gpu_report)
    rows = {r[0]["text"]: r for r in dom.tables["table-methods"]["rows"] if r}
    cols = ["method", "kind", "k", "e_avg", "e_std", "e_range", "e_total", "om", "om_std", "eff"]
    resp = dict(zip(cols, (c["text"] for c in rows["response"]), strict=False))
    assert resp["e_avg"] == "450 ± 4.5" and resp["eff"] == "1.375 ± 0.14"
    assert resp["om"] == "0.7625 ± 0.014" and resp["e_total"] == "550 ± 5.5"
    feat = dict(zip(cols, rows["feature"], strict=False))
    assert feat["om"]["text"] == "—"
    fn = feat["om"]["refs"][0]
    html = gpu_report.read_text()
    li = html.split(f'id="{fn}">', 1)[1].split("</li>", 1)[0]
    assert "limit: 20 (feature/rep0) vs 100 (teacher)" in li


def test_csv_and_json_tables(gpu_report: Path):
    out = gpu_report.parent
    rows = {r["method"]: r for r in csv.DictReader((out / "tables" / "methods.csv").open())}
    assert float(rows["response"]["eff"]) == pytest.approx(1.375, rel=1e-12)
    assert rows["response"]["e_avg_source"] == "nvml-counter"
    assert rows["response"]["e_avg_estimated"] == "false"
    assert rows["relation"]["e_avg"] == "" and "phases.jsonl" in rows["relation"]["e_avg_gap"]
    data = json.loads((out / "tables" / "runs.json").read_text())
    r0 = next(r for r in data["rows"] if r["run"] == "response/rep0")
    assert r0["e_total"]["value"] == 500.0 and r0["e_total"]["unc"] == 5.0
    assert r0["cache_share"]["note"] == "cache energy 300 J / 3 students"


def test_markdown_report(gpu_report: Path):
    md = (gpu_report.parent / "report.md").read_text()
    assert "## Methods: energy, quality and efficiency" in md
    assert "| response | response | 2 | 450 ± 4.5 |" in md
    assert "limit: 20 (feature/rep0) vs 100 (teacher)" in md
    assert "![Energy vs OM_perf per method](plots/energy_vs_quality.png)" in md
    assert "no telemetry" in md


def test_cpu_report_labels_estimates_everywhere(cpu_report: Path):
    dom = parse(cpu_report)
    check_complete(dom)
    html = cpu_report.read_text()
    assert "OM_ppl (perplexity retention)" in html and "Read first" in html
    for tid, t in dom.tables.items():
        for row in t["rows"]:
            for cell in row:
                if "est" in cell["class"].split():
                    assert "(estimated)" in cell["text"], f"{tid}: {cell}"
    methods = dom.tables["table-methods"]["rows"]
    est_cells = [c for r in methods if r for c in r if "est" in c["class"].split()]
    assert len(est_cells) >= 6      # E_avg, E_total, Eff, J/pt of both methods, at least
    svg = (cpu_report.parent / "plots" / "ept_vs_batch.svg").read_text()
    assert "CPU, estimated" in svg and "(estimated)" in svg
    md = (cpu_report.parent / "report.md").read_text()
    assert "200 (estimated)" in md


def test_out_must_be_a_directory(tmp_path: Path):
    root = cpu_experiment(tmp_path / "runs")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ReportInputError, match="is a file"):
        build_report([root], teacher=root / "teacher", out=tmp_path / "file")
