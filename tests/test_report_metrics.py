"""Report metrics: pure functions and the full analysis of synthetic run directories, each
checked against values computed by hand (the arithmetic is spelled out beside each check)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from report_synth import (
    T0,
    cpu_experiment,
    eval_doc,
    gpu_experiment,
    make_cache,
    make_run,
    perplexity_doc,
    phase,
    write_jsonl,
)
from wattkd.report.analysis import analyze
from wattkd.report.collect import ReportInputError, collect
from wattkd.report.metrics import (
    MetricError,
    Quantity,
    dynamic_ept,
    eff_overall,
    energy_per_point,
    mean_quantity,
    om_perf,
    pareto_front,
    ppl_retention,
    ratio,
    spread,
    total,
)

approx = lambda v: pytest.approx(v, rel=1e-12, abs=1e-15)


# ------------------------------------------------------------------------ pure functions
def test_om_perf_is_mean_of_task_ratios():
    assert om_perf({"a": 0.6, "b": 0.4}, {"a": 0.8, "b": 0.5}) == approx((0.75 + 0.8) / 2)


def test_om_perf_refuses_different_task_sets_and_zero_teacher():
    with pytest.raises(MetricError, match="tasks missing in the student: b"):
        om_perf({"a": 0.6}, {"a": 0.8, "b": 0.5})
    with pytest.raises(MetricError, match="teacher scores 0 on b"):
        om_perf({"a": 0.6, "b": 0.1}, {"a": 0.8, "b": 0.0})


def test_eff_overall_and_energy_per_point():
    # (1/2) * (0.775 * 0.02/0.01 + 0.75 * 0.02/0.0125) = (1.55 + 1.2) / 2
    assert eff_overall([0.775, 0.75], [0.01, 0.0125], 0.02) == approx(1.375)
    with pytest.raises(MetricError):
        eff_overall([], [], 0.02)
    assert energy_per_point(550.0, 0.7625) == approx(550 / 76.25)
    with pytest.raises(MetricError, match="no quality retained"):
        energy_per_point(550.0, 0.0)


def test_ppl_retention_dynamic_ept_spread_pareto():
    assert ppl_retention(20.0, 10.0) == 0.5
    assert dynamic_ept(30.72, 1.0, 10.0, 1536) == approx((30.72 - 10.0) / 1536)
    sp = spread([400.0, 500.0])
    assert (sp.mean, sp.min, sp.max, sp.n) == (450.0, 400.0, 500.0, 2)
    assert sp.std == approx(math.sqrt(2 * 50.0**2 / 1))
    assert spread([3.0]).std is None
    # (energy, quality): b dominates c (less energy, more quality); a and b are on the front
    assert pareto_front([(100, 0.5), (200, 0.9), (300, 0.8)]) == [0, 1]


def test_quantity_gaps_propagate_never_zero():
    with pytest.raises(ValueError, match="needs a gap reason"):
        Quantity(None)
    with pytest.raises(ValueError, match="non-finite"):
        Quantity(float("nan"))
    s = total([Quantity(1.0, "J", 0.1, "nvml-counter"), Quantity.missing("no ledger", "J")])
    assert s.value is None and s.gap == "no ledger"
    r = ratio(Quantity(10.0, "J", 1.0, "nvml-counter"), Quantity(5.0, "J", 0.5, "nvml-counter"),
              "")
    assert r.value == 2.0 and r.unc == approx(2.0 * (0.1 + 0.1))
    m, _sp = mean_quantity([Quantity(2.0, "J", 0.2), Quantity.missing("x", "J"),
                           Quantity(4.0, "J", 0.4, estimated=True)], "J", what="E",
                          names=["a", "b", "c"])
    assert m.value == 3.0 and m.unc == approx(0.3) and m.estimated
    assert "mean of 2 of 3; missing: b" in (m.note or "")


# --------------------------------------------------------------------- full analysis
@pytest.fixture(scope="module")
def gpu_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gpu_experiment(tmp_path_factory.mktemp("gpu"))


@pytest.fixture(scope="module")
def gpu(gpu_runs: Path):
    students, teacher = collect([gpu_runs], gpu_runs / "teacher")
    return analyze(students, teacher)


def _run(a, label):
    return next(r for r in a.students if r.label == label)


def _method(a, name):
    return next(m for m in a.methods if m.method == name)


def test_collect_expands_experiment_dir_and_leaves_out_teacher(gpu):
    assert [r.label for r in gpu.students] == ["response/rep0", "response/rep1", "feature/rep0",
                                               "relation/rep0", "baseline/rep0"]
    assert gpu.teacher.label == "teacher" and gpu.basis == "gpu"
    assert gpu.quality_basis == "tasks" and gpu.suite == "offline" and gpu.tasks == ["taskA",
                                                                                     "taskB"]


def test_energy_per_run(gpu):
    r0, r1 = _run(gpu, "response/rep0"), _run(gpu, "response/rep1")
    assert (r0.e_run["gpu"].value, r0.e_run["gpu"].unc) == (400.0, 4.0)
    assert r0.e_run["gpu"].source == "nvml-counter" and not r0.e_run["gpu"].estimated
    assert r0.tokens_train == 4000 and r0.ept_train.value == approx(0.1)
    assert r0.ept_train.unc == approx(0.001)
    # teacher cache 300 J +- 3 shared by 3 students -> 100 J +- 1 each
    assert (r0.cache_share.value, r0.cache_share.unc) == (100.0, 1.0)
    assert (r0.e_total.value, r0.e_total.unc) == (500.0, 5.0)
    # rep1 was resumed: two train windows 300 + 200 J, 2000 + 2000 tokens
    assert (r1.e_run["gpu"].value, r1.e_run["gpu"].unc, r1.tokens_train) == (500.0, 5.0, 4000)
    assert r1.ept_train.value == approx(0.125) and r1.e_total.value == 600.0
    # CPU reported beside GPU, a gap (not 0) where there is no source
    assert not r0.e_run["cpu"].ok and "CPU energy unavailable" in r0.e_run["cpu"].gap
    feat = _run(gpu, "feature/rep0")
    assert feat.cache_share is None and "online" in feat.cache_note
    assert feat.e_total.value == 800.0


def test_phases_per_run(gpu):
    phases = {p.phase: p for p in _run(gpu, "response/rep0").phases}
    assert list(phases) == ["train", "eval", "ept"]
    assert phases["eval"].energy["gpu"].value == 50.0 and phases["ept"].tokens == 1536
    assert _run(gpu, "response/rep1").phases[0].records == 2


def test_quality_per_student(gpu):
    r0 = _run(gpu, "response/rep0")
    assert r0.quality.value == approx((0.6 / 0.8 + 0.4 / 0.5) / 2)     # 0.775
    # stderr propagation: per task r*sqrt((se_s/s)^2+(se_t/t)^2), mean -> quadrature / n
    ua = 0.75 * math.hypot(0.02 / 0.6, 0.02 / 0.8)
    ub = 0.8 * math.hypot(0.01 / 0.4, 0.01 / 0.5)
    assert r0.quality.unc == approx(math.hypot(ua, ub) / 2)
    assert r0.task_ratios["taskA"].value == approx(0.75)
    assert _run(gpu, "response/rep1").quality.value == approx((0.4 / 0.8 + 0.5 / 0.5) / 2)
    assert _run(gpu, "relation/rep0").quality.value == approx((1.0 + 0.5) / 2)
    assert _run(gpu, "baseline/rep0").quality.value == approx(0.5)
    assert gpu.teacher.quality.value == 1.0


def test_protocol_mismatch_is_refused_naming_the_difference(gpu):
    q = _run(gpu, "feature/rep0").quality
    assert not q.ok
    assert "refusing to compare" in q.gap and "limit: 20 (feature/rep0) vs 100 (teacher)" in q.gap
    assert not _run(gpu, "feature/rep0").j_per_point.ok


def test_inference_ept(gpu):
    assert gpu.ept_batch == 8     # largest batch size of the teacher and every student with EPT
    t = gpu.teacher.ept[8]
    assert t.ept_total.value == approx(30.72 / 1536) and t.ept_in.value == approx(30.72 / 1024)
    assert t.ept_out.value == approx(30.72 / 512)
    assert t.ept_total.unc == approx(1.536 / 1536)
    assert t.ept_dynamic.value == approx((30.72 - 1.0 * 10.0) / 1536)
    assert t.ept_dynamic_out.value == approx((30.72 - 1.0 * 10.0) / 512)
    assert t.ept_dynamic_in.value == approx((30.72 - 1.0 * 10.0) / 1024)
    assert _run(gpu, "response/rep1").ept_at.value == approx(19.2 / 1536)   # 0.0125
    # relation measured only batch 8 (a different sweep): comparable at batch 8
    assert _run(gpu, "relation/rep0").ept_at.value == approx(0.01)
    assert "ept.json missing" in _run(gpu, "baseline/rep0").ept_at.gap


def test_method_figures(gpu):
    m = _method(gpu, "response")
    assert (m.e_avg.value, m.e_avg.unc) == (450.0, 4.5)
    assert m.e_spread.std == approx(math.sqrt((50.0**2 + 50.0**2) / 1)) and m.e_spread.n == 2
    assert (m.e_total.value, m.e_total.unc) == (550.0, 5.5)
    assert m.om.value == approx((0.775 + 0.75) / 2)
    assert m.eff.value == approx((0.775 * 0.02 / 0.01 + 0.75 * 0.02 / 0.0125) / 2)  # 1.375
    # per term: relative energy uncertainties add: 0.001/0.02 + 0.0005/0.01 = 0.1
    assert m.eff.unc == approx((1.55 * 0.1 + 1.2 * 0.1) / 2)
    assert m.k_eff == 2
    assert m.j_per_point.value == approx(550.0 / (100 * 0.7625))
    rel = _method(gpu, "relation")
    assert not rel.e_avg.ok and "relation/rep0" in rel.e_avg.gap and "phases.jsonl" in rel.e_avg.gap
    assert rel.eff.value == approx(0.75 * 0.02 / 0.01)
    base = _method(gpu, "baseline")
    assert base.j_per_point.value == approx(300.0 / 50.0)
    assert not base.eff.ok and "ept.json missing" in base.eff.gap
    assert not _method(gpu, "feature").eff.ok


def test_cpu_demo_uses_estimated_cpu_and_perplexity(tmp_path: Path):
    root = cpu_experiment(tmp_path)
    a = analyze(*collect([root], root / "teacher"))
    assert a.basis == "cpu" and a.basis_label == "CPU, estimated"
    assert a.quality_basis == "perplexity" and a.quality_label.startswith("OM_ppl")
    assert any("perplexity retention" in w for w in a.warnings)
    r = _run(a, "response/rep0")
    assert not r.e_run["gpu"].ok and "NVML library not found" in r.e_run["gpu"].gap
    assert r.e_run["cpu"].value == 200.0 and r.e_run["cpu"].estimated
    assert r.quality.value == approx(math.exp(2.0 - 2.5))
    assert r.ept_at.value == approx(12.0 / 1536) and r.ept_at.estimated
    m = _method(a, "response")
    assert m.eff.value == approx(math.exp(-0.5) * (24.0 / 1536) / (12.0 / 1536))
    assert m.eff.estimated and m.j_per_point.estimated
    assert m.j_per_point.value == approx(200.0 / (100 * math.exp(-0.5)))


# --------------------------------------------------------------------------- gaps
def test_no_teacher_eval_marks_every_quality_gap(gpu_runs: Path, tmp_path: Path):
    root = tmp_path / "x"
    shutil.copytree(gpu_runs, root)
    (root / "teacher" / "eval" / "offline.json").unlink()
    a = analyze(*collect([root], root / "teacher"))
    assert any("teacher has no eval/offline.json" in w for w in a.warnings)
    for r in a.students:
        assert r.quality.value is None and r.quality.gap
    assert all(not m.eff.ok and not m.om.ok for m in a.methods)


def test_multi_host_sums_energy_and_counts_tokens_once(tmp_path: Path):
    make_run(tmp_path, "teacher", info={"method": "teacher", "mode": "none"}, telemetry=False)
    make_run(tmp_path, "response/rep0", info={"method": "response", "mode": "response",
                                              "teacher_signals": "online"}, telemetry=False,
             phases=[phase("train", gpu=100.0, gpu_unc=1.0, tokens=1000, host="a"),
                     phase("train", gpu=150.0, gpu_unc=2.0, tokens=1000, host="b"),
                     phase("inner", gpu=40.0, tokens=0, depth=1)])
    a = analyze(*collect([tmp_path / "response"], tmp_path / "teacher"))
    r = a.students[0]
    assert (r.e_run["gpu"].value, r.e_run["gpu"].unc, r.tokens_train) == (250.0, 3.0, 1000)
    assert r.ept_train.value == 0.25
    assert [p.phase for p in r.phases] == ["train"]          # nested windows not re-counted
    assert not a.students[0].quality.ok


def test_partial_ledger_and_bad_schema_and_missing_cache_record(tmp_path: Path):
    make_run(tmp_path, "teacher", info={"method": "teacher", "mode": "none"}, telemetry=False)
    make_run(tmp_path, "response/rep0", info={"method": "response", "mode": "response",
                                              "teacher_signals": "cache"}, telemetry=False,
             phases=[phase("train", gpu=100.0, tokens=10),
                     phase("train", gpu=None, tokens=10, start=T0 + 200)])
    bad = make_run(tmp_path, "response/rep1", info={"method": "response", "mode": "response",
                                                    "repeat": 1}, telemetry=False)
    write_jsonl(bad / "phases.jsonl", [{**phase("train", gpu=1.0), "schema": 99}])
    a = analyze(*collect([tmp_path / "response"], tmp_path / "teacher"))
    r0, r1 = a.students
    assert not r0.e_run["gpu"].ok and "partial: 1 of 2" in r0.e_run["gpu"].gap
    assert not r0.cache_share.ok and "no teacher_cache record" in r0.cache_share.gap
    assert not r1.e_run["gpu"].ok and "schema 99" in r1.e_run["gpu"].gap
    assert "schema 99" in r1.run.gaps["phases"]


def test_bad_inputs_fail_early_with_one_clear_error(gpu_runs: Path, tmp_path: Path):
    with pytest.raises(ReportInputError, match="does not exist"):
        collect([tmp_path / "nope"], gpu_runs / "teacher")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportInputError, match="not a run directory"):
        collect([tmp_path / "empty"], gpu_runs / "teacher")
    with pytest.raises(ReportInputError, match="--teacher"):
        collect([gpu_runs], tmp_path / "no-teacher")
    with pytest.raises(ReportInputError, match="only the teacher"):
        collect([gpu_runs / "teacher"], gpu_runs / "teacher")


def test_unreadable_eval_is_a_gap(tmp_path: Path):
    make_run(tmp_path, "teacher", info={"method": "teacher", "mode": "none"}, telemetry=False,
             evals={"offline": eval_doc({"a": (0.5, None)})})
    d = make_run(tmp_path, "baseline/rep0", info={"method": "baseline", "mode": "none"},
                 telemetry=False, evals={"offline": eval_doc({"a": (0.25, None)})})
    (d / "eval" / "offline.json").write_text(json.dumps({"broken": True})[:-3])
    a = analyze(*collect([tmp_path / "baseline"], tmp_path / "teacher"))
    r = a.students[0]
    assert "not valid JSON" in r.run.gaps["eval/offline.json"]
    assert not r.quality.ok and "no eval/offline.json" in r.quality.gap


def test_real_energy_meter_output(tmp_path: Path):
    """Files written by the real EnergyMeter (no NVML here: estimated CPU, GPU unavailable)."""
    from wattkd.config import TelemetryConfig
    from wattkd.energy.ledger import EnergyMeter
    from wattkd.energy.metrics import read_phases
    from wattkd.report.plots import power_traces

    cfg = TelemetryConfig(cpu_watts_per_core=10.0, idle_seconds=0.2, interval_s=0.05,
                          slow_interval_s=0.05)
    for rel, tokens in (("teacher", 500), ("baseline/rep0", 1000)):
        d = make_run(tmp_path, rel, info={"method": "teacher" if rel == "teacher" else "baseline",
                                          "mode": "none"}, metrics=False)
        with EnergyMeter(cfg, d) as meter, meter.phase("train") as w:
            sum(i * i for i in range(300_000))
            w.add_tokens(tokens)
    a = analyze(*collect([tmp_path / "baseline"], tmp_path / "teacher"))
    r = a.students[0]
    rec = next(p for p in read_phases(r.run.path) if p["phase"] == "train")
    assert a.basis == "cpu" and r.e_run["cpu"].value == rec["energy_j"]["cpu"] > 0
    assert r.e_run["cpu"].estimated and r.e_run["cpu"].source == "estimated-cpu-time"
    assert r.ept_train.value == approx(rec["energy_j"]["cpu"] / 1000)
    assert not r.e_run["gpu"].ok and "NVML" in r.e_run["gpu"].gap
    plot = next(p for p in power_traces(a) if p.name == "power_baseline_rep0")
    assert plot.gap is None and b"no GPU in the telemetry" in plot.svg


def test_cache_share_from_the_cache_folder(tmp_path: Path):
    """Amortisation through wattkd.teacher_cache: build energy / runs in users.jsonl."""
    from wattkd.amortisation import record_cache_use

    cache = make_cache(tmp_path / "cache", gpu=600.0, cpu=90.0, session_unc=[4.0, 2.0])
    make_run(tmp_path, "teacher", info={"method": "teacher", "mode": "none"})
    dirs = []
    for k in range(3):
        d = make_run(tmp_path, f"response/rep{k}", info={
            "method": "response", "mode": "response", "repeat": k, "teacher_signals": "cache"},
            phases=[phase("train", gpu=100.0, gpu_unc=1.0, tokens=1000)])
        dirs.append(d)
    for d in dirs[:2]:
        rec = record_cache_use(cache, d)
        info = json.loads((d / "run.json").read_text())
        (d / "run.json").write_text(json.dumps({**info, "teacher_cache": rec}))
    record_cache_use(cache, dirs[0])                        # a resumed run registers once
    a = analyze(*collect([tmp_path / "response"], tmp_path / "teacher"))
    r0, _r1, r2 = a.students
    # 600 J shared by the 2 registered runs; uncertainty (4 + 2) / 2
    assert (r0.cache_share.value, r0.cache_share.unc) == (300.0, 3.0)
    assert r0.cache_share.source == "nvml-counter" and "600 J / 2 runs" in r0.cache_share.note
    assert (r0.e_total.value, r0.e_total.unc) == (400.0, 4.0)
    assert not r2.cache_share.ok and "no teacher_cache record" in r2.cache_share.gap
    assert not r2.e_total.ok                      # never E_run alone, silently
    # the CPU component of the same cache, for a CPU-basis report
    from wattkd.amortisation import cache_share

    q, _ = cache_share(r0.run.info, r0.run.kind, "cpu")
    assert q.value == 45.0 and q.estimated and q.unc is None
    # an interrupted build: the energy is a lower bound, and says so
    cache2 = make_cache(tmp_path / "cache2", gpu=600.0, session_unc=[4.0, None], complete=False)
    r0.run.info["teacher_cache"] = record_cache_use(cache2, dirs[0])
    q, _ = cache_share(r0.run.info, r0.run.kind, "gpu")
    assert q.value == 600.0 and q.unc is None and "lower bound" in q.note


def test_student_scoring_zero_on_a_task_keeps_its_quality(tmp_path):
    """A student with no correct answers on a task (found on Gemma 3 270M students: object
    counting 0/100) has ratio 0 with the student's stderr over the teacher's as uncertainty."""
    make_run(tmp_path, "teacher", info={"method": "teacher", "mode": "none", "repeat": 0},
             evals={"offline": eval_doc({"taskA": (0.8, 0.02), "taskB": (0.5, 0.01)})})
    make_run(tmp_path, "response/rep0",
             info={"method": "response", "mode": "response", "repeat": 0},
             evals={"offline": eval_doc({"taskA": (0.0, 0.0), "taskB": (0.4, 0.01)})})
    students, teacher = collect([tmp_path], tmp_path / "teacher")
    q = analyze(students, teacher).students[0]
    assert q.quality.value == approx((0.0 + 0.4 / 0.5) / 2)
    assert q.task_ratios["taskA"].value == 0.0 and q.task_ratios["taskA"].unc == 0.0
    ub = 0.8 * math.hypot(0.01 / 0.4, 0.01 / 0.5)
    assert q.quality.unc == approx(ub / 2)


def test_a_student_worse_than_a_uniform_guess_is_flagged_collapsed(tmp_path: Path):
    """Issue 27's lambda-1 on-policy student: held-out NLL 121 nats a token (ln V = 12.5), task
    scores at chance, yet the best OM_perf of its study. The report names it collapsed."""
    vocab = 262_144
    make_run(tmp_path, "teacher", info={"method": "teacher", "mode": "none"},
             evals={"offline": eval_doc({"taskA": (0.5, 0.02)})},
             perplexity=perplexity_doc(3.8, vocab=vocab))
    for method, nll in (("onpolicy", 120.89), ("response", 4.3)):
        make_run(tmp_path, f"{method}/rep0", info={"method": method, "mode": method},
                 phases=[phase("train", gpu=100.0, gpu_unc=1.0, tokens=1000)],
                 evals={"offline": eval_doc({"taskA": (0.6, 0.02)})},
                 perplexity=perplexity_doc(nll, vocab=vocab))
    a = analyze(*collect([tmp_path / "onpolicy", tmp_path / "response"], tmp_path / "teacher"))
    flagged = [w for w in a.warnings if "collapsed model" in w]
    assert len(flagged) == 1 and flagged[0].startswith("onpolicy/rep0")
    assert "above ln(262144) = 12.5" in flagged[0]
    by = {r.label: r for r in a.students}
    assert "collapsed model" in (by["onpolicy/rep0"].quality.note or "")
    assert "collapsed" not in (by["response/rep0"].quality.note or "")
    assert by["onpolicy/rep0"].quality.ok    # the figure stays, named for what it is
