"""Evaluation targets: resolve "a model folder, a hub id, or a run directory" for the CLI and
the pipeline, then run the task suite, perplexity and EPT with the experiment's settings.

A run directory's model is its `final/` folder; the experiment's teacher directory evaluates
the teacher's weights (pretrained here, or the config's model id), so teacher and students are
always measured with the same protocol from the same config.
"""

from __future__ import annotations

import logging
from pathlib import Path

from wattkd.config import EvalConfig, ExperimentConfig, TelemetryConfig
from wattkd.energy.ledger import make_meter
from wattkd.errors import InputError
from wattkd.eval.custom import resolve_suite
from wattkd.eval.ept import run_ept
from wattkd.eval.harness import run_eval
from wattkd.eval.perplexity import run_perplexity
from wattkd.jobs import teacher_path
from wattkd.preflight import check_source

log = logging.getLogger(__name__)


class TargetError(InputError, ValueError):
    """The target is neither a model folder, a hub id nor a run directory with weights."""


def resolve_target(target: str, cfg: ExperimentConfig | None) -> tuple[str, Path | None]:
    """(model to load, run directory to write results into, or None)."""
    p = Path(target)
    if (p / "final" / "config.json").exists() or (p / "final" / "adapter_config.json").exists():
        return str(p / "final"), p
    if (p / "config.json").exists() or (p / "adapter_config.json").exists():
        return str(p), None
    if cfg is not None and p.resolve() == (cfg.out / "teacher").resolve():
        model = teacher_path(cfg)
        if model is None:
            raise TargetError("the teacher is built from config without pretraining: there are "
                              "no teacher weights to evaluate")
        p.mkdir(parents=True, exist_ok=True)
        return model, p
    if p.exists():
        raise TargetError(f"{p} is neither an HF model folder (config.json) nor a run directory "
                          "with final/")
    check_source(target, "model")  # a path that does not exist is named so, not as a hub id
    return target, None  # a hub id


def _eval_config(cfg: ExperimentConfig | None, limit: int | None) -> EvalConfig:
    ev = cfg.eval if cfg is not None else EvalConfig()
    return ev.model_copy(update={"limit": limit}) if limit is not None else ev


def evaluate_target(target: str, cfg: ExperimentConfig | None, *, suite: str | None = None,
                    limit: int | None = None, out: Path | None = None,
                    with_perplexity: bool = False) -> dict[str, str]:
    """Run the task suite (when it has data) and held-out perplexity; return result paths."""
    ev = _eval_config(cfg, limit)
    spec = suite or ev.suite
    chosen = resolve_suite(spec, ev) if spec else None  # a bad suite fails before the model
    model, run_dir = resolve_target(target, cfg)
    written: dict[str, str] = {}
    device = cfg.train.device if cfg is not None else "auto"
    if chosen is not None:
        name = chosen.name
        dest = out or (run_dir / "eval" / f"{name}.json" if run_dir else Path(f"eval-{name}.json"))
        run_eval(model, chosen, ev, dest, device=device)
        written[name] = str(dest)
    else:
        log.info("eval.suite is not set: no task suite run (quality from perplexity)")
    if with_perplexity:
        if cfg is None:
            raise TargetError("perplexity needs --config (it reads the experiment's held-out shards)")
        heldout = cfg.shards_dir / "heldout"
        dest = (run_dir / "eval" / "perplexity.json") if run_dir else Path("perplexity.json")
        run_perplexity(model, heldout, ev, dest, device=device)
        written["perplexity"] = str(dest)
    return written


def ept_target(target: str, cfg: ExperimentConfig | None, *, out: Path | None = None) -> str:
    """Inference energy-per-token benchmark of a target, metered by the experiment's settings."""
    model, run_dir = resolve_target(target, cfg)
    ev = _eval_config(cfg, None)
    telemetry = cfg.telemetry if cfg is not None else TelemetryConfig()
    dest = out or (run_dir / "ept.json" if run_dir else Path("ept.json"))
    meter = make_meter(telemetry, run_dir)
    device = cfg.train.device if cfg is not None else "auto"
    run_ept(model, ev.ept, meter, dest, device=device)
    return str(dest)
