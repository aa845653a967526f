"""`wattkd pipeline CONFIG`: every stage locally, in order, skipping what is already complete.

A stage is complete when its outputs exist and say so (manifests, run.json status, result
files), so rerunning after an interruption continues where it stopped; training resumes from
its last checkpoint. The same stage functions back the Slurm jobs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from wattkd.checkpoint import PREEMPTED_EXIT_CODE
from wattkd.config import ExperimentConfig
from wattkd.data.shards import build_shards
from wattkd.eval.custom import suite_name
from wattkd.eval.runner import ept_target, evaluate_target
from wattkd.jobs import (
    TrainJob,
    experiment_stages,
    student_job,
    teacher_finetune_job,
    teacher_path,
    teacher_pretrain_job,
    training_done,
)
from wattkd.report import build_report
from wattkd.report.verdicts import verdict_lines
from wattkd.teacher_cache import build_cache
from wattkd.train import train

log = logging.getLogger(__name__)
console = Console(stderr=True)


@dataclass
class Stage:
    name: str
    done: Callable[[], bool]
    run: Callable[[], Any]


def stages(cfg: ExperimentConfig) -> list[Stage]:
    """The experiment's stage list; what each needs is made by an earlier one."""
    out: list[Stage] = []
    planned = experiment_stages(cfg)
    shards = cfg.shards_dir

    out.append(Stage("shards", lambda: False,
                     lambda: build_shards(cfg.data, shards)))  # the builder itself skips a match
    teacher_dir = cfg.out / "teacher"
    if "teacher_pretrain" in planned:
        out.append(Stage("teacher pretrain", lambda: training_done(teacher_dir),
                         lambda: _train_or_fail(teacher_pretrain_job(cfg))))
    if "teacher_finetune" in planned:
        out.append(Stage("teacher finetune", lambda: training_done(teacher_dir),
                         lambda: _train_or_fail(teacher_finetune_job(cfg))))
    if "teacher_cache" in planned:
        out.append(Stage("teacher cache", lambda: False,  # resumable, skips when done
                         lambda: build_cache(cfg)))
    runs: list[Path] = []
    for method in cfg.distill.methods:
        for rep in range(cfg.train.repeats):
            job = student_job(cfg, method.name, rep)
            runs.append(job.run_dir)
            out.append(Stage(f"train {method.name} rep{rep}",
                             lambda d=job.run_dir: training_done(d),
                             lambda j=job: _train_or_fail(j)))
    # A random-init teacher (benchmarks) has no weights to evaluate: no reference row then.
    evaluated = ([teacher_dir] if teacher_path(cfg) is not None else []) + runs
    wanted = ["perplexity"] + [n for n in [suite_name(cfg.eval.suite)] if n]
    for run_dir in evaluated:
        out.append(Stage(f"eval {run_dir.relative_to(cfg.out)}",
                         lambda d=run_dir: all((d / "eval" / f"{n}.json").exists()
                                               for n in wanted),
                         lambda d=run_dir: _evaluate(cfg, d)))
        out.append(Stage(f"ept {run_dir.relative_to(cfg.out)}",
                         lambda d=run_dir: (d / "ept.json").exists(),
                         lambda d=run_dir: _ept(cfg, d)))

    out.append(Stage("report", lambda: False,
                     lambda: build_report(runs, teacher=teacher_dir, out=cfg.out / "report")))
    return out


def _train_or_fail(job: TrainJob) -> None:
    result = train(job, resume="auto")
    if result.status == "preempted":
        console.print(f"training {job.method.name} was interrupted and checkpointed; rerun "
                      "the pipeline to resume")
        raise SystemExit(PREEMPTED_EXIT_CODE)


def _evaluate(cfg: ExperimentConfig, run_dir: Path) -> None:
    evaluate_target(str(run_dir), cfg, with_perplexity=True)


def _ept(cfg: ExperimentConfig, run_dir: Path) -> None:
    ept_target(str(run_dir), cfg)


def run_pipeline(cfg: ExperimentConfig) -> Path:
    """Run every incomplete stage; return the report path and print a short summary."""
    t0 = time.perf_counter()
    todo = stages(cfg)
    for i, stage in enumerate(todo, 1):
        prefix = f"[{i}/{len(todo)}] {stage.name}"
        if stage.done():
            console.print(f"{prefix}: [green]complete, skipped[/green]")
            continue
        console.rule(prefix)
        t = time.perf_counter()
        stage.run()
        console.print(f"{prefix}: done in {time.perf_counter() - t:.1f} s")
    report = cfg.out / "report" / "report.html"
    console.print(f"\npipeline finished in {time.perf_counter() - t0:.0f} s")
    _summary(cfg, report)
    return report


def _summary(cfg: ExperimentConfig, report: Path) -> None:
    """Where the report is, and the verdict lines a person can act on."""
    console.print(f"report: {report}")
    for line in summary_lines(cfg.out / "report" / "report.json"):
        console.print(line)


def summary_lines(report_json: Path) -> list[str]:
    """The energy/quality basis, then one verdict per method against the baseline (a
    difference with its 95% interval, or "not distinguishable"), never a bare "best"."""
    if not report_json.exists():
        return ["(no report.json: the report stage did not finish)"]
    rep = json.loads(report_json.read_text())
    quality, basis = rep.get("quality_label", "quality"), rep.get("energy_basis_label", "?")
    st = rep.get("statistics") or {}
    lines = [f"energy basis: {basis}; quality: {quality}; repeats: {st.get('repeats', '?')}"]
    verdicts = verdict_lines(st)
    if not verdicts:
        verdicts = ["no baseline to compare with: see the report's verdicts table"]
    return lines + verdicts
