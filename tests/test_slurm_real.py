"""The Slurm workflow against a real single-node Slurm (tests/slurm_cluster.py starts it).

Tiny experiments (bundled tokenizer, seq_len 64, hidden-32 llama, a few dozen steps) go through
`submit_pipeline` and real sbatch/srun/scontrol: the whole pipeline with an array of 2 repeats
down to its report, a failed dependency, USR1 preemption with checkpoint + requeue + exact
resume, and a two-rank launch through srun.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from wattkd.config import load
from wattkd.slurm import SlurmError, collect_status, plan, submit_pipeline
from wattkd.slurm.status import jobcomp_file, states_from_lines

pytest_plugins = ["slurm_cluster"]
pytestmark = pytest.mark.slurm

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
         "max_position_embeddings": 64, "tie_word_embeddings": True}
STEPS = 30


def tiny(name: str, out: Path, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": name, "output_dir": str(out),
        "data": {"tokenizer": "bundled:bpe-4096", "seq_len": 64, "total_tokens": 30000},
        "teacher": {"build": LLAMA, "pretrain": {"max_steps": 5, "micro_batch_size": 4}},
        "student": {"build": LLAMA},
        "distill": {"methods": [{"name": "baseline", "method": "none",
                                 "losses": [{"name": "ce"}]}]},
        "train": {"max_steps": STEPS, "micro_batch_size": 4, "log_every": 10,
                  "checkpoint_every": 0, "tensorboard": False, "repeats": 2},
        "telemetry": {"idle_seconds": 0},
        "eval": {"suite": None, "perplexity_tokens": 512, "batch_size": 4,
                 "ept": {"num_prompts": 2, "prompt_tokens": 16, "max_new_tokens": 4,
                         "batch_sizes": [1], "warmup_batches": 0}},
        "slurm": {"defaults": {"nodes": 1, "cpus_per_task": 1, "mem": "1500M",
                               "time": "00:20:00"},
                  "signal_seconds": 60},
    }
    for key, value in extra.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def submit(tmp: Path, data: dict[str, Any], only: set[str] | None) -> dict[str, Any]:
    path = tmp / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        return submit_pipeline(load(path), config_path=path, dry_run=False, only=only)
    finally:
        os.chdir(cwd)


def wait_done(out: Path, timeout: float, cluster: Any) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = collect_status(out)
        if all(r["state"] in TERMINAL for r in rows):
            return rows
        time.sleep(0.5)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((out / "slurm/logs").glob("*.out")))
    pytest.fail(f"jobs not done after {timeout} s: {rows}\n{logs}\n{cluster.log_tail()}")


def last_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") in ("step", "train") and "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def fake_venv(root: Path) -> Path:
    """A 'virtualenv' whose path is full of shell syntax; activate leaves a marker."""
    venv = root / "venv $(touch PWNED) `touch PWNED2`; it's"
    (venv / "bin").mkdir(parents=True)
    activate = venv / "bin" / "activate"
    activate.write_text(
        f'export PATH={Path(sys.executable).parent}:"$PATH"\n'
        'touch "$(dirname "${BASH_SOURCE[0]}")/../activated-$SLURM_JOB_ID"\n')
    activate.chmod(activate.stat().st_mode | stat.S_IXUSR)
    return venv


@pytest.fixture(scope="module")
def work() -> Path:
    """Our own temp root: jobs outlive a test, and pytest's basetemp rotation (other sessions
    on this machine) must not delete their folders under them."""
    root = Path(tempfile.mkdtemp(prefix="wattkd-slurm-test-"))
    yield root
    if os.environ.get("WATTKD_KEEP_SLURM") != "1":
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tmp(work, request) -> Path:
    path = work / request.node.name
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def broken(slurm_cluster, work) -> Path:
    """A pipeline whose shards job fails (its source does not exist); submitted first so it
    runs beside the others."""
    tmp = work / "broken"
    tmp.mkdir()
    out = tmp / "runs" / "broken"
    data = tiny("broken", out, **{"data.sources": [
        {"path": str(tmp / "missing" / "*.txt"), "kind": "text"}]})
    submit(tmp, data, only={"shards", "train"})
    return out


@pytest.fixture(scope="module")
def chain(slurm_cluster, work, broken) -> dict[str, Any]:
    """The whole tiny pipeline (training: an array of 2 repeats; the teacher pretrained with
    two ranks), submitted for real and run to the end."""
    tmp = work / "chain"
    tmp.mkdir()
    venv = fake_venv(tmp)
    out = tmp / "runs" / "chain"
    data = tiny("chain", out, **{"slurm.venv": str(venv),
                                 "slurm.stages": {"teacher_pretrain": {"gpus_per_node": 2}}})
    result = submit(tmp, data, None)
    rows = wait_done(out, 600, slurm_cluster)
    return {"tmp": tmp, "out": out, "rows": rows, "result": result, "venv": venv}


def test_pipeline_with_array_of_repeats_runs(chain, monkeypatch) -> None:
    rows, out = chain["rows"], chain["out"]
    logs = {p.name: p.read_text()[-1500:] for p in (out / "slurm/logs").glob("*.out")}
    assert all(r["state"] == "COMPLETED" and r["exit_code"] == "0:0" for r in rows), (rows, logs)
    assert [(r["key"], r["task"]) for r in rows if r["stage"] == "train"] == [
        ("train-baseline", 0), ("train-baseline", 1)]
    for rep in (0, 1):
        run = json.loads((out / "baseline" / f"rep{rep}" / "run.json").read_text())
        assert run["status"] == "completed" and run["step"] == STEPS
        assert run["slurm"]["SLURM_ARRAY_TASK_ID"] == str(rep)
    # the two repeats are different seeds, so different students
    assert last_losses(out / "baseline/rep0")[STEPS] != last_losses(out / "baseline/rep1")[STEPS]
    jobs = {j["key"]: j for j in json.loads((out / "slurm" / "jobs.json").read_text())["jobs"]}
    shards_id = jobs["shards"]["job_id"]
    assert jobs["train-baseline"]["depends_on"] == [{"kind": "afterok", "key": "shards",
                                                    "job_id": shards_id}]
    assert f"--dependency=afterok:{shards_id}" in jobs["train-baseline"]["sbatch"]
    monkeypatch.setenv("COLUMNS", "200")
    shown = subprocess.run([sys.executable, "-m", "wattkd.cli", "slurm", "status", str(out)],
                           capture_output=True, text=True, check=True).stdout
    assert f"{jobs['train-baseline']['job_id']}_1" in shown
    assert f"{len(rows)} completed" in shown and f"run completed step {STEPS}" in shown
    # clusters without accounting: the job-completion log tells the same story as scontrol
    comp = states_from_lines(jobcomp_file().read_text().splitlines(), "jobcomp")
    for row in rows:
        task = "-" if row["task"] is None else str(row["task"])
        assert comp[row["job_id"]][task].state == row["state"]
        assert comp[row["job_id"]][task].exit_code == row["exit_code"]


def test_full_tiny_pipeline_produces_report(chain) -> None:
    out, rows = chain["out"], chain["rows"]
    assert {r["key"] for r in rows} == {
        "shards", "teacher_pretrain", "train-baseline", "eval-baseline", "ept-baseline",
        "eval-teacher", "ept-teacher", "report"}
    for run in ("baseline/rep0", "baseline/rep1", "teacher"):
        assert (out / run / "eval" / "perplexity.json").exists(), run
        assert (out / run / "ept.json").exists(), run
    assert (out / "report" / "report.html").exists()
    assert (out / "report" / "report.md").exists()


def test_config_paths_cannot_inject_commands(chain) -> None:
    """slurm.venv full of $(...), backticks, ; and quotes is sourced as a literal path."""
    tmp, venv = chain["tmp"], chain["venv"]
    runs = sum(int(j["array"].split("-")[1]) + 1 if j["array"] else 1
               for j in chain["result"]["jobs"])
    assert len(list(venv.glob("activated-*"))) == runs
    assert not list(tmp.rglob("PWNED*"))
    assert not list(Path.cwd().glob("PWNED*"))


def test_failed_dependency_cancels_dependants(slurm_cluster, broken) -> None:
    out = broken
    rows = wait_done(out, 300, slurm_cluster)
    states = {(r["key"], r["task"]): r for r in rows}
    assert states[("shards", None)]["state"] == "FAILED"
    assert states[("shards", None)]["exit_code"] != "0:0"
    assert "missing" in Path(states[("shards", None)]["log"]).read_text()
    for task in (0, 1):
        row = states[("train-baseline", task)]
        assert row["state"] == "CANCELLED", row
    assert not (out / "baseline").exists()


def test_usr1_checkpoints_requeues_and_resumes_exactly(slurm_cluster, chain, tmp) -> None:
    """Task 0 gets USR1 on its batch shell (the trap forwards it), task 1 on its step; both
    checkpoint, exit 75, requeue, resume and end with the uninterrupted runs' losses."""
    out = tmp / "runs" / "preempt"
    data = tiny("preempt", out, **{"data.shards_dir": str(chain["out"] / "shards")})
    result = submit(tmp, data, only={"train"})
    array_id = result["jobs"][0]["job_id"]
    with pytest.raises(SlurmError, match=f"jobs {array_id} of an earlier submission are still"):
        submit(tmp, data, only={"train"})
    how = {0: ["--batch"], 1: []}
    sent: set[int] = set()
    deadline = time.monotonic() + 300
    while len(sent) < 2 and time.monotonic() < deadline:
        for rep in set(how) - sent:
            metrics = out / "baseline" / f"rep{rep}" / "metrics.jsonl"
            if metrics.exists() and metrics.read_text().strip():
                slurm_cluster.run("scancel", "--signal=USR1", *how[rep], f"{array_id}_{rep}")
                sent.add(rep)
        time.sleep(0.05)
    assert sent == {0, 1}, "training never started"
    rows = wait_done(out, 300, slurm_cluster)
    logs = {p.name: p.read_text() for p in (out / "slurm" / "logs").glob("*.out")}
    for row in rows:
        rep = row["task"]
        log = next(t for n, t in logs.items() if n.endswith(f"_{rep}.out"))
        assert row["state"] == "COMPLETED" and row["restarts"] == 1, (row, log)
        assert "requeueing job" in log and "start 2" in log, log
        if rep == 0:
            assert "USR1 received: forwarding" in log
        run_dir = out / "baseline" / f"rep{rep}"
        run = json.loads((run_dir / "run.json").read_text())
        assert run["status"] == "completed" and run["step"] == STEPS
        assert run["resumed_from"], "the second start did not resume from a checkpoint"
        resumed, straight = last_losses(run_dir), last_losses(chain["out"] / f"baseline/rep{rep}")
        assert resumed == straight   # every step, the final one included
        assert resumed[STEPS] == straight[STEPS]


def test_two_ranks_per_node_launch_through_srun(chain) -> None:
    """teacher_pretrain with gpus_per_node: 2 ran as two srun tasks that met through the
    env:// rendezvous built from SLURM_* variables (the test cluster's "GPUs" stand in; the
    ranks compute on the CPU)."""
    out = chain["out"]
    assert "#SBATCH --gpus-per-node=2" in chain["result"]["scripts"]["teacher_pretrain"]
    log = next((out / "slurm" / "logs").glob("*teacher_pretrain*.out")).read_text()
    assert "launching 2 ranks (1 node(s) x 2)" in log
    run = json.loads((out / "teacher" / "run.json").read_text())
    assert run["status"] == "completed" and run["world_size"] == 2, log


def test_node_sampler_step_runs_beside_the_work_and_stops_cleanly(slurm_cluster, tmp) -> None:
    """The per-node telemetry sampler of multi-node jobs, on the one node we have: the
    script's own `sampler_step` runs `wattkd monitor` as an overlapping step beside another
    step, and `stop_node_samplers` ends it cleanly (header ... footer)."""
    out = tmp / "runs" / "sampler"
    path = tmp / "sampler.yaml"
    path.write_text(yaml.safe_dump(tiny("sampler", out, **{"train.repeats": 1})))
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        _, scripts = plan(load(path), only={"train"})
    finally:
        os.chdir(cwd)
    head = scripts["train-baseline"].split("# ---- the stage")[0]
    body = ('sampler_step "$OUT_DIR/telemetry" --nodes=1\n'
            'run_step srun --ntasks=1 --cpus-per-task=1 sleep 4\n'
            "stop_node_samplers\nfinish $?\n")
    script = tmp / "sampler.sbatch"
    script.write_text(head + body)
    (out / "slurm" / "logs").mkdir(parents=True)
    slurm_cluster.run("sbatch", "--wait", str(script), timeout=300)
    files = list((out / "telemetry").glob("*.jsonl"))
    log = "".join(p.read_text() for p in (out / "slurm" / "logs").glob("*.out"))
    assert len(files) == 1, log
    lines = [json.loads(x) for x in files[0].read_text().splitlines()]
    assert lines[0]["type"] == "header" and lines[-1]["type"] == "footer", log
    assert any(x["type"] == "sample" for x in lines)


def test_teacher_finetune_stage_runs_under_slurm(slurm_cluster, chain, tmp) -> None:
    """`teacher_finetune` as a real job: a saved 'pretrained' teacher adapted on the chain's
    shards, its final/ written where the later stages look for the teacher."""
    from wattkd.data.tokenizer import load_tokenizer
    from wattkd.models import build_from_config

    base = tmp / "base"
    tok = load_tokenizer("bundled:bpe-4096")
    build_from_config(LLAMA, len(tok), seed=0).save_pretrained(base)
    tok.save_pretrained(base)
    out = tmp / "runs" / "ft"
    data = tiny("ft", out, **{"data.shards_dir": str(chain["out"] / "shards"),
                              "teacher": {"model": str(base),
                                          "finetune": {"max_steps": 6, "micro_batch_size": 4}}})
    submit(tmp, data, only={"teacher_finetune"})
    rows = wait_done(out, 300, slurm_cluster)
    logs = "".join(p.read_text()[-2000:] for p in (out / "slurm" / "logs").glob("*.out"))
    assert [r["state"] for r in rows] == ["COMPLETED"], (rows, logs)
    run = json.loads((out / "teacher" / "run.json").read_text())
    assert run["role"] == "teacher_finetune" and run["status"] == "completed", logs
    assert run["step"] == 6 and (out / "teacher" / "final" / "config.json").exists()
