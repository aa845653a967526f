"""Slurm scripts and graph without a cluster: resources, dependencies, quoting, dry run,
the plain wrappers in scripts/slurm, and the status parsers on Slurm's own output format."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from wattkd.config import ConfigError, load, validate
from wattkd.jobs import experiment_stages
from wattkd.pipeline import stages as pipeline_stages
from wattkd.slurm import SlurmError, build_graph, plan, submit_pipeline
from wattkd.slurm.status import expand_tasks, states_from_lines

REPO = Path(__file__).resolve().parents[1]
LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}
CLUSTER: dict[str, Any] = {
    "name": "cl", "output_dir": "runs/cl",
    "teacher": {"model": "/models/teacher"}, "student": {"build": LLAMA},
    "distill": {"teacher_signals": "cache", "methods": [
        {"name": "response", "method": "response", "losses": [{"name": "forward_kl"}]},
        {"name": "feature", "method": "feature", "layer_map": [[1, 2]],
         "losses": [{"name": "hidden_mse"}]},
        {"name": "baseline", "method": "none", "losses": [{"name": "ce"}]}]},
    "train": {"repeats": 3},
    "slurm": {
        "defaults": {"partition": "gpu", "account": "proj42", "qos": "high",
                     "constraint": "h100&ib", "nodes": 2, "gpus_per_node": 4,
                     "cpus_per_task": 8, "mem": "200G", "time": "1-00:00:00"},
        "stages": {"shards": {"partition": "cpu", "cpus_per_task": 16, "time": "04:00:00"},
                   "eval": {"time": "03:00:00"}, "train.feature": {"mem": "400G"}},
        "signal_seconds": 600, "modules": ["cuda/12.4"]},
}


def config(**changes: Any) -> Any:
    data = copy.deepcopy(CLUSTER)
    for key, value in changes.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return validate(data)


def sbatch_opts(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.MULTILINE))


def graph_deps(cfg: Any) -> dict[str, list[str]]:
    return {j.key: [f"{d.kind}:{d.key}" for d in j.deps] for j in build_graph(cfg)}


def test_scripts_carry_resources_and_pass_bash_n(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _, scripts = plan(config())
    for key, text in scripts.items():
        path = tmp_path / f"{key}.sbatch"
        path.write_text(text)
        res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True,
                             check=False)
        assert res.returncode == 0, (key, res.stderr)
    shards = sbatch_opts(scripts["shards"])
    assert shards["partition"] == "cpu" and shards["cpus-per-task"] == "16"
    assert shards["time"] == "04:00:00" and shards["nodes"] == "1"
    assert shards["account"] == "proj42" and shards["qos"] == "high"
    assert "gpus-per-node" not in shards and "signal" not in shards
    train = sbatch_opts(scripts["train-response"])
    assert train == {**train, "partition": "gpu", "nodes": "2", "ntasks-per-node": "4",
                     "gpus-per-node": "4", "cpus-per-task": "8", "mem": "200G",
                     "time": "1-00:00:00", "constraint": "h100&ib", "array": "0-2",
                     "signal": "B:USR1@600", "kill-on-invalid-dep": "yes",
                     "open-mode": "append", "chdir": str(tmp_path)}
    assert "requeue" in train
    assert sbatch_opts(scripts["train-feature"])["mem"] == "400G"
    ev = sbatch_opts(scripts["eval-response"])
    assert ev["nodes"] == "1" and ev["ntasks-per-node"] == "1" and ev["gpus-per-node"] == "4"
    assert ev["time"] == "03:00:00" and "signal" not in ev
    assert "gpus-per-node" not in sbatch_opts(scripts["report"])
    assert "module load cuda/12.4" in scripts["train-response"]
    assert "GPUS_PER_NODE=4" in scripts["train-response"]
    assert f"CONFIG={tmp_path}/runs/cl/slurm/config.yaml" in scripts["train-response"]


def test_dependency_graph_waits_only_for_what_each_stage_reads() -> None:
    deps = graph_deps(config())
    assert deps["shards"] == []
    assert deps["teacher_cache"] == ["afterok:shards"]
    assert deps["train-response"] == ["afterok:shards", "afterok:teacher_cache"]
    assert deps["train-baseline"] == ["afterok:shards"]        # no teacher, no cache
    assert deps["eval-response"] == ["aftercorr:train-response"]   # task k waits for task k
    assert deps["ept-feature"] == ["aftercorr:train-feature"]
    assert deps["eval-teacher"] == ["afterok:shards"]
    assert sorted(deps["report"]) == sorted(
        f"afterok:{s}-{m}" for s in ("eval", "ept")
        for m in ("response", "feature", "baseline", "teacher"))
    # online teacher pretrained here: no cache, everything that needs the teacher waits for it
    pre = graph_deps(config(**{"teacher": {"build": LLAMA, "pretrain": {"max_steps": 5}},
                               "distill.teacher_signals": "online"}))
    assert "teacher_cache" not in pre
    assert pre["teacher_pretrain"] == ["afterok:shards"]
    assert pre["train-response"] == ["afterok:shards", "afterok:teacher_pretrain"]
    assert pre["train-baseline"] == ["afterok:shards"]
    assert pre["eval-teacher"] == ["afterok:shards", "afterok:teacher_pretrain"]
    # a subset drops the dependencies on stages left out
    only = {j.key: j.deps for j in build_graph(config(), only={"train", "eval"})}
    assert only["train-response"] == [] and set(only) == {
        "train-response", "train-feature", "train-baseline", "eval-response", "eval-feature",
        "eval-baseline", "eval-teacher"}


def test_teacher_finetune_stage_is_a_preemptible_rank_job_everything_waits_for(
        tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = config(**{"teacher.finetune": {"max_steps": 50, "lora": {"r": 8}},
                    "student": {"from_teacher_layers": [0, 1]}})
    deps = graph_deps(cfg)
    ready = ["afterok:shards", "afterok:teacher_finetune"]
    assert deps["teacher_finetune"] == ["afterok:shards"]
    assert deps["teacher_cache"] == ready                  # the cache of the adapted teacher
    assert deps["train-response"] == [*ready, "afterok:teacher_cache"]
    assert deps["train-baseline"] == ready                 # initialised from its layers
    assert deps["eval-teacher"] == ready
    _, scripts = plan(cfg)
    text = scripts["teacher_finetune"]
    assert "teacher finetune \"$CONFIG\" --resume auto" in text
    assert 'start_node_samplers "$OUT_DIR/teacher/telemetry"' in text
    opts = sbatch_opts(text)
    assert opts["signal"] == "B:USR1@600" and "requeue" in opts
    assert opts["ntasks-per-node"] == "4" and opts["nodes"] == "2"
    path = tmp_path / "ft.sbatch"
    path.write_text(text)
    assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0
    # without the section there is no such job
    assert "teacher_finetune" not in graph_deps(config())


def test_dry_run_prints_scripts_and_graph_and_touches_nothing(tmp_path, monkeypatch,
                                                              capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))   # no sbatch: nothing may be called
    result = submit_pipeline(config(), config_path=tmp_path / "x.yaml", dry_run=True)
    shown = capsys.readouterr().out
    assert not (tmp_path / "runs").exists()
    assert shown.count("#!/bin/bash") == len(result["scripts"]) == 14
    assert f"==> {tmp_path}/runs/cl/slurm/train-response.sbatch <==" in shown
    assert "train-response [0-2]" in shown
    assert re.search(r"eval-response \[0-2\]\s+<- aftercorr:train-response", shown)
    assert result["graph"] in shown and result["jobs"] == []


def test_submit_without_sbatch_is_one_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    with pytest.raises(SlurmError, match="sbatch not found on PATH"):
        submit_pipeline(config(), config_path=tmp_path / "x.yaml", dry_run=False)
    assert not (tmp_path / "runs").exists()


EVIL = "/opt/x $(touch PWNED) `touch PWNED2`; it's \"quoted\" && touch PWNED3"


def test_config_values_are_quoted_not_executed(tmp_path, monkeypatch) -> None:
    """Run the script's environment and variable sections in bash: values survive literally
    and nothing they spell out is executed."""
    monkeypatch.chdir(tmp_path)
    _, scripts = plan(config(**{"slurm.venv": EVIL}))
    text = scripts["train-response"]
    head = text.split("# ---- helpers")[0].replace("module load", ": module load")
    # The failing `source` stops the job (test below); here `exit` is shadowed so the probe
    # goes on to print the variables.
    probe = ("exit() { :; }\n" + head +
             'printf "%s\\n" "$CONFIG" "$OUT_DIR" "$METHOD" "${WATTKD[0]}"\n')
    res = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                         check=False)
    assert res.stdout.splitlines() == [f"{tmp_path}/runs/cl/slurm/config.yaml",
                                       f"{tmp_path}/runs/cl", "response", "python"]
    assert f"{EVIL}/bin/activate: No such file" in res.stderr
    assert not list(tmp_path.glob("PWNED*"))


def test_a_venv_that_cannot_be_activated_stops_the_job(tmp_path, monkeypatch) -> None:
    """Generated script and plain wrapper: a failing `source` exits 1 with an error line
    instead of running on with whatever python is on PATH."""
    monkeypatch.chdir(tmp_path)
    _, scripts = plan(config(**{"slurm.venv": str(tmp_path / "no-venv")}))
    head = scripts["train-response"].split("# ---- helpers")[0].replace("module load",
                                                                         ": module load")
    res = subprocess.run(["bash", "-c", head + "echo CARRIED_ON\n"], capture_output=True,
                         text=True, cwd=tmp_path, check=False)
    assert res.returncode == 1 and "CARRIED_ON" not in res.stdout
    assert f"error: cannot activate slurm.venv ({tmp_path}/no-venv/bin/activate)" in res.stderr
    wrapper = (REPO / "scripts/slurm/train-response.sbatch").read_text()
    head = wrapper.split("# ---- helpers")[0].replace("module load", ": module load")
    res = subprocess.run(["bash", "-c", head + "echo CARRIED_ON\n"], capture_output=True,
                         text=True, cwd=tmp_path, check=False,
                         env={"PATH": "/usr/bin:/bin", "WATTKD_VENV": str(tmp_path / "nv")})
    assert res.returncode == 1 and "CARRIED_ON" not in res.stdout
    assert f"error: cannot activate WATTKD_VENV={tmp_path}/nv" in res.stderr


@pytest.mark.parametrize("change, match", [
    ({"output_dir": "runs/a b"}, "cannot be written in an #SBATCH line"),
    ({"output_dir": "runs/$(reboot)"}, "cannot be written in an #SBATCH line"),
    ({"slurm.venv": "/opt/v\nreboot"}, "control characters"),
])
def test_unsafe_values_are_refused_before_anything_is_written(tmp_path, monkeypatch, change,
                                                              match) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SlurmError, match=match):
        plan(config(**change))


@pytest.mark.parametrize("change", [{"name": "x; rm -rf ~"}, {"name": "a\nb"},
                                    {"slurm.defaults.partition": "gpu;reboot"},
                                    {"slurm.modules": ["cuda; reboot"]}])
def test_names_and_resources_from_yaml_are_validated(change) -> None:
    with pytest.raises(ConfigError):
        config(**change)


@pytest.mark.parametrize("change, match", [
    ({"slurm.stages": {"trian": {"mem": "1G"}}}, r"slurm.stages.trian: unknown stage 'trian'"),
    ({"slurm.stages": {"train.nope": {"mem": "1G"}}}, r"train.<method>"),
    ({"slurm.signal_seconds": 3600, "slurm.defaults.time": "00:30:00"},
     r"signal_seconds=3600 is not shorter than the teacher_pretrain|train time limit"),
])
def test_bad_slurm_settings_are_one_clear_error(change, match) -> None:
    with pytest.raises(SlurmError, match=match):
        build_graph(config(**change))


def test_method_named_like_an_output_folder_is_refused() -> None:
    """Refused when the config is loaded, before any script is written."""
    methods = [{"name": "report", "method": "none", "losses": [{"name": "ce"}]}]
    with pytest.raises(ConfigError, match="reserved"):
        config(**{"distill.methods": methods, "slurm.stages": {}})


def test_plain_wrappers_are_generated_from_the_templates() -> None:
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "generate.py"), "--check"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    wrappers = sorted(p.name for p in (REPO / "scripts" / "slurm").glob("*.sbatch"))
    assert wrappers == sorted(["shards.sbatch", "teacher_pretrain.sbatch",
                               "teacher_finetune.sbatch", "teacher_cache.sbatch", "train-response.sbatch",
                               "train-feature.sbatch", "train-relation.sbatch",
                               "train-baseline.sbatch", "eval.sbatch", "ept.sbatch",
                               "report.sbatch"])
    for name in wrappers:
        path = REPO / "scripts" / "slurm" / name
        assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0, name
    # without arguments a wrapper stops at once with its usage line
    res = subprocess.run(["bash", str(REPO / "scripts/slurm/eval.sbatch")], capture_output=True,
                         text=True, check=False)
    assert res.returncode != 0 and "usage: sbatch --array=0-4 eval.sbatch CONFIG METHOD" \
        in res.stderr


# Lines as `scontrol show job -o` and jobcomp/filetxt (22.05) print them, shortened.
SCONTROL = [
    ("JobId=12 ArrayJobId=12 ArrayTaskId=2-4%2 JobName=wattkd-x-train-a UserId=root(0) "
     "JobState=PENDING Reason=JobArrayTaskLimit Dependency=(null) Requeue=1 Restarts=0 "
     "BatchFlag=1 Reboot=0 ExitCode=0:0"),
    ("JobId=13 ArrayJobId=12 ArrayTaskId=0 JobName=wattkd-x-train-a JobState=RUNNING "
     "Reason=None Requeue=1 Restarts=1 ExitCode=0:0"),
    ("JobId=14 ArrayJobId=12 ArrayTaskId=1 JobName=wattkd-x-train-a JobState=FAILED "
     "Reason=NonZeroExitCode Restarts=0 ExitCode=1:0"),
]
JOBCOMP = [
    ("JobId=5 UserId=root(0) GroupId=root(0) Name=wattkd-x-train JobState=PENDING "
     "Partition=debug TimeLimit=20 DerivedExitCode=75:0 ExitCode=0:0"),
    ("JobId=5 UserId=root(0) GroupId=root(0) Name=wattkd-x-train JobState=COMPLETED "
     "Partition=debug TimeLimit=20 DerivedExitCode=75:0 ExitCode=0:0"),
    "JobId=7 Name=wattkd-x-eval JobState=CANCELLED ArrayJobId=6 ArrayTaskId=1 ExitCode=0:0",
]


def test_status_parsers_read_slurm_output() -> None:
    assert expand_tasks("2-4%2") == ["2", "3", "4"]
    assert expand_tasks("0,3-5:2") == ["0", "3", "5"]
    got = states_from_lines(SCONTROL, "scontrol")["12"]
    assert {t: (s.state, s.restarts) for t, s in got.items()} == {
        "0": ("RUNNING", 1), "1": ("FAILED", 0), "2": ("PENDING", 0), "3": ("PENDING", 0),
        "4": ("PENDING", 0)}
    assert got["2"].reason == "JobArrayTaskLimit" and got["0"].reason is None
    assert got["1"].exit_code == "1:0" and got["1"].job_id == "14"
    comp = states_from_lines(JOBCOMP, "jobcomp")
    assert comp["5"]["-"].state == "COMPLETED"     # the requeue line is superseded
    assert comp["6"]["1"].state == "CANCELLED" and comp["6"]["1"].job_id == "7"


@pytest.mark.parametrize("config", ["demo.yaml", "gemma-270m/study.yaml",
                                    "llama-3.1-70b-8b/study.yaml"])
def test_pipeline_and_slurm_graph_run_the_same_stages(config: str) -> None:
    """One stage list: `wattkd pipeline` and `wattkd slurm submit` run the same stages in the
    same order (teacher pretrain in the demo, fine-tune in the Gemma study, cache for Llama)."""
    cfg = load(Path(__file__).resolve().parents[1] / "configs" / config)

    def kinds(names: list[str]) -> list[str]:
        out: list[str] = []
        for n in names:
            if n not in out:
                out.append(n)
        return out

    local = kinds([s.name.split(" ")[0] if s.name.split(" ")[0] in ("train", "eval", "ept")
                   else s.name.replace(" ", "_") for s in pipeline_stages(cfg)])
    slurm = kinds([j.stage for j in build_graph(cfg)])
    assert local == slurm == experiment_stages(cfg)
