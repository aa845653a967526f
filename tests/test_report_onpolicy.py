"""`wattkd report` on real tiny on-policy runs (tiny HF models built from configs, real
shards, the real training loop and energy ledger): the on-policy table, report.json and
report.md show J per rollout / scored / update token, each phase's share and the phase check,
equal to a hand computation from the run's phases.jsonl lines; off-policy runs stand beside
them at the same token budget; a report without an on-policy run has no such section."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from energy_step_source import StepPower
from test_onpolicy import experiment
from test_report_output import check_complete, parse
from wattkd.config import validate
from wattkd.data.shards import build_shards
from wattkd.energy.sources import register_source, unregister_source
from wattkd.jobs import student_job
from wattkd.report import build_report
from wattkd.train import train

PHASES = ("rollout", "score", "update")


def trained(root: Path, method: str, max_steps: int, **params) -> Path:
    data = experiment(root, max_steps=max_steps, checkpoint_every=0)
    data["distill"]["methods"][0]["params"].update(params)
    cfg = validate(data)
    if not (cfg.shards_dir / "train" / "manifest.json").is_file():
        build_shards(cfg.data, cfg.shards_dir, progress=False)
    result = train(student_job(cfg, method), progress=False)
    assert result.status == "completed"
    return cfg.out / method / "rep0"


def teacher_dir(root: Path) -> Path:
    """The reference run a report needs (the tiny teacher is built from its config, not
    trained here: a run.json is all it has)."""
    t = root / "teacher"
    t.mkdir(parents=True, exist_ok=True)
    (t / "run.json").write_text(json.dumps({"method": "teacher", "mode": "none",
                                            "status": "completed"}))
    return t


def ledger_ends(run: Path) -> list[dict]:
    """The closed windows of phases.jsonl, read line by line (no wattkd reader)."""
    lines = (run / "phases.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "phase"]


def by_hand(run: Path, comp: str) -> dict:
    """E, tokens and uncertainty per window name; J per token, shares and the check."""
    ends = ledger_ends(run)
    out: dict = {}
    for name in ("train", "step", *PHASES):
        mine = [r for r in ends if r["phase"] == name]
        uncs = [r["uncertainty_j"][comp] for r in mine]
        out[name] = {"e": math.fsum(r["energy_j"][comp] for r in mine),
                     "tokens": sum(r["tokens"] for r in mine), "windows": len(mine),
                     "unc": None if None in uncs else math.fsum(uncs),
                     "seconds": math.fsum(r["duration_s"] for r in mine)}
    step = out["step"]["e"]
    if not out["step"]["windows"]:   # an off-policy run
        return out
    for name in PHASES:
        p = out[name]
        p["per_token"] = p["e"] / p["tokens"] if p["tokens"] else None
        p["share"] = 100.0 * p["e"] / step
    out["difference"] = math.fsum(out[n]["e"] for n in PHASES) - step
    out["outside_s"] = out["step"]["seconds"] - math.fsum(out[n]["seconds"] for n in PHASES)
    uncs = [out[n]["unc"] for n in ("step", *PHASES)]
    out["tolerance"] = None if None in uncs else math.fsum(uncs)
    return out


def table(report: Path, name: str) -> dict[str, dict] | None:
    summary = json.loads((report.parent / "report.json").read_text())
    t = next((t for t in summary["tables"] if t["name"] == name), None)
    return None if t is None else {r["run"]: r for r in t["rows"]}


@pytest.fixture(scope="module")
def cpu_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This machine's own sources (CPU time x W per core: estimated): an on-policy run of
    4 steps x 128 tokens, a baseline at the same 512 tokens, a response run at 256."""
    root = tmp_path_factory.mktemp("report-onpolicy") / "exp"
    trained(root, "onpolicy", 4, **{"lambda": 1.0, "rollout_every": 1})
    trained(root, "baseline", 2)
    trained(root, "response", 1)
    return root


def test_report_shows_on_policy_phases_as_computed_by_hand(cpu_study: Path) -> None:
    report = build_report([cpu_study / "onpolicy" / "rep0", cpu_study / "baseline" / "rep0",
                           cpu_study / "response" / "rep0"], teacher=teacher_dir(cpu_study),
                          out=cpu_study.parent / "report")
    hand = by_hand(cpu_study / "onpolicy" / "rep0", "cpu")
    assert hand["rollout"]["tokens"] > 0 and hand["step"]["windows"] == 4
    rows = table(report, "onpolicy")
    assert rows is not None and set(rows) == {"onpolicy/rep0", "baseline/rep0",
                                              "response/rep0"}
    op = rows["onpolicy/rep0"]
    assert op["steps"] == 4 and op["tokens"] == hand["train"]["tokens"] == 4 * 8 * 16
    assert op["e_step"]["value"] == pytest.approx(hand["step"]["e"], rel=1e-12)
    for name in PHASES:
        assert op[f"tokens_{name}"] == hand[name]["tokens"]
        assert op[f"j_{name}"]["value"] == pytest.approx(hand[name]["per_token"], rel=1e-12)
        assert op[f"share_{name}"]["value"] == pytest.approx(hand[name]["share"], rel=1e-12)
        assert op[f"time_{name}"] == pytest.approx(
            100 * hand[name]["seconds"] / hand["step"]["seconds"], abs=0.006)   # 2 decimals
        # CPU time x W per core is an estimate: labelled, and without an uncertainty
        assert op[f"j_{name}"]["estimated"] is True and "unc" not in op[f"j_{name}"]
    assert hand["score"]["tokens"] == hand["update"]["tokens"] == 4 * 8 * 16
    assert op["difference"]["value"] == pytest.approx(hand["difference"], abs=1e-9)
    assert op["check"].startswith("unchecked")
    # off-policy runs beside it: E_run, EPT_train; the budget note only where tokens differ
    base, resp = rows["baseline/rep0"], rows["response/rep0"]
    b_hand = by_hand(cpu_study / "baseline" / "rep0", "cpu")["train"]
    assert base["tokens"] == 512 and base["e_run"]["value"] == pytest.approx(b_hand["e"])
    assert base["ept_train"]["value"] == pytest.approx(b_hand["e"] / 512, rel=1e-12)
    assert "token budget" not in base["ept_train"].get("note", "")
    assert resp["tokens"] == 256 and "token budget 256 differs" in resp["ept_train"]["note"]
    assert all(base[f"j_{n}"] == "n/a" for n in PHASES)
    assert base["check"].startswith("n/a: no step windows")
    # report.json's own section, report.md and report.html show the same
    summary = json.loads((report.parent / "report.json").read_text())
    split = summary["onpolicy"]["onpolicy/rep0"]
    assert split["phases"]["rollout"]["tokens"] == hand["rollout"]["tokens"]
    assert math.fsum(split["phases"][n]["time_share_percent"] for n in PHASES) == pytest.approx(
        100 * (1 - hand["outside_s"] / hand["step"]["seconds"]), rel=1e-9)
    assert split["phases"]["update"]["j_per_token"]["value"] == pytest.approx(
        hand["update"]["per_token"], rel=1e-12)
    md = (report.parent / "report.md").read_text()
    assert "## On-policy phases: rollout, score, update" in md
    assert "**J per rollout / scored / update token**" in md
    section = md.split("## On-policy phases", 1)[1].split("\n## ", 1)[0]
    line = next(x for x in section.splitlines() if x.startswith("| onpolicy/rep0 |"))
    assert line.count("(estimated)") >= 9
    dom = parse(report)
    check_complete(dom)
    html_rows = {r[0]["text"]: [c["text"] for c in r]
                 for r in dom.tables["table-onpolicy"]["rows"] if r}
    assert html_rows["onpolicy/rep0"][-1].startswith("unchecked")
    assert sum("(estimated)" in c for c in html_rows["onpolicy/rep0"]) >= 9
    assert html_rows["baseline/rep0"][-2:] == ["n/a", base["check"]]
    png = (report.parent / "plots" / "onpolicy_phases.png").read_bytes()
    assert png[:4] == b"\x89PNG" and any(f["id"] == "fig-onpolicy_phases" for f in dom.figures)
    svg = (report.parent / "plots" / "onpolicy_phases.svg").read_text()
    assert "estimated-cpu-time (estimated)" in svg and "onpolicy/rep0: J/rollout token" in svg
    # a report without an on-policy run: no such section anywhere
    plain = build_report([cpu_study / "baseline" / "rep0", cpu_study / "response" / "rep0"],
                         teacher=cpu_study / "teacher", out=cpu_study.parent / "plain")
    assert table(plain, "onpolicy") is None
    assert "onpolicy" not in json.loads((plain.parent / "report.json").read_text())
    assert "On-policy" not in (plain.parent / "report.md").read_text()
    assert "table-onpolicy" not in parse(plain).tables
    assert not (plain.parent / "plots" / "onpolicy_phases.png").exists()


def test_phase_check_against_a_measured_counter(tmp_path: Path) -> None:
    """A counter with a characterised uncertainty (tests/energy_step_source.py, 10 W): each
    phase's ± is its windows' summed uncertainty / tokens, and the phase check compares
    Σ phases − step windows with the windows' summed uncertainties, as by hand."""
    register_source(StepPower)
    try:
        run = trained(tmp_path / "exp", "onpolicy", 2)
    finally:
        unregister_source(StepPower)
    report = build_report([run], teacher=teacher_dir(tmp_path / "exp"), out=tmp_path / "rep")
    hand = by_hand(run, "gpu")
    op = table(report, "onpolicy")["onpolicy/rep0"]
    for name in PHASES:
        got = op[f"j_{name}"]
        assert got["source"] == "step-power" and "estimated" not in got
        if hand[name]["tokens"]:
            assert got["value"] == pytest.approx(hand[name]["per_token"], rel=1e-12)
            assert got["unc"] == pytest.approx(hand[name]["unc"] / hand[name]["tokens"],
                                               rel=1e-12)
        rel = hand[name]["unc"] / hand[name]["e"] + hand["step"]["unc"] / hand["step"]["e"]
        assert op[f"share_{name}"]["unc"] == pytest.approx(hand[name]["share"] * rel,
                                                           rel=1e-9)
    assert op["difference"]["unc"] == pytest.approx(hand["tolerance"], rel=1e-12)
    assert op["outside_s"] == pytest.approx(hand["outside_s"], abs=1e-4)
    within = abs(hand["difference"]) <= hand["tolerance"]
    assert op["check"].startswith("within" if within else "outside")
    warned = any("do not add up" in w for w in
                 json.loads((report.parent / "report.json").read_text())["warnings"])
    assert warned is not within


def test_budget_note_names_an_equal_energy_comparison() -> None:
    """Runs stopped by train.energy_budget_j train different tokens by design: the note says
    equal energy, not that the token budgets differ."""
    from types import SimpleNamespace

    from wattkd.report.onpolicy_section import _budget_note

    resp = SimpleNamespace(run=SimpleNamespace(status="budget"), tokens_train=300)
    assert "equal-energy" in _budget_note(resp, {512}, by_energy=True)
    assert "token budget 300 differs" in _budget_note(resp, {512}, by_energy=False)
    done = SimpleNamespace(run=SimpleNamespace(status="completed"), tokens_train=300)
    assert "token budget 300 differs" in _budget_note(done, {512}, by_energy=True)
