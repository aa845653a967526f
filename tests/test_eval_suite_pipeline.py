"""A suite written in the experiment YAML, end to end: `wattkd pipeline` evaluates teacher and
students on local BIG-bench folders wattkd has never seen plus a user's lm-eval YAML, scores
the in-training suite every eval_every steps, and the report compares them; `wattkd eval` on a
run directory reproduces the same protocol."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from test_eval_custom_suites import ARITH, _trimmed_copy
from test_pipeline import STUDENT, TEACHER, tiny_study
from wattkd.cli import app


def study(tmp: Path, shared: Path) -> dict:
    bb = shared / "data/eval/bigbench"
    mc = _trimmed_copy(bb / "strategyqa", tmp / "bb" / "yes_no", 8)
    gen = _trimmed_copy(bb / "object_counting", tmp / "bb" / "counting", 8)
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "arith.jsonl").write_text("".join(
        json.dumps({"question": q, "choices": c, "label": a}) + "\n" for q, c, a in ARITH))
    (tasks / "arith.yaml").write_text(yaml.safe_dump({
        "task": "my_arith", "dataset_path": "json", "test_split": "test",
        "dataset_kwargs": {"data_files": {"test": str(tasks / "arith.jsonl")}},
        "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}", "doc_to_target": "label",
        "metric_list": [{"metric": "acc"}], "metadata": {"version": 1.0}}))
    data = tiny_study(tmp / "study")
    data["teacher"] = {"build": {**TEACHER, "max_position_embeddings": 256},
                       "pretrain": {"max_steps": 10, "lr": 3e-3, "micro_batch_size": 8}}
    data["student"] = {"build": {**STUDENT, "max_position_embeddings": 256}}
    data["distill"]["methods"] = [m for m in data["distill"]["methods"]
                                  if m["name"] in ("response", "baseline")]
    data["train"].update(max_steps=6, eval_every=3, checkpoint_every=0, log_every=3)
    data["eval"].update(
        include_path=[str(tasks)],
        suite={"name": "mine", "limit": 3, "tasks": [
            {"bigbench": str(mc)}, {"bigbench": str(gen), "limit": 2}, {"task": "my_arith"}]},
        train_suite={"name": "mine-small", "limit": 2, "tasks": [{"bigbench": str(mc)}]},
        ept={"num_prompts": 4, "prompt_tokens": 16, "max_new_tokens": 4, "batch_sizes": [1],
             "warmup_batches": 1})
    return data


def test_config_suite_through_pipeline_report_and_eval(tmp_path, shared_dir):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study(tmp_path, shared_dir)))
    out = tmp_path / "study"
    proc = subprocess.run([sys.executable, "-m", "wattkd.cli", "pipeline", str(config)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    runs = {"teacher": out / "teacher", "response": out / "response" / "rep0",
            "baseline": out / "baseline" / "rep0"}
    hashes = set()
    for name, run in runs.items():
        doc = json.loads((run / "eval" / "mine.json").read_text())
        assert list(doc["scores"]) == ["yes_no", "counting", "my_arith"], name
        assert [s["samples"] for s in doc["scores"].values()] == [3, 2, 3], name
        hashes.add(doc["protocol_hash"])
    assert len(hashes) == 1  # teacher and students under one protocol

    # in-training: task accuracy beside held-out loss, with the energy so far
    for name in ("response", "baseline"):
        evals = [json.loads(line) for line in (runs[name] / "metrics.jsonl").read_text()
                 .splitlines() if json.loads(line)["kind"] == "eval"]
        assert [e["step"] for e in evals] == [3, 6], name
        for e in evals:
            assert e["suite"] == "mine-small" and set(e["tasks"]) == {"yes_no"}
            assert 0.0 <= e["tasks"]["yes_no"] <= 1.0 and "heldout_loss" in e

    report = json.loads((out / "report" / "report.json").read_text())
    assert report["suite"] == "mine" and report["quality_basis"] == "tasks"
    quality = {row["method"]: row for t in report["tables"] if t["name"] == "quality"
               for row in t["rows"]}
    assert set(quality) == {"teacher", "response", "baseline"}
    for method, row in quality.items():
        for task in ("yes_no", "counting", "my_arith"):
            assert row[f"s:{task}"]["value"] is not None, (method, task)
        if method != "teacher":
            assert "r:my_arith" in row

    # `wattkd eval` on a run directory: same suite, same protocol as the pipeline's
    again = tmp_path / "again.json"
    res = CliRunner().invoke(app, ["eval", str(runs["baseline"]), "--config", str(config),
                                   "--out", str(again)])
    assert res.exit_code == 0, res.output
    assert json.loads(again.read_text())["protocol_hash"] in hashes


def test_pipeline_evaluates_again_when_the_suite_result_is_missing(tmp_path, shared_dir):
    from wattkd.config import validate
    from wattkd.pipeline import stages

    cfg = validate(study(tmp_path, shared_dir))
    run = cfg.out / "baseline" / "rep0" / "eval"
    run.mkdir(parents=True)
    (run / "perplexity.json").write_text("{}")
    stage = next(s for s in stages(cfg) if s.name == "eval baseline/rep0")
    assert not stage.done()  # eval/mine.json is missing: a suite added later still runs
    (run / "mine.json").write_text("{}")
    assert stage.done()
