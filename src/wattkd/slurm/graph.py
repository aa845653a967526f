"""The experiment as a graph of Slurm jobs: which stages, in which order, on what resources.

Mirrors `wattkd.pipeline.stages` (the local runner) so a cluster run and a laptop run do the
same work: shards -> teacher pretrain (only with teacher.pretrain) or finetune (only with
teacher.finetune) -> teacher cache (only with teacher_signals: cache) -> one training array per
method (task k = repeat k) -> eval and EPT per run -> report. A job waits only for what it reads: the baseline needs no teacher, eval task
k waits for training task k alone (`aftercorr`), the report waits for everything (`afterok`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from wattkd.config import RESERVED_METHOD_NAMES, ExperimentConfig, SlurmConfig, SlurmResources
from wattkd.errors import InputError
from wattkd.jobs import STAGES, experiment_stages, teacher_path

# Stages that run one task per GPU and may span nodes; the others run one task on one node.
RANK_STAGES = frozenset({"teacher_pretrain", "teacher_finetune", "train"})
# Stages that never use a GPU: slurm.defaults.gpus_per_node does not apply to them.
CPU_STAGES = frozenset({"shards", "report"})
# Stages whose step saves a checkpoint on USR1 and exits 75: they get --signal and a requeue.
PREEMPTIBLE = frozenset({"teacher_pretrain", "teacher_finetune", "train"})


class SlurmError(InputError, RuntimeError):
    """A Slurm submission or status problem, with what to do about it."""


@dataclass(frozen=True)
class Dep:
    kind: Literal["afterok", "aftercorr"]
    key: str


@dataclass
class StageJob:
    """One sbatch submission (an array when `array` is set: one task per repeat)."""

    key: str                      # unique, e.g. "train-response"; used in file and job names
    stage: str                    # one of STAGES
    method: str | None            # train/eval/ept: the method (or "teacher" for eval/ept)
    title: str
    resources: SlurmResources
    deps: list[Dep] = field(default_factory=list)
    array: int | None = None      # number of array tasks (repeats)
    run_dirs: list[Path] = field(default_factory=list)   # report: the student runs

    @property
    def preemptible(self) -> bool:
        return self.stage in PREEMPTIBLE

    @property
    def tasks_per_node(self) -> int:
        gpus = self.resources.gpus_per_node or 0
        return max(gpus, 1) if self.stage in RANK_STAGES else 1


def stage_key_problem(slurm: SlurmConfig, cfg: ExperimentConfig) -> str | None:
    """Unknown keys in slurm.stages, named with what is allowed."""
    methods = {m.name for m in cfg.distill.methods}
    for key in slurm.stages:
        stage, _, method = key.partition(".")
        if stage not in STAGES:
            return (f"slurm.stages.{key}: unknown stage {stage!r}; expected one of "
                    f"{', '.join(STAGES)} (or train.<method>)")
        if method and (stage != "train" or method not in methods):
            return (f"slurm.stages.{key}: per-method resources are train.<method> with a "
                    f"method of distill.methods ({', '.join(sorted(methods))})")
    return None


def resolve_resources(slurm: SlurmConfig, stage: str, method: str | None = None
                      ) -> SlurmResources:
    """defaults <- slurm.stages[stage] <- slurm.stages["train.<method>"]; later keys win.

    `nodes` from the defaults applies only to stages that can span nodes (training), and
    `gpus_per_node` from the defaults not to CPU-only stages (shards, report): a stage entry
    that sets them explicitly always wins.
    """
    merged = slurm.defaults.model_dump()
    if stage not in RANK_STAGES:
        merged["nodes"] = 1
    if stage in CPU_STAGES:
        merged["gpus_per_node"] = None
    for key in (stage, f"{stage}.{method}" if method else None):
        over = slurm.stages.get(key) if key else None
        if over is not None:
            merged.update({k: v for k, v in over.model_dump().items() if v is not None})
    return SlurmResources(**merged)


def time_limit_seconds(value: str | None) -> int | None:
    """Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    if value is None:
        return None
    days, _, rest = value.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        h, m, s = (parts + [0, 0])[:3]
        return int(days) * 86400 + h * 3600 + m * 60 + s
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def build_graph(cfg: ExperimentConfig, only: set[str] | None = None) -> list[StageJob]:
    """Every job of the experiment in submission order (dependencies first).

    `only` keeps the named stages; dependencies on stages left out are dropped, as their
    outputs are taken to exist already.
    """
    slurm = cfg.slurm
    problem = stage_key_problem(slurm, cfg)
    if problem:
        raise SlurmError(problem)
    if only is not None:
        unknown = sorted(set(only) - set(STAGES))
        if unknown:
            raise SlurmError(f"unknown stage(s) {unknown}; expected some of {', '.join(STAGES)}")
    clash = sorted(m.name for m in cfg.distill.methods if m.name in RESERVED_METHOD_NAMES)
    if clash:
        raise SlurmError(f"method name(s) {clash} collide with folders of the output "
                         f"directory ({', '.join(sorted(RESERVED_METHOD_NAMES))}); rename them")

    jobs: list[StageJob] = []

    def add(key: str, stage: str, title: str, deps: list[Dep], method: str | None = None,
            array: int | None = None, resources_method: str | None = None) -> StageJob:
        job = StageJob(key=key, stage=stage, method=method, title=title, deps=deps,
                       array=array, resources=resolve_resources(slurm, stage, resources_method))
        jobs.append(job)
        return job

    repeats = cfg.train.repeats
    shards = [Dep("afterok", "shards")]
    add("shards", "shards", "build token shards", [])
    teacher_ready = list(shards)
    planned = experiment_stages(cfg)
    if "teacher_pretrain" in planned:
        add("teacher_pretrain", "teacher_pretrain", "pretrain the teacher", shards)
        teacher_ready = shards + [Dep("afterok", "teacher_pretrain")]
    if "teacher_finetune" in planned:
        add("teacher_finetune", "teacher_finetune", "fine-tune the teacher on the shards", shards)
        teacher_ready = shards + [Dep("afterok", "teacher_finetune")]
    kd_ready = teacher_ready
    if "teacher_cache" in planned:
        add("teacher_cache", "teacher_cache", "cache the teacher's signals", teacher_ready)
        kd_ready = teacher_ready + [Dep("afterok", "teacher_cache")]

    finals: list[Dep] = []
    run_dirs: list[Path] = []
    for method in cfg.distill.methods:
        # a baseline initialised from the teacher's layers waits for the teacher too
        deps = kd_ready if method.needs_teacher else (
            teacher_ready if cfg.student.from_teacher_layers is not None else shards)
        train_key = f"train-{method.name}"
        add(train_key, "train", f"train {method.name} ({method.method}), repeats 0-{repeats - 1}",
            list(deps), method=method.name, array=repeats, resources_method=method.name)
        run_dirs += [cfg.run_dir(method.name, r) for r in range(repeats)]
        for stage, what in (("eval", "evaluate"), ("ept", "energy per token of")):
            key = f"{stage}-{method.name}"
            add(key, stage, f"{what} {method.name}, repeats 0-{repeats - 1}",
                [Dep("aftercorr", train_key)], method=method.name, array=repeats)
            finals.append(Dep("afterok", key))
    for stage, what in (("eval", "evaluate"), ("ept", "energy per token of")):
        add(f"{stage}-teacher", stage, f"{what} the teacher", list(teacher_ready),
            method="teacher")
        finals.append(Dep("afterok", f"{stage}-teacher"))
    report = add("report", "report", "report: tables, plots, report.html", finals)
    report.run_dirs = run_dirs

    if only is not None:
        jobs = [j for j in jobs if j.stage in only]
        kept = {j.key for j in jobs}
        for j in jobs:
            j.deps = [d for d in j.deps if d.key in kept]
    if teacher_path(cfg) is None and any(j.method == "teacher" for j in jobs):
        raise SlurmError("teacher.build without teacher.pretrain: there are no teacher weights "
                         "for the teacher's eval/EPT jobs (and the report needs them); set "
                         "teacher.pretrain or teacher.model")
    for j in jobs:  # stable order, no duplicates
        seen: dict[Dep, None] = {}
        for d in j.deps:
            seen.setdefault(d)
        j.deps = list(seen)
        _check_signal_fits(cfg, j)
    return jobs


def _check_signal_fits(cfg: ExperimentConfig, job: StageJob) -> None:
    limit = time_limit_seconds(job.resources.time)
    if job.preemptible and limit is not None and cfg.slurm.signal_seconds >= limit:
        raise SlurmError(f"slurm.signal_seconds={cfg.slurm.signal_seconds} is not shorter than "
                         f"the {job.stage} time limit {job.resources.time} ({limit} s): the "
                         "checkpoint signal would come before the job starts working")


def dependency_arg(deps: list[Dep], ids: dict[str, str]) -> str | None:
    """--dependency value: all conditions must hold (comma = AND)."""
    by_kind: dict[str, list[str]] = {}
    for d in deps:
        by_kind.setdefault(d.kind, []).append(ids[d.key])
    return ",".join(f"{kind}:{':'.join(v)}" for kind, v in by_kind.items()) or None


def format_graph(jobs: list[StageJob], ids: dict[str, str] | None = None) -> str:
    """The dependency graph as text, one job a line, in submission order."""
    width = max(len(_label(j, ids)) for j in jobs) + 2
    lines = []
    for j in jobs:
        deps = ", ".join(f"{d.kind}:{_ref(d.key, ids)}" for d in j.deps) or "-"
        lines.append(f"  {_label(j, ids):<{width}}<- {deps}")
    return "\n".join(lines)


def _label(job: StageJob, ids: dict[str, str] | None) -> str:
    arr = f" [0-{job.array - 1}]" if job.array else ""
    return f"{_ref(job.key, ids)}{arr}"


def _ref(key: str, ids: dict[str, str] | None) -> str:
    return f"{key} ({ids[key]})" if ids and key in ids else key
