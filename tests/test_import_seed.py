"""`wattkd import seed` on small synthetic folders in the original study's layout.

The folders are written here (never the published data): 2 GPUs sampled every second at fixed
power, so every energy figure has a hand-computed value.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wattkd.cli import app
from wattkd.importers import SeedImportError, import_seed
from wattkd.importers.seed_telemetry import detect_unit, parse_lines
from wattkd.report import build_report

POWER_W = 65.0
T0 = 1_763_100_000.0


def _telemetry(path: Path, seconds: int, per_j: float = 1e6, power: float = POWER_W) -> None:
    """monitor.py lines: 2 GPUs, one sample a second, counter in `per_j` units per joule."""
    lines = []
    for k in range(seconds + 1):
        ts = f"2025-11-14T00:{k // 60:02d}:{k % 60:02d}.000000-06:00"
        gpus = [{"gpu_index": i, "gpu_name": "NVIDIA H100 NVL", "power_watts": power,
                 "energy_mJ": (1e13 + i * 1e12) + k * power * per_j,
                 "memory_used_MB": 500.0, "memory_total_MB": 95830.0,
                 "gpu_utilization_percent": 50, "memory_utilization_percent": 10,
                 "temperature_C": 30, "fan_speed_percent": None} for i in range(2)]
        lines.append(json.dumps({"timestamp": ts, "gpus": gpus,
                                 "cpu": {"cpu_utilization_percent": 1.0, "ram_used_MB": 1.0,
                                         "ram_total_MB": 2.0, "cpu_energy_uj": None}}))
    path.write_text("\n".join(lines) + "\n")


def _eval(path: Path, scores: dict[str, float], *, peft: bool = True, multiturn: bool = True,
          params: int = 8_072_204_288, pretrained: str = "meta-llama/Llama-3.1-8B-Instruct"
          ) -> None:
    args = f"pretrained={pretrained}" + (",peft=/x/adapter" if peft else "") + ",dtype=bfloat16"
    metric = {"arc_challenge": "acc_norm,none", "hellaswag": "acc_norm,none",
              "mmlu": "acc,none", "bbh": "exact_match,get-answer"}
    results = {}
    for t, v in scores.items():
        name, _, filt = metric[t].partition(",")
        results[t] = {"alias": t, metric[t]: v, f"{name}_stderr,{filt}": 0.005}
    doc = {"results": results, "group_subtasks": {"bbh": ["bbh_navigate"]},
           "configs": {t: {"task": t, "num_fewshot": 3 if t == "bbh" else 0,
                           "metadata": {"pretrained": pretrained, "version": 1.0}}
                       for t in ["arc_challenge", "hellaswag", "mmlu", "bbh_navigate"]},
           "versions": {t: 1.0 for t in scores}, "n-shot": {"arc_challenge": 0, "hellaswag": 0,
                                                           "mmlu": 0, "bbh_navigate": 3},
           "n-samples": {t: {"original": 100, "effective": 100} for t in
                         ["arc_challenge", "hellaswag", "mmlu", "bbh_navigate"]},
           "config": {"model_args": args, "model_num_parameters": params, "limit": None,
                      "fewshot_seed": 1234, "model_dtype": "torch.bfloat16"},
           "lm_eval_version": "0.4.9.1", "chat_template": "{{x}}", "chat_template_sha": "abc",
           "fewshot_as_multiturn": multiturn, "system_instruction": None,
           "date": T0, "total_evaluation_time_seconds": "100.0"}
    path.write_text(json.dumps(doc))


def _ept(path: Path, e: float, t_out: int = 6000) -> None:
    path.write_text(json.dumps({"E_run_J": e, "T_in": 15000, "T_out": t_out,
                                "EPT_in_J_per_tok": e / 15000, "EPT_out_J_per_tok": e / t_out,
                                "EPT_total_J_per_tok": e / (15000 + t_out)}))


GOOD = {"arc_challenge": 0.55, "hellaswag": 0.75, "mmlu": 0.63, "bbh": 0.66}
CHANCE = {"arc_challenge": 0.26, "hellaswag": 0.255, "mmlu": 0.247, "bbh": 0.0}


def seed_folder(root: Path, durations: tuple[int, ...] = (40, 60)) -> Path:
    """RESPONSE and FEATURE with len(durations) repeats, TRADITIONAL STUDENT, BASE/*."""
    res = root / "0EXPERIMENT_RESULTS"
    for group, scores in (("RESPONSE", GOOD), ("FEATURE", CHANCE)):
        for k, secs in enumerate(durations, start=1):
            d = res / group / f"MODEL {k}"
            d.mkdir(parents=True)
            _telemetry(d / "telemetry.jsonl", secs)
            _eval(d / "eval.json", scores)
            _ept(d / "ept.json", 9000.0 + k)
    d = res / "TRADITIONAL STUDENT"
    d.mkdir(parents=True)
    _telemetry(d / "telemetry.jsonl", 30)
    _eval(d / "eval.json", GOOD, peft=False, multiturn=False)
    _ept(d / "ept.json", 7500.0)
    for name, scores, params in (("STUDENT", GOOD, 8_030_261_248),
                                 ("TEACHER", {**GOOD, "arc_challenge": 0.62, "bbh": 0.36},
                                  70_553_706_496)):
        d = res / "BASE" / name
        d.mkdir(parents=True)
        _eval(d / "eval.json", scores, peft=False, multiturn=False, params=params)
        _ept(d / "ept.json", 7_000_000.0 if name == "TEACHER" else 7200.0, 4600)
    return root


def test_import_writes_wattkd_runs_with_hand_computed_energy(tmp_path: Path) -> None:
    src = seed_folder(tmp_path / "src")
    out = tmp_path / "runs"
    summary = import_seed(src, out)
    rep = out / "response" / "rep1"
    info = json.loads((rep / "run.json").read_text())
    assert (info["method"], info["mode"], info["repeat"], info["status"]) == \
        ("response", "response", 1, "completed")
    f = src / "0EXPERIMENT_RESULTS" / "RESPONSE" / "MODEL 2" / "telemetry.jsonl"
    files = {x["path"]: x["sha256"] for x in info["imported"]["files"]}
    assert files["RESPONSE/MODEL 2/telemetry.jsonl"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert info["imported"]["energy_unit"] == "uJ"
    window = json.loads((rep / "phases.jsonl").read_text())
    # 2 GPUs x 65 W x 60 s, from the counters (µJ detected from power x time)
    assert window["phase"] == "train"
    assert window["energy_j"]["gpu"] == pytest.approx(2 * POWER_W * 60, rel=1e-9)
    assert window["integrated_power_j"]["gpu"] == pytest.approx(2 * POWER_W * 60, rel=1e-9)
    assert window["duration_s"] == pytest.approx(60)
    ev = json.loads((rep / "eval" / "seed.json").read_text())
    assert ev["scores"]["mmlu"] == {"metric": "acc,none", "value": 0.63, "stderr": 0.005,
                                    "samples": 100}
    assert ev["protocol"]["fewshot_as_multiturn"] is True
    assert ev["model"]["adapter"] == "/x/adapter"
    ept = json.loads((rep / "ept.json").read_text())
    run = ept["runs"][0]
    assert run["batch_size"] == 4 and run["output_tokens"] == 6000
    assert run["energy"]["gpu"]["ept_total_j"] == pytest.approx(9002.0 / 21000)
    t_ept = json.loads((out / "teacher" / "ept.json").read_text())
    assert t_ept["runs"][0]["batch_size"] == 2
    assert {r["run"] for r in summary.rows} >= {"teacher", "traditional/rep0",
                                                "base-student/rep0", "feature/rep0"}
    assert (out / "traditional" / "rep0" / "run.json").is_file()
    assert json.loads((out / "traditional/rep0/run.json").read_text())["mode"] == "none"


def test_report_reads_the_imported_runs(tmp_path: Path) -> None:
    src = seed_folder(tmp_path / "src")
    out = tmp_path / "runs"
    import_seed(src, out, tasks="arc_challenge,hellaswag,mmlu", teacher_ept_batch=4)
    build_report([out], teacher=out / "teacher", out=tmp_path / "report")
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    methods = {r["method"]: r for t in doc["tables"] if t["name"] == "methods"
               for r in t["rows"]}
    e_avg = methods["response"]["e_avg"]
    assert e_avg["value"] == pytest.approx(2 * POWER_W * 50)   # mean of 40 s and 60 s
    om = methods["response"]["quality"]["value"]
    teacher = {"arc_challenge": 0.62, "hellaswag": 0.75, "mmlu": 0.63}
    assert om == pytest.approx(sum(GOOD[t] / v for t, v in teacher.items()) / 3)
    notes = " ".join(n for ns in doc["read_notes"].values() for n in ns)
    assert "collapsed-at-chance" in notes and "imported from" in notes


def test_detect_unit_from_power_times_time(tmp_path: Path) -> None:
    for per_j, unit in ((1.0, "J"), (1e3, "mJ"), (1e6, "uJ")):
        _telemetry(tmp_path / "t.jsonl", 20, per_j=per_j)
        recs, _ = parse_lines(tmp_path / "t.jsonl", "X")
        got, ratio = detect_unit(recs)
        assert got == unit and ratio == pytest.approx(per_j)
    _telemetry(tmp_path / "t.jsonl", 20, per_j=40.0)     # no power of 1000 fits
    recs, _ = parse_lines(tmp_path / "t.jsonl", "X")
    assert detect_unit(recs) == (None, pytest.approx(40.0))


def test_unit_undetermined_falls_back_to_power_and_is_flagged(tmp_path: Path) -> None:
    src = seed_folder(tmp_path / "src")
    _telemetry(src / "0EXPERIMENT_RESULTS" / "RESPONSE" / "MODEL 1" / "telemetry.jsonl", 40,
               per_j=40.0)
    summary = import_seed(src, tmp_path / "runs")
    w = json.loads((tmp_path / "runs/response/rep0/phases.jsonl").read_text())
    assert "energy-unit-undetermined" in w["flags"]
    assert w["source"]["gpu"] == "nvml-power-integrated"
    assert w["energy_j"]["gpu"] == pytest.approx(2 * POWER_W * 40)
    assert any("matches no unit" in n for n in summary.notes)


def test_flags_collapse_teacher_below_unequal_duration_lora(tmp_path: Path) -> None:
    src = seed_folder(tmp_path / "src", durations=(40, 60))
    summary = import_seed(src, tmp_path / "runs")
    names = {rel: {n for n, _ in fl} for rel, fl in summary.flags.items()}
    assert "collapsed-at-chance" in names["FEATURE/MODEL 1"]
    assert "collapsed-at-chance" not in names.get("RESPONSE/MODEL 1", set())
    assert {"teacher-below-students", "teacher-exceeds-metered-gpu"} <= names["BASE/TEACHER"]
    why = dict(summary.flags["BASE/TEACHER"])["teacher-below-students"]
    assert "bbh" in why and "fewshot_as_multiturn" in why
    assert "unequal-repeat-duration" in names["RESPONSE/MODEL 2"]
    assert "lora-unmerged" in names["RESPONSE/MODEL 1"]
    assert "lora-unmerged" not in names.get("TRADITIONAL STUDENT", set())
    info = json.loads((tmp_path / "runs/feature/rep0/run.json").read_text())
    assert "collapsed-at-chance" in {f["flag"] for f in info["imported"]["flags"]}
    ept = json.loads((tmp_path / "runs/teacher/ept.json").read_text())
    assert "teacher-exceeds-metered-gpu" in ept["runs"][0]["flags"]
    # equal durations: no flag
    s2 = import_seed(seed_folder(tmp_path / "src2", durations=(40, 41)), tmp_path / "runs2")
    assert all("unequal-repeat-duration" not in {n for n, _ in fl} for fl in s2.flags.values())


def test_cut_last_line_is_skipped_and_named_cut_middle_line_refused(tmp_path: Path) -> None:
    src = seed_folder(tmp_path / "src")
    tel = src / "0EXPERIMENT_RESULTS" / "RESPONSE" / "MODEL 1" / "telemetry.jsonl"
    tel.write_text(tel.read_text() + '{"timestamp": "2025-11-14T00:09')
    summary = import_seed(src, tmp_path / "runs")
    assert any("telemetry.jsonl:42: truncated last line skipped" in n for n in summary.notes)
    w = json.loads((tmp_path / "runs/response/rep0/phases.jsonl").read_text())
    assert w["energy_j"]["gpu"] == pytest.approx(2 * POWER_W * 40)
    lines = tel.read_text().splitlines()
    lines[5] = lines[5][:30]
    tel.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(SeedImportError, match=r"RESPONSE/MODEL 1/telemetry.jsonl:6: not valid"):
        import_seed(src, tmp_path / "runs3")
    assert not (tmp_path / "runs3").exists()


def test_missing_file_is_a_named_error_with_exit_code_3(tmp_path: Path) -> None:
    src = seed_folder(tmp_path / "src")
    (src / "0EXPERIMENT_RESULTS" / "FEATURE" / "MODEL 2" / "ept.json").unlink()
    with pytest.raises(SeedImportError, match=r"FEATURE/MODEL 2/ept.json is missing"):
        import_seed(src, tmp_path / "runs")
    res = CliRunner().invoke(app, ["import", "seed", str(src), "--out", str(tmp_path / "r")])
    assert res.exit_code == 3
    assert "error: FEATURE/MODEL 2/ept.json is missing" in res.output
    assert not (tmp_path / "r").exists()
    res = CliRunner().invoke(app, ["import", "seed", str(src), "--out", str(tmp_path / "r"),
                                   "--baseline", "nope"])
    assert res.exit_code == 2 and "--baseline 'nope'" in res.output


def test_missing_task_and_bad_json_are_named(tmp_path: Path) -> None:
    src = seed_folder(tmp_path / "src")
    with pytest.raises(SeedImportError, match=r"task 'winogrande' is not in its results"):
        import_seed(src, tmp_path / "runs", tasks="winogrande")
    (src / "0EXPERIMENT_RESULTS" / "BASE" / "TEACHER" / "ept.json").write_text("{")
    with pytest.raises(SeedImportError, match=r"BASE/TEACHER/ept.json: not valid JSON"):
        import_seed(src, tmp_path / "runs")


def test_ept_ratios_are_recomputed_and_a_wrong_one_flagged(tmp_path: Path) -> None:
    src = seed_folder(tmp_path / "src")
    f = src / "0EXPERIMENT_RESULTS" / "RESPONSE" / "MODEL 1" / "ept.json"
    doc = json.loads(f.read_text())
    doc["EPT_out_J_per_tok"] *= 2          # the file's ratio no longer matches E / T_out
    f.write_text(json.dumps(doc))
    summary = import_seed(src, tmp_path / "runs", student_ept_batch=8)
    run = json.loads((tmp_path / "runs/response/rep0/ept.json").read_text())["runs"][0]
    assert run["batch_size"] == 8
    assert "ept-arithmetic-mismatch" in run["flags"]
    assert run["energy"]["gpu"]["ept_out_j"] == pytest.approx(9001.0 / 6000)
    assert any("EPT_out_J_per_tok" in n for n in summary.notes)


def test_bad_options_exit_2(tmp_path: Path) -> None:
    src = seed_folder(tmp_path / "src")
    (tmp_path / "file").write_text("x")
    for extra in (["--out", str(tmp_path / "file")],
                  ["--out", str(tmp_path / "r"), "--teacher-ept-batch", "0"]):
        res = CliRunner().invoke(app, ["import", "seed", str(src), *extra])
        assert res.exit_code == 2, res.output
        assert res.output.startswith("error: ")
    res = CliRunner().invoke(app, ["import", "seed", str(tmp_path / "nope"), "--out",
                                   str(tmp_path / "r")])
    assert res.exit_code == 2 and "does not exist" in res.output
