"""`wattkd teacher finetune`: a pretrained teacher adapted to the shards with the students'
loop, used by later stages, resumed after SIGKILL in the pipeline, its energy amortised."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from wattkd.config import ConfigError, validate
from wattkd.jobs import student_job, teacher_finetune_job, teacher_path
from wattkd.train import train

TEACHER = {"model_type": "llama", "hidden_size": 48, "intermediate_size": 96,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 64, "tie_word_embeddings": True}
STUDENT = {**TEACHER, "hidden_size": 32, "intermediate_size": 64}


def experiment(out: Path, base: Path, **finetune: object) -> dict:
    return {
        "name": "ft", "output_dir": str(out),
        "data": {"tokenizer": "bundled:bpe-4096", "seq_len": 32, "total_tokens": 30_000,
                 "shards_dir": str(out.parent / "shards"), "heldout_fraction": 0.05},
        "teacher": {"model": str(base), "finetune": {"max_steps": 16, "lr": 3e-3,
                                                     "micro_batch_size": 8, **finetune}},
        "student": {"build": STUDENT},
        "distill": {"methods": [
            {"name": "response", "method": "response",
             "losses": [{"name": "forward_kl"}, {"name": "ce", "weight": 0.5}]},
            {"name": "baseline", "method": "none", "losses": [{"name": "ce"}]}]},
        "train": {"max_steps": 8, "micro_batch_size": 8, "lr": 3e-3, "log_every": 4,
                  "checkpoint_every": 4, "tensorboard": False, "device": "cpu"},
        "telemetry": {"idle_seconds": 0, "cpu_watts_per_core": 10.0},
        "eval": {"suite": None, "perplexity_tokens": 512,
                 "ept": {"num_prompts": 4, "prompt_tokens": 16, "max_new_tokens": 8,
                         "batch_sizes": [2], "warmup_batches": 1}},
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 'pretrained' teacher folder (random init, saved as an HF model) and the shards."""
    from wattkd.data.shards import build_shards
    from wattkd.data.tokenizer import load_tokenizer
    from wattkd.models import build_from_config

    root = tmp_path_factory.mktemp("ft")
    folder = root / "base"
    tok = load_tokenizer("bundled:bpe-4096")
    build_from_config(TEACHER, len(tok), seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = validate(experiment(root / "exp", folder))
    build_shards(cfg.data, cfg.shards_dir, progress=False)
    return folder


def test_config_refuses_finetune_without_a_pretrained_teacher(tmp_path: Path) -> None:
    data = experiment(tmp_path / "x", tmp_path / "base")
    data["teacher"] = {"build": TEACHER, "finetune": {"max_steps": 5}}
    with pytest.raises(ConfigError, match="teacher.finetune adapts a pretrained teacher"):
        validate(data)
    data["teacher"] = {"model": "m", "finetune": {"max_steps": 5,
                                                  "lora": {"merge_on_save": False}}}
    with pytest.raises(ConfigError, match="merge_on_save must be true"):
        validate(data)


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8, "dropout": 0.0}],
                         ids=["full", "lora"])
def test_finetune_adapts_the_teacher_and_students_use_it(base: Path, lora) -> None:
    import torch

    from wattkd.eval.perplexity import perplexity
    from wattkd.models import load_pretrained

    out = base.parent / f"exp-{'lora' if lora else 'full'}"
    cfg = validate(experiment(out, base, **({"lora": lora} if lora else {})))
    assert teacher_path(cfg) == str(out / "teacher" / "final")
    res = train(teacher_finetune_job(cfg), progress=False)
    assert res.status == "completed" and res.step == 16
    info = json.loads((out / "teacher" / "run.json").read_text())
    assert info["role"] == "teacher_finetune" and info["method"] == "teacher"
    assert (out / "teacher" / "final" / "config.json").exists()  # whole folder (LoRA merged)
    phases = [json.loads(x) for x in (out / "teacher" / "phases.jsonl").read_text().splitlines()]
    assert any(p.get("phase") == "train" and p.get("energy_j", {}).get("cpu") for p in phases)

    def loss(folder: Path) -> float:
        net = load_pretrained(str(folder), dtype=torch.float32)
        return perplexity(net, cfg.shards_dir / "heldout", max_tokens=512, batch_size=8)["nll"]

    # it learned the shards (LoRA: only the adapters train, merged into final/)
    assert loss(out / "teacher" / "final") < loss(base) - (0.01 if lora else 0.1)
    params = info["parameters"]
    assert (params["trainable"] < params["total"] / 4) if lora else \
        params["trainable"] == params["total"]

    # a KD student reads the fine-tuned teacher and registers as one of its users
    student = train(student_job(cfg, "response", 0), progress=False)
    assert student.status == "completed"
    run = json.loads((out / "response" / "rep0" / "run.json").read_text())
    assert run["teacher"] == str(out / "teacher" / "final")
    assert run["teacher_finetune"]["run_dir"] == str((out / "teacher").resolve())
    assert run["seeds"] == {"data_order": 0, "init": 0}
    users = (out / "teacher" / "users.jsonl").read_text().splitlines()
    assert len(users) == 1


def test_students_refuse_a_missing_finetuned_teacher(base: Path) -> None:
    cfg = validate(experiment(base.parent / "exp-missing", base))
    with pytest.raises(FileNotFoundError, match="run `wattkd teacher finetune` first"):
        train(student_job(cfg, "response", 0), progress=False)


def _pipeline(config: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "wattkd.cli", "pipeline", str(config)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_pipeline_stage_resumes_after_sigkill_and_report_amortises(base: Path,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "study"
    data = experiment(out, base, max_steps=40, micro_batch_size=4)
    data["data"]["shards_dir"] = str(base.parent / "exp" / "shards")
    data["train"].update(repeats=2, checkpoint_every=2)
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(data))

    proc = _pipeline(config)
    ckpts = out / "teacher" / "checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpts.is_dir() and any((p / "state.json").exists() for p in ckpts.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "teacher" / "final").exists()

    proc = _pipeline(config)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    info = json.loads((out / "teacher" / "run.json").read_text())
    assert info["status"] == "completed" and info["resumed_from"] and info["step"] == 40

    report = json.loads((out / "report" / "report.json").read_text())
    rows = {r["run"]: r for t in report["tables"] if t["name"] == "runs" for r in t["rows"]}
    teacher_e = rows["teacher"]["e_run_cpu"]["value"]
    users = (out / "teacher" / "users.jsonl").read_text().splitlines()
    assert len(users) == 2  # the two response repeats; the baseline never reads the teacher
    for label in ("response/rep0", "response/rep1"):
        r = rows[label]
        assert r["finetune_share"]["value"] == pytest.approx(teacher_e / 2)
        assert r["e_total"]["value"] == pytest.approx(r["e_run_cpu"]["value"] + teacher_e / 2)
    assert rows["baseline/rep0"]["finetune_share"] == "n/a"
    assert rows["baseline/rep0"]["e_total"]["value"] == pytest.approx(
        rows["baseline/rep0"]["e_run_cpu"]["value"])
    # repeat k of every method shares its seed (data order, init): the runs are paired
    for rep in (0, 1):
        seeds = {json.loads((out / m / f"rep{rep}" / "run.json").read_text())["seeds"]["data_order"]
                 for m in ("response", "baseline")}
        assert seeds == {rep}
    # verdicts: two paired repeats, perplexity over the same held-out sequences
    st = report["statistics"]
    assert st["repeats"] == 2 and st["baseline"] == "baseline"
    ppl = next(c for c in st["comparisons"] if c["figure"] == "perplexity")
    assert ppl["how"] == "bootstrap" and ppl["repeats"] == 2
    assert ppl["lo"] <= ppl["diff"] <= ppl["hi"]
    flat = " ".join(log.split())  # rich wraps long lines
    assert f"response vs baseline: {ppl['verdict']}" in flat
    assert "best quality" not in log and "most efficient" not in log
    doc = json.loads((out / "response" / "rep0" / "eval" / "perplexity.json").read_text())
    ps = doc["per_sequence"]
    assert sum(ps["tokens"]) == doc["tokens"]
    assert sum(ps["nll_sum"]) / doc["tokens"] == pytest.approx(doc["nll"], rel=1e-6)


def test_cli_without_the_section_says_what_to_add(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wattkd.cli import app

    data = experiment(tmp_path / "x", tmp_path / "base")
    del data["teacher"]["finetune"]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(app, ["teacher", "finetune", str(config)])
    assert res.exit_code == 2
    assert "teacher.finetune is not set" in res.output
