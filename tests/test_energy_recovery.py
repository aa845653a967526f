"""Issue #16 defects, one test each: a killed session's window recovered, cut lines skipped and
named, refused negative windows, EPT flags in the report, notes per component, one E_run."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from report_synth import ept_doc, make_run, phase, write_jsonl
from test_energy_fakes import FakeNvml, two_gpus
from wattkd.config import TelemetryConfig
from wattkd.energy.ledger import EnergyMeter
from wattkd.energy.metrics import e_metered, e_run, read_phases
from wattkd.report.analysis import analyze, ept_points
from wattkd.report.collect import collect, load_run
from wattkd.report.tables import runs_table

CFG = TelemetryConfig(idle_seconds=0, interval_s=0.02, slow_interval_s=0.05,
                      progress_every_s=0.1, min_window_s=0)


def test_killed_session_window_is_recovered_not_lost(tmp_path: Path) -> None:
    """Defect 1: what a SIGKILL leaves on disk (begin + progress records, telemetry, no end
    record) still gives the window's energy, labelled `recovered`, tail inside ±."""
    gpus = two_gpus(watts=200.0, period=0.05)
    run, dead = tmp_path / "run", tmp_path / "dead"
    meter = EnergyMeter(CFG, run, nvml_lib=FakeNvml(gpus))
    with meter:
        with meter.phase("train") as w:
            w.add_tokens(100)
            time.sleep(0.5)
            meter.progress("checkpoint")
            time.sleep(0.3)
            shutil.copytree(run, dead)          # the disk as a kill at this instant leaves it
            t_kill = time.time()
        done = w.record
    recs = read_phases(dead)
    rec = next(r for r in recs if r["phase"] == "train")
    assert rec["status"] == "recovered" and "recovered" in rec["flags"]
    assert rec["tokens"] == 100
    # 400 W over the 0.8 s before the kill; the unmeasured tail is inside ±
    spent = done["energy_j"]["gpu"] * (t_kill - rec["start_wall"]) / done["duration_s"]
    assert abs(rec["energy_j"]["gpu"] - spent) <= rec["uncertainty_j"]["gpu"]
    assert rec["recovered"]["closed_at"] == "telemetry sample"      # after the last progress
    assert rec["recovered"]["unmeasured_s"] < 0.2 and rec["recovered"]["progress_records"] >= 3
    assert e_run(recs).value == rec["energy_j"]["gpu"]
    assert any("`train` phase window" in s and "recovered" in s for s in recs.labels())
    # the same window closed normally is not recovered (one record per window)
    assert [r["status"] for r in read_phases(run) if r["phase"] == "train"] == ["ok"]


def test_next_session_closes_a_dead_sessions_window(tmp_path: Path) -> None:
    gpus = two_gpus(watts=100.0, period=0.05)
    meter = EnergyMeter(CFG, tmp_path, nvml_lib=FakeNvml(gpus))
    with meter, meter.phase("train"):
        time.sleep(0.25)
    lines = (tmp_path / "phases.jsonl").read_text().splitlines()
    # drop the end records and make the session's process a dead one: a killed session
    kept = [json.loads(x) for x in lines if json.loads(x)["kind"] not in ("phase", "run")]
    for r in kept:
        if r["kind"] == "begin":
            r["pid"] = 2 ** 22 + 12345                # no such process
    write_jsonl(tmp_path / "phases.jsonl", kept)
    with EnergyMeter(CFG, tmp_path, nvml_lib=FakeNvml(gpus)) as m2, m2.phase("train"):
        pass
    on_disk = [json.loads(x) for x in (tmp_path / "phases.jsonl").read_text().splitlines()]
    assert sum(r.get("status") == "recovered" for r in on_disk) == 2     # train + run window
    train = [r for r in read_phases(tmp_path) if r["phase"] == "train"]
    assert [r["status"] for r in train] == ["recovered", "ok"]


def _v2(kind: str, session: str, **kw: object) -> dict:
    return {"schema": 2, "kind": kind, "session": session, "host": "h", "seq": 1,
            "window": "phase", "phase": "train", **kw}


def test_cut_line_before_a_new_session_is_skipped_and_named(tmp_path: Path) -> None:
    """Defect 2: a kill mid-append + a resume made the whole ledger unreadable. Also an old
    schema-1 record in the same file still reads."""
    old = phase("train", gpu=100.0, gpu_unc=1.0, tokens=10)
    b = _v2("begin", "A", start_wall=10.0, source={"gpu": "nvml-counter", "cpu": "unavailable",
                                                   "dram": "unavailable"}, tokens=0)
    p = _v2("progress", "A", t_wall=20.0, tokens=50, energy_j={"gpu": 40.0, "cpu": None,
                                                               "dram": None},
            uncertainty_j={"gpu": 2.0, "cpu": None, "dram": None})
    end_b = {**phase("train", gpu=60.0, gpu_unc=1.0, tokens=70), "schema": 2, "session": "B",
             "host": "h"}
    path = tmp_path / "phases.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in (old, b, p))
    text += '{"schema":2,"kind":"progress","session":"A","ener\n'       # cut by the kill
    text += json.dumps({**b, "session": "B", "start_wall": 30.0}) + "\n" + json.dumps(end_b)
    path.write_text(text + "\n")
    recs = read_phases(path)
    assert recs.skipped[0]["line"] == 4
    assert "phases.jsonl:4: truncated line skipped" in recs.labels()[0]
    fig = e_run(recs)
    assert fig.value == pytest.approx(100.0 + 40.0 + 60.0) and fig.records == 3
    # corruption inside one session is still an error, with file and line
    path.write_text(json.dumps(b) + "\n{broken\n" + json.dumps(p) + "\n")
    with pytest.raises(ValueError, match=r"phases.jsonl:2"):
        read_phases(path)


def _student(tmp_path: Path, phases: list[dict], **kw: object) -> Path:
    make_run(tmp_path, "teacher", info={"method": "teacher", "mode": "none"},
             phases=[phase("train", gpu=10.0, gpu_unc=1.0, tokens=10)])
    return make_run(tmp_path, "baseline/rep0", info={"method": "baseline", "mode": "none"},
                    phases=phases, **kw)


def test_cut_last_line_is_in_read_first_and_on_the_figure(tmp_path: Path) -> None:
    """Defect 3: the dropped window was only a log warning; E_run looked complete."""
    d = _student(tmp_path, [phase("train", gpu=700.0, gpu_unc=7.0, tokens=100)])
    with open(d / "phases.jsonl", "a") as fh:
        fh.write('{"schema": 1, "kind": "phase", "phase": "train", "energy_j": {"gpu": 30')
    a = analyze(*collect([tmp_path / "baseline"], tmp_path / "teacher"))
    assert any("phases.jsonl:2: truncated line skipped" in w for w in a.warnings)
    q = a.students[0].e_run["gpu"]
    assert q.value == 700.0 and "phases.jsonl:2: truncated line skipped" in (q.note or "")


def test_negative_window_is_refused_naming_file_and_line(tmp_path: Path) -> None:
    """Defect 5: a -50 J train window gave E_run -50 and a place on the Pareto front."""
    d = _student(tmp_path, [phase("idle", gpu=1.0, gpu_unc=0.1),
                            phase("train", gpu=-50.0, gpu_unc=1.0, tokens=100)])
    recs = read_phases(d)
    assert recs.refused[0]["line"] == 2 and e_run(recs).value is None
    a = analyze(*collect([tmp_path / "baseline"], tmp_path / "teacher"))
    q = a.students[0].e_run["gpu"]
    assert not q.ok and "phases.jsonl:2" in q.gap and "negative" in q.gap
    assert not a.students[0].j_per_point.ok
    assert any("refused" in w for w in a.warnings)


def test_short_window_flag_of_ept_reaches_the_figures(tmp_path: Path) -> None:
    """Defect 6: ept.json's `short-window` flag was ignored by ept_points."""
    doc = ept_doc({1: {"gpu": 50.0, "gpu_unc": 1.0, "duration": 2.0}})
    doc["runs"][0]["flags"] = ["short-window"]
    d = _student(tmp_path, [phase("train", gpu=100.0, gpu_unc=1.0, tokens=10)], ept=doc)
    pts = ept_points(load_run(d), "gpu")
    assert "short-window" in (pts[0].ept_total.note or "")
    assert pts[0].ept_in.note and pts[0].ept_out.note
    assert not ept_points(load_run(d), "cpu")[0].ept_total.ok or \
        "short-window" not in (ept_points(load_run(d), "cpu")[0].ept_total.note or "")


def test_gpu_notes_stay_off_cpu_figures_and_estimated_header_is_per_run(tmp_path: Path) -> None:
    """Defect 7: `counter-reset` landed on CPU figures; one estimated CPU run made the whole
    CPU column header say estimated."""
    _student(tmp_path, [phase("train", gpu=100.0, cpu=5.0, gpu_unc=1.0, tokens=10,
                              flags=["counter-reset"], cpu_source="rapl")])
    make_run(tmp_path, "baseline/rep1", info={"method": "baseline", "mode": "none",
                                              "repeat": 1},
             phases=[phase("train", gpu=90.0, cpu=4.0, gpu_unc=1.0, tokens=10)])  # estimated
    a = analyze(*collect([tmp_path / "baseline"], tmp_path / "teacher"))
    r0 = next(r for r in a.students if r.label.endswith("rep0"))
    assert "reset" in (r0.e_run["gpu"].note or "")
    assert "reset" not in (r0.e_run["cpu"].note or "")
    header = next(c.title for c in runs_table(a).columns if c.key == "e_run_cpu")
    assert "estimated" not in header


def test_one_meaning_of_e_run() -> None:
    """Defect 7: E_run = the `train` windows in code, docs and report."""
    recs = [phase("train", gpu=10.0, gpu_unc=1.0), phase("eval", gpu=5.0, gpu_unc=1.0),
            phase("run", gpu=16.0, gpu_unc=1.0, kind="run")]
    assert e_run(recs).value == 10.0 and e_metered(recs).value == 16.0
    with pytest.raises(ValueError, match="train"):
        e_run(recs, None)  # type: ignore[arg-type]
