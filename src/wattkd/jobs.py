"""What to train and where a run stands: training jobs, the teacher's weights, finished runs.

The pipeline, the Slurm stages, the teacher cache and eval ask these questions without
importing the trainer (and its torch / accelerate stack): which job a stage trains, where the
teacher's weights are, and whether a run directory already holds a finished run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wattkd.config import (
    ExperimentConfig,
    GuardConfig,
    LossTerm,
    MethodConfig,
    StudentConfig,
    TrainConfig,
)

# Every stage an experiment can have, in the order they run; the pipeline and the Slurm graph
# both take the list of an experiment from `experiment_stages`.
STAGES = ("shards", "teacher_pretrain", "teacher_finetune", "teacher_cache", "train", "eval",
          "ept", "report")


def experiment_stages(cfg: ExperimentConfig) -> list[str]:
    """The stages this experiment runs, in order: the optional teacher stages only where the
    config asks for them (a cache only when some method reads teacher signals)."""
    wanted = {"shards", "train", "eval", "ept", "report"}
    if cfg.teacher.pretrain is not None:
        wanted.add("teacher_pretrain")
    if cfg.teacher.finetuned:
        wanted.add("teacher_finetune")
    if cfg.distill.teacher_signals == "cache" and any(m.needs_teacher
                                                      for m in cfg.distill.methods):
        wanted.add("teacher_cache")
    return [s for s in STAGES if s in wanted]


@dataclass
class TrainJob:
    """What to train: the experiment, one method, one repeat, and where the student comes from."""

    cfg: ExperimentConfig
    method: MethodConfig
    run_dir: Path
    student: StudentConfig
    train: TrainConfig
    repeat: int = 0
    teacher_path: str | None = None   # a teacher trained earlier in this experiment
    role: str = "student"             # student | teacher_pretrain | teacher_finetune

    @property
    def seed(self) -> int:
        """Repeat k's seed: data order, the student's random init and the new parameters
        (projectors). Methods of one repeat share it, so their runs are paired."""
        return self.train.seed + self.repeat


@dataclass
class TrainResult:
    run_dir: Path
    status: str              # completed | preempted | budget
    step: int
    tokens: int
    final_dir: Path | None


# ------------------------------------------------------------------------------- job builders
def teacher_path(cfg: ExperimentConfig) -> str | None:
    """Where the teacher's weights are: a teacher pretrained or fine-tuned here (its final/),
    else the config's model."""
    if cfg.teacher.finetuned or cfg.teacher.pretrain is not None:
        return str(cfg.out / "teacher" / "final")  # trained here (finetune / pretrain stage)
    if cfg.teacher.model is not None:
        return cfg.teacher.model
    return None  # built from config, random init (benchmarks)


def student_job(cfg: ExperimentConfig, method: str, repeat: int = 0) -> TrainJob:
    m = cfg.method(method)
    return TrainJob(cfg, m, cfg.run_dir(method, repeat), cfg.student, cfg.train, repeat,
                    teacher_path(cfg))


def _teacher_method() -> MethodConfig:
    """The teacher's own run trains with CE only. "teacher" is reserved for user methods (it
    is this run's folder), so the method is built unvalidated."""
    return MethodConfig.model_construct(
        name="teacher", method="none", losses=[LossTerm(name="ce")], layer_map=None,
        token_subsample=1.0, pooling="mean", guard=GuardConfig())


def teacher_pretrain_job(cfg: ExperimentConfig) -> TrainJob:
    """The demo's tiny teacher is trained here first, with the same loop (CE only)."""
    pre = cfg.teacher.pretrain
    if pre is None:
        raise ValueError("teacher.pretrain is not set in this config")
    train = cfg.train.model_copy(update={"max_steps": pre.max_steps, "lr": pre.lr,
                                         "micro_batch_size": pre.micro_batch_size,
                                         "max_tokens": None, "energy_budget_j": None,
                                         "warmup_steps": min(cfg.train.warmup_steps,
                                                             pre.max_steps // 10)})
    student = StudentConfig(build=cfg.teacher.build)
    return TrainJob(cfg, _teacher_method(), cfg.out / "teacher", student, train, 0, None,
                    role="teacher_pretrain")


def teacher_finetune_job(cfg: ExperimentConfig) -> TrainJob:
    """The pretrained teacher adapted to the training shards (CE, full or LoRA) with the same
    loop as the students; its final/ becomes the teacher of every later stage."""
    ft = cfg.teacher.finetune
    if ft is None or not ft.enabled or cfg.teacher.model is None:
        raise ValueError("teacher.finetune is not enabled in this config (it needs "
                         "teacher.model and a teacher.finetune section)")
    steps = ft.max_steps if ft.max_steps is not None else 10 ** 9
    train = cfg.train.model_copy(update={
        "max_steps": ft.max_steps, "max_tokens": ft.max_tokens, "lr": ft.lr,
        "micro_batch_size": ft.micro_batch_size or cfg.train.micro_batch_size,
        "energy_budget_j": None, "warmup_steps": min(ft.warmup_steps, steps // 10)})
    student = StudentConfig(model=cfg.teacher.model, revision=cfg.teacher.revision,
                            lora=ft.lora, trust_remote_code=cfg.teacher.trust_remote_code)
    return TrainJob(cfg, _teacher_method(), cfg.out / "teacher", student, train, 0, None,
                    role="teacher_finetune")


# -------------------------------------------------------------------------------- run state
def finished_run(run_dir: Path) -> dict[str, Any] | None:
    """run.json of a run that ended (completed or energy budget) and wrote final/, else None."""
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    final = run_dir / "final"
    whole = (final / "config.json").exists() or (final / "adapter_config.json").exists()
    return info if info.get("status") in ("completed", "budget") and whole else None


def training_done(run_dir: Path) -> bool:
    return finished_run(run_dir) is not None


def budget_reached(done: dict[str, Any], tc: TrainConfig) -> bool:
    """Whether a finished run's record meets this config's budget (an energy-budget stop
    counts as reached; raised max_steps/max_tokens continue it)."""
    if done.get("status") == "budget":
        return True
    steps_ok = tc.max_steps is None or done.get("step", 0) >= tc.max_steps
    tokens_ok = tc.max_tokens is None or done.get("tokens", 0) >= tc.max_tokens
    return steps_ok and tokens_ok
