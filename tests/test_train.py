"""The training loop: every mode learns, exact resume after SIGKILL, KD beats no-KD."""

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
from wattkd.distill.fused import path as fused_path
from wattkd.jobs import student_job, teacher_pretrain_job
from wattkd.train import train
from wattkd.training.guard import DivergenceError, DivergenceGuard
from wattkd.training.heldout import heldout_loss

TEACHER = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 128, "tie_word_embeddings": True}
STUDENT = {**TEACHER, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}

METHODS = [
    {"name": "response", "method": "response",
     "losses": [{"name": "forward_kl", "params": {"temperature": 1.0}}]},
    {"name": "feature", "method": "feature", "layer_map": [[1, 1], [2, 3]],
     "losses": [{"name": "hidden_mse"}, {"name": "ce"}]},
    {"name": "relation", "method": "relation",
     "losses": [{"name": "rkd_distance"}, {"name": "rkd_angle"}, {"name": "ce"}]},
    {"name": "baseline", "method": "none", "losses": [{"name": "ce"}]},
]


def experiment(out: Path, **train: object) -> dict:
    return {
        "name": "t",
        "output_dir": str(out),
        "data": {"tokenizer": "bundled:bpe-4096", "seq_len": 64, "total_tokens": 120_000,
                 "shards_dir": str(out.parent / "shards"), "rows_per_part": 256},
        "teacher": {"build": TEACHER,
                    "pretrain": {"max_steps": 150, "lr": 3e-3, "micro_batch_size": 16}},
        "student": {"build": STUDENT},
        "distill": {"methods": METHODS},
        "train": {"max_steps": 20, "micro_batch_size": 8, "lr": 3e-3, "log_every": 5,
                  "tensorboard": False, "device": "cpu", **train},
        "telemetry": {"idle_seconds": 0},
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards from the bundled corpus and a teacher pretrained on them (shared by tests)."""
    from wattkd.data.shards import build_shards

    root = tmp_path_factory.mktemp("train")
    cfg = validate(experiment(root / "exp"))
    build_shards(cfg.data, cfg.shards_dir, progress=False)
    result = train(teacher_pretrain_job(cfg), progress=False)
    assert result.status == "completed"
    return root


def losses(run_dir: Path) -> dict[int, float]:
    """Per-step loss; a resumed run re-logs some steps, the last record of a step wins."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] in ("train", "step"):
            out[rec["step"]] = rec["loss"]
    return out


@pytest.mark.parametrize("method", [m["name"] for m in METHODS])
def test_each_mode_trains_and_loss_falls(workspace: Path, method: str) -> None:
    cfg = validate(experiment(workspace / "exp", max_steps=20))
    job = student_job(cfg, method)
    job.run_dir = workspace / f"m-{method}"
    result = train(job, progress=False)
    assert result.status == "completed" and result.step == 20
    curve = losses(job.run_dir)
    first = sum(curve[s] for s in range(1, 4)) / 3
    last = sum(curve[s] for s in range(18, 21)) / 3
    assert last < first, (method, first, last)
    final = json.loads((job.run_dir / "final" / "wattkd.json").read_text())
    assert final["method"] == method
    assert (job.run_dir / "phases.jsonl").exists()
    if method == "feature":
        assert (job.run_dir / "final" / "projector.pt").exists()


def test_response_kd_beats_no_kd_baseline(workspace: Path) -> None:
    """Same student, steps, data and seed: distilling from the trained teacher generalises
    better than CE alone on the held-out shards."""
    import torch
    from transformers import AutoModelForCausalLM

    results = {}
    for method in ("response", "baseline"):
        cfg = validate(experiment(workspace / "exp", max_steps=60))
        job = student_job(cfg, method)
        job.run_dir = workspace / f"kd-{method}"
        train(job, progress=False)
        model = AutoModelForCausalLM.from_pretrained(job.run_dir / "final")
        from wattkd.distill.modes import make_mode
        from wattkd.distill.objective import DistillObjective

        obj = DistillObjective(model, make_mode(cfg.method("baseline"), model, None),
                               cfg.method("baseline"), vocab=model.config.vocab_size,
                               chunk_tokens=256)
        results[method] = heldout_loss(obj, cfg.shards_dir / "heldout", tokens=20_000,
                                       batch_size=16, device=torch.device("cpu"),
                                       )
    assert results["response"]["heldout_loss"] < results["baseline"]["heldout_loss"], results


def _train_cmd(config: Path, resume: str = "auto") -> list[str]:
    return [sys.executable, "-m", "wattkd.cli", "train", str(config), "--method", "response",
            "--resume", resume]


def test_exact_resume_after_sigkill(workspace: Path) -> None:
    """Kill -9 mid-run, resume: per-step losses after the checkpoint match an uninterrupted
    run bitwise (CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    runs = {}
    for name in ("straight", "killed"):
        data = experiment(workspace / f"resume-{name}", max_steps=120, checkpoint_every=10,
                          keep_last=3)
        data["output_dir"] = str(workspace / f"resume-{name}")
        data["teacher"] = {"model": str(workspace / "exp" / "teacher" / "final")}
        path = workspace / f"resume-{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        runs[name] = (path, workspace / f"resume-{name}" / "response" / "rep0")
    subprocess.run(_train_cmd(runs["straight"][0]), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(_train_cmd(runs["killed"][0]), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = runs["killed"][1] / "checkpoints"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpts.is_dir() and any(p.name >= "step_0000030" for p in ckpts.iterdir()
                                  if (p / "state.json").exists()):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(runs["killed"][1]))
    assert killed_at < 120
    subprocess.run(_train_cmd(runs["killed"][0]), check=True, env=env, capture_output=True)

    straight, resumed = losses(runs["straight"][1]), losses(runs["killed"][1])
    assert sorted(resumed) == list(range(1, 121))
    assert [resumed[s] for s in range(1, 121)] == [straight[s] for s in range(1, 121)]
    run = json.loads((runs["killed"][1] / "run.json").read_text())
    assert run["status"] == "completed" and run["resumed_from"]


def test_sigusr1_checkpoints_and_exits_75(workspace: Path) -> None:
    data = experiment(workspace / "preempt", max_steps=100000)
    data["output_dir"] = str(workspace / "preempt")
    data["teacher"] = {"model": str(workspace / "exp" / "teacher" / "final")}
    path = workspace / "preempt.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen(_train_cmd(path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = workspace / "preempt" / "response" / "rep0" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and metrics.stat().st_size):
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == 75
    run = json.loads((metrics.parent / "run.json").read_text())
    assert run["status"] == "preempted"
    assert list((metrics.parent / "checkpoints").iterdir())


def test_bad_inputs_refused_before_training(workspace: Path) -> None:
    cfg = validate(experiment(workspace / "exp"))
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        student_job(cfg, "nope")
    bad = experiment(workspace / "exp")
    bad["distill"]["methods"] = [{"name": "f", "method": "feature", "layer_map": [[5, 1]],
                                  "losses": [{"name": "hidden_mse"}]}]
    cfg = validate(bad)
    from wattkd.models import ModelError

    with pytest.raises(ModelError, match=r"layer_map pair \(5, 1\): the student has 2 layers"):
        train(student_job(cfg, "f"), progress=False)
    missing = experiment(workspace / "exp")
    missing["data"]["shards_dir"] = str(workspace / "no-shards")
    with pytest.raises(FileNotFoundError, match="wattkd data build"):
        train(student_job(validate(missing), "response"), progress=False)


def test_divergence_guard_stops_with_message() -> None:
    guard = DivergenceGuard(window=3, max_ratio=2.0)
    for step, value in enumerate([1.0, 1.0, 1.0, 1.5, 1.8], 1):
        guard.update(value, step)
    with pytest.raises(DivergenceError, match="diverged at step 6"):
        guard.update(5.0, 6)


def test_training_from_teacher_cache_matches_online(workspace: Path) -> None:
    """Teacher farm end to end through `train()`: cache the pretrained teacher once, train
    response and feature students from it; the response run tracks the online run's losses
    (top-k + tail vs full logits; exact equality with k = vocab is tested in
    test_teacher_cache.py), and the cache's use is recorded for amortisation."""
    from wattkd.amortisation import amortisation
    from wattkd.teacher_cache import build_cache

    results = {}
    for signals in ("online", "cache"):
        data = experiment(workspace / "exp", max_steps=8, log_every=1)
        data["distill"]["teacher_signals"] = signals
        data["distill"]["cache_top_k"] = 256
        data["distill"]["cache_encoding"] = "raw"
        data["distill"]["cache_dir"] = str(workspace / "cache")
        cfg = validate(data)
        if signals == "cache":
            build_cache(cfg, progress=False)
        for method in ("response", "feature"):
            job = student_job(cfg, method)
            job.run_dir = workspace / f"{signals}-{method}"
            assert train(job, progress=False).status == "completed"
            results[(signals, method)] = losses(job.run_dir)
    online, cached = results[("online", "response")], results[("cache", "response")]
    # Same weights and batch at step 1: KL over the top-k + tail buckets is the full KL with
    # the tail merged, so it can only be lower (data-processing inequality), and close.
    assert cached[1] <= online[1] + 1e-4
    for step in range(1, 9):
        assert abs(online[step] - cached[step]) <= 0.10 * abs(online[step]), step
    run = json.loads((workspace / "cache-response" / "run.json").read_text())
    assert run["teacher_cache"]["path"] == str(workspace / "cache")
    users = amortisation(workspace / "cache")["users"]
    assert {str(workspace / "cache-response"), str(workspace / "cache-feature")} <= {
        str(Path(u)) for u in users}


def test_rerun_of_a_finished_run_does_not_train_again(workspace: Path) -> None:
    """`checkpoint_every: 0` leaves no checkpoint, so before this a second `wattkd train` of a
    finished run trained it again from step 0; now it reports the finished run, and only
    `--resume never` retrains."""
    cfg = validate(experiment(workspace / "rerun", max_steps=4, checkpoint_every=0))
    first = train(student_job(cfg, "baseline"), progress=False)
    log = first.run_dir / "metrics.jsonl"
    before = log.read_text()
    again = train(student_job(cfg, "baseline"), progress=False)
    assert (again.status, again.step, again.tokens) == ("completed", 4, first.tokens)
    assert again.final_dir == first.final_dir and log.read_text() == before
    fresh = train(student_job(cfg, "baseline"), resume="never", progress=False)
    # the fresh start's log holds its own steps only; the earlier run's records are archived
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert fresh.step == 4 and steps == [1, 2, 3, 4]
    archived = list((first.run_dir / "archive").glob("*/metrics.jsonl"))
    assert [p.read_text() for p in archived] == [before]
    longer = validate(experiment(workspace / "rerun", max_steps=6, checkpoint_every=0))
    assert train(student_job(longer, "baseline"), progress=False).step == 6  # raised budget


def test_a_run_stopped_by_its_energy_budget_logs_its_last_step_in_full(workspace: Path
                                                                        ) -> None:
    """The energy budget stops a run between full `train` records (log_every above the step
    cap): the stop step still gets one, with its tokens, rate and energy (before, the last
    interval's figures were lost)."""
    data = experiment(workspace / "budget", max_steps=500, log_every=1000, checkpoint_every=0,
                      energy_budget_j=40.0)
    data["telemetry"]["cpu_watts_per_core"] = 400.0     # labelled estimates: energy on CPU
    result = train(student_job(validate(data), "baseline"), progress=False)
    assert result.status == "budget" and 1 <= result.step < 500
    recs = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text()
            .splitlines()]
    last = [r for r in recs if r["step"] == result.step]
    assert [r["kind"] for r in last] == ["step", "train"]
    assert last[1]["tokens"] == result.tokens and last[1]["tokens_per_s"] > 0
    assert last[1]["energy_j"] >= 40.0


def test_run_json_records_the_fused_loss_path(workspace: Path) -> None:
    data = experiment(workspace / "exp", max_steps=2)
    data["distill"]["fused_kernel"] = "generic"
    job = student_job(validate(data), "response")
    job.run_dir = workspace / "fused-path"
    try:
        assert train(job, progress=False).status == "completed"
    finally:
        fused_path.set_path("auto")   # the process-wide setting must not leak into others
    run = json.loads((job.run_dir / "run.json").read_text())
    assert run["fused_logit_loss"] == {"requested": "generic", "used": {"generic": "generic"}}


def test_body_kernels_train_like_the_plain_body(workspace: Path, caplog) -> None:
    """train.body_kernels=triton (student and online teacher through kernels/body.py; Triton's
    interpreter on CPU) logs the losses of the plain body, step for step."""
    import logging

    curves = {}
    caplog.set_level(logging.INFO, logger="wattkd.body_kernels")
    for how in ("none", "triton"):
        job = student_job(validate(experiment(workspace / "exp", max_steps=2, log_every=1,
                                              micro_batch_size=2, body_kernels=how)),
                          "response")
        job.run_dir = workspace / f"body-{how}"
        assert train(job, progress=False).status == "completed"
        curves[how] = losses(job.run_dir)
    applied = [r.getMessage() for r in caplog.records if r.name == "wattkd.body_kernels"]
    prefix = "body kernels (LlamaForCausalLM): Triton kernels in"
    assert applied == [f"{prefix} 5 RMSNorms and 2 gated MLPs",    # the student (2 blocks)
                       f"{prefix} 7 RMSNorms and 3 gated MLPs"]    # the teacher (3 blocks)
    assert curves["triton"].keys() == curves["none"].keys() == {1, 2}
    for step, loss in curves["none"].items():
        assert curves["triton"][step] == pytest.approx(loss, rel=1e-4)
