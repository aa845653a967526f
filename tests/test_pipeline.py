"""`wattkd pipeline`: the whole study in miniature, end to end, and the interrupted rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

TEACHER = {"model_type": "llama", "hidden_size": 48, "intermediate_size": 96,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 64, "tie_word_embeddings": True}
STUDENT = {**TEACHER, "hidden_size": 32, "intermediate_size": 64}


def tiny_study(out: Path) -> dict:
    """configs/demo.yaml, smaller: same stages, methods and metering."""
    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
                          .read_text())
    data["output_dir"] = str(out)
    data["data"].update(seq_len=32, total_tokens=30_000)
    data["teacher"] = {"build": TEACHER,
                       "pretrain": {"max_steps": 30, "lr": 3e-3, "micro_batch_size": 8}}
    data["student"] = {"build": STUDENT}
    data["distill"]["methods"][1]["layer_map"] = [[1, 1], [2, 2]]
    data["train"].update(max_steps=40, micro_batch_size=8, log_every=5, checkpoint_every=5,
                         eval_every=20, tensorboard=False)
    data["telemetry"]["idle_seconds"] = 0
    data["eval"].update(perplexity_tokens=1024, ept={"num_prompts": 8, "prompt_tokens": 32,
                                                     "max_new_tokens": 16, "batch_sizes": [1, 4],
                                                     "warmup_batches": 1})
    return data


def run(config: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "wattkd.cli", "pipeline", str(config)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)


def test_pipeline_end_to_end_and_interrupted_rerun(tmp_path: Path) -> None:
    out = tmp_path / "study"
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(tiny_study(out)))

    # First run: killed (SIGKILL, no chance to clean up) once the feature student has a
    # checkpoint, i.e. in the middle of the third training stage.
    proc = run(config)
    ckpts = out / "feature" / "rep0" / "checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpts.is_dir() and any((p / "state.json").exists() for p in ckpts.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "report").exists()

    # Rerun: finished stages are skipped, the killed training resumes from its checkpoint.
    proc = run(config)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    assert "teacher pretrain: complete, skipped" in log
    assert "train response rep0: complete, skipped" in log
    feature_run = json.loads((out / "feature" / "rep0" / "run.json").read_text())
    assert feature_run["status"] == "completed" and feature_run["resumed_from"]

    report = json.loads((out / "report" / "report.json").read_text())
    assert (out / "report" / "report.html").exists() and (out / "report" / "report.md").exists()
    tables = {t["name"]: t["rows"] for t in report["tables"]}
    methods = {row["method"]: row for row in tables["methods"]}
    assert set(methods) == {"response", "feature", "relation", "baseline"}
    for name, row in methods.items():
        # quality retention, energy and Eff_overall (which needs inference EPT) are all filled
        for key in ("e_avg", "quality", "eff"):
            assert isinstance(row[key], dict) and row[key].get("value") is not None, (name, key)
        assert row["e_avg"].get("estimated"), name  # no counters on CPU: labelled, not measured
    ept_runs = {r.get("run") or r.get("method") for r in tables["ept"]}
    assert len(tables["ept"]) >= 5 * 2 and ept_runs  # teacher + 4 students, 2 batch sizes
