"""Render readable sbatch scripts from the templates in `templates/`.

One skeleton (`job.sbatch`: header, environment, helpers for signals, launch and requeue) plus
one body per stage (`<stage>.sh`). The same templates make the scripts `wattkd slurm submit`
writes into the run directory and the plain wrappers in the repository's scripts/ folder.

Safety: config values reach the script only as `NAME=<shlex-quoted value>` assignments (the
bodies are fixed text that uses the variables), so a path or name from YAML cannot run a
command. Values in `#SBATCH` lines, which sbatch reads itself, must be plain (no spaces,
quotes, `$`, `%`, `#` or control characters); anything else is refused with a clear error.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from wattkd.config import ExperimentConfig, SlurmConfig
from wattkd.slurm.graph import RANK_STAGES, STAGES, SlurmError, StageJob, resolve_resources

PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SBATCH_SAFE = re.compile(r"^[A-Za-z0-9._/+=,:@~-]+$")


def template(name: str) -> str:
    return resources.files("wattkd.slurm").joinpath("templates", name).read_text()


def fill(text: str, values: dict[str, str]) -> str:
    """Replace @@NAME@@ placeholders; a missing or unused value is a bug, so it raises."""
    names = set(PLACEHOLDER.findall(text))
    missing, extra = names - set(values), set(values) - names
    if missing or extra:
        raise ValueError(f"template placeholders: missing {sorted(missing)}, unused {sorted(extra)}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def check_text(value: str, what: str) -> str:
    if CONTROL.search(value):
        raise SlurmError(f"{what} {value!r} contains control characters (newline, tab, ...); "
                         "they cannot go into a job script")
    return value


def sbatch_value(value: str, what: str) -> str:
    """A value for an #SBATCH line: sbatch parses these itself, so only plain characters."""
    check_text(value, what)
    if not SBATCH_SAFE.match(value):
        raise SlurmError(f"{what} {value!r} cannot be written in an #SBATCH line: use only "
                         "letters, digits and . _ / + = , : @ ~ - (no spaces, quotes, $, % or #)")
    return value


def assign(name: str, value: str | Path, what: str | None = None) -> str:
    """NAME='value' with the value shell-quoted."""
    return f"{name}={shlex.quote(check_text(str(value), what or name))}"


def assign_array(name: str, values: list[str | Path], what: str) -> str:
    items = [shlex.quote(check_text(str(v), what)) for v in values]
    if len(" ".join(items)) < 80:
        return f"{name}=({' '.join(items)})"
    return f"{name}=(\n" + "".join(f"  {i}\n" for i in items) + ")"


@dataclass
class Target:
    """What differs between a pipeline script and a plain wrapper."""

    mode: Literal["pipeline", "wrapper"]
    log_dir: Path | None = None  # pipeline: absolute log folder
    workdir: Path | None = None  # pipeline: --chdir
    config: Path | None = None   # pipeline: the frozen config copy
    out_dir: Path | None = None  # pipeline: absolute output directory
    job_prefix: str = "wattkd"


def sbatch_lines(job: StageJob, slurm: SlurmConfig, target: Target) -> list[str]:
    r = job.resources
    name = f"{target.job_prefix}-{job.key}"
    pattern = "%x-%A_%a.out" if job.array else "%x-%j.out"  # %j: unique per array task too
    if target.mode == "pipeline":
        assert target.log_dir is not None and target.workdir is not None
        output = f"{sbatch_value(str(target.log_dir), 'log folder')}/{pattern}"
    else:
        output = f"slurm-{pattern}"
    opts: list[tuple[str, str | int | None]] = [
        ("job-name", sbatch_value(name, "job name")),
        ("output", output),
        ("open-mode", "append"),   # a requeued job appends to the same log
    ]
    if target.mode == "pipeline":
        opts.append(("chdir", sbatch_value(str(target.workdir), "working directory")))
        if job.array:
            opts.append(("array", f"0-{job.array - 1}"))
    opts += [
        ("partition", r.partition), ("account", r.account), ("qos", r.qos),
        ("constraint", r.constraint),
        ("nodes", r.nodes or 1),
        ("ntasks-per-node", job.tasks_per_node),
        ("gpus-per-node", r.gpus_per_node or None),
        ("cpus-per-task", r.cpus_per_task), ("mem", r.mem), ("time", r.time),
    ]
    if job.preemptible:
        opts.append(("signal", f"B:USR1@{slurm.signal_seconds}"))
    lines = [f"#SBATCH --{k}={v}" for k, v in opts if v is not None]
    lines.append("#SBATCH --requeue" if slurm.requeue else "#SBATCH --no-requeue")
    lines.append("#SBATCH --kill-on-invalid-dep=yes")  # a failed dependency cancels this job
    return lines


def env_lines(slurm: SlurmConfig, target: Target) -> list[str]:
    lines = [f"module load {shlex.quote(m)}" for m in slurm.modules]
    if slurm.venv:
        act = shlex.quote(check_text(slurm.venv, 'slurm.venv') + '/bin/activate')
        # A venv that cannot be activated must stop the job, not run whatever python is on PATH.
        lines.append(f"source {act} || {{ printf 'error: cannot activate slurm.venv (%s)\\n' "
                     f"{act} >&2; exit 1; }}")
        lines.append("WATTKD=(python -m wattkd.cli)")
    elif target.mode == "pipeline":
        lines.append("# the interpreter that submitted the pipeline")
        lines.append(f"WATTKD=({shlex.quote(check_text(sys.executable, 'python'))} -m wattkd.cli)")
    else:
        lines += ["# WATTKD_VENV=/path/to/venv sbatch ...  activates that virtualenv first",
                  ('if [ -n "${WATTKD_VENV:-}" ]; then source "$WATTKD_VENV/bin/activate" || '
                   '{ printf "error: cannot activate WATTKD_VENV=%s\\n" "$WATTKD_VENV" >&2; '
                   'exit 1; }; fi'),
                  "WATTKD=(python3 -m wattkd.cli)"]
    return lines


def wrapper_name(job: StageJob) -> str:
    """File name of a plain wrapper: one per stage, one per method for training."""
    return f"{job.key}.sbatch"


def wrapper_usage(job: StageJob) -> str:
    if job.stage == "train":
        return f"sbatch --array=0-4 {wrapper_name(job)} CONFIG   (task k = repeat k)"
    if job.stage in ("eval", "ept"):
        return (f"sbatch --array=0-4 {wrapper_name(job)} CONFIG METHOD   "
                "(METHOD teacher: without --array)")
    return f"sbatch {wrapper_name(job)} CONFIG"


def var_lines(job: StageJob, cfg: ExperimentConfig, target: Target) -> list[str]:
    gpus = job.resources.gpus_per_node or 0
    common = [f"GPUS_PER_NODE={gpus}", f"REQUEUE_ON_PREEMPT={int(cfg.slurm.requeue)}"]
    if job.stage in RANK_STAGES:
        tel = cfg.telemetry
        common += [f"NODE_SAMPLERS={int(tel.enabled)}   # telemetry.enabled",
                   (f"MONITOR_ARGS=(--interval {tel.interval_s:g} "
                    f"--slow-interval {tel.slow_interval_s:g})")]
    takes_method = job.stage in ("train", "eval", "ept")
    if target.mode == "pipeline":
        assert target.config is not None and target.out_dir is not None
        lines = [assign("CONFIG", target.config, "config path"),
                 assign("OUT_DIR", target.out_dir, "output_dir")]
        if takes_method:
            lines.append(assign("METHOD", job.method or "", "method"))
        if job.stage == "report":
            lines.append(assign_array("RUN_DIRS", [target.out_dir / p.relative_to(cfg.out)
                                                   for p in job.run_dirs], "run directory"))
        return lines + common
    usage = shlex.quote(f"usage: {wrapper_usage(job)}")
    lines = [f"CONFIG=${{1:?{usage}}}"]
    if job.method:
        lines.append(assign("METHOD", job.method, "method"))
    elif takes_method:
        lines.append(f"METHOD=${{2:?{usage}}}")
    lines.append('OUT_DIR=$("${WATTKD[0]}" -c \'import sys; from wattkd.config import load; '
                 'print(load(sys.argv[1]).out)\' "$CONFIG") || exit 2')
    if job.stage == "report":
        lines.append('RUN_DIRS=("$OUT_DIR"/*/rep*)')
    return lines + common


PREEMPTION_NOTE = """\
#
# Preemption (docs/slurm.md): Slurm sends USR1 to this batch shell before the time limit
# (--signal=B:USR1@<s>), or you send it by hand: scancel --signal=USR1 --batch <jobid>. The trap
# below forwards it to the running step (srun passes it to every task); the trainer saves a
# checkpoint and exits 75, and this script requeues the job (scontrol requeue). The next start
# resumes from that checkpoint (--resume auto). Dependent jobs wait: the job never failed."""


def about_lines(job: StageJob, cfg: ExperimentConfig, target: Target) -> list[str]:
    if target.mode == "pipeline":
        deps = ", ".join(f"{d.kind}:{d.key}" for d in job.deps) or "none"
        lines = [f"# experiment {cfg.name}: {job.title}",
                 "# written by `wattkd slurm submit`, which passes the dependencies to sbatch:",
                 f"#   {deps}"]
    else:
        lines = [f"# {job.title.split(',')[0]}",
                 f"# usage: {wrapper_usage(job)}",
                 "# Generated by scripts/generate.py from src/wattkd/slurm/templates; edit the",
                 "# resources freely. `wattkd slurm submit CONFIG` writes and chains these for a",
                 "# whole experiment."]
    if job.preemptible:
        lines += PREEMPTION_NOTE.splitlines()
    return lines


def render(job: StageJob, cfg: ExperimentConfig, target: Target) -> str:
    """The full sbatch script for one job."""
    body = template(f"{job.stage}.sh").rstrip("\n")
    text = fill(template("job.sbatch"), {
        "TITLE": job.key,
        "ABOUT": "\n".join(about_lines(job, cfg, target)),
        "SBATCH": "\n".join(sbatch_lines(job, cfg.slurm, target)),
        "ENV": "\n".join(env_lines(cfg.slurm, target)),
        "VARS": "\n".join(var_lines(job, cfg, target)),
        "BODY": body,
    })
    return text


WRAPPER_TITLES = {
    "shards": "build token shards",
    "teacher_pretrain": "pretrain the teacher (tiny demo teachers built from config)",
    "teacher_finetune": "fine-tune the pretrained teacher on the training shards",
    "teacher_cache": "cache the teacher's signals for every student",
    "eval": "evaluate a model: lm-eval suite + held-out perplexity",
    "ept": "inference energy per token of a model",
    "report": "report: tables, plots, report.html",
}


def wrapper_scripts(cfg: ExperimentConfig) -> dict[str, str]:
    """Plain sbatch wrappers (file name -> text): one per stage, one per method for training.

    Resources come from `cfg.slurm` as for `wattkd slurm submit`; the config path (and the
    method for eval/ept) are arguments, so one set of wrappers serves any config.
    """
    jobs: list[StageJob] = []
    for stage in STAGES:
        if stage == "train":
            jobs += [StageJob(key=f"train-{m.name}", stage="train", method=m.name,
                              title=f"train {m.name} ({m.method} KD)" if m.needs_teacher else
                              f"train {m.name} (no KD)",
                              resources=resolve_resources(cfg.slurm, "train", m.name))
                     for m in cfg.distill.methods]
        else:
            jobs.append(StageJob(key=stage, stage=stage, method=None,
                                 title=WRAPPER_TITLES[stage],
                                 resources=resolve_resources(cfg.slurm, stage)))
    target = Target(mode="wrapper")
    return {wrapper_name(j): render(j, cfg, target) for j in jobs}
