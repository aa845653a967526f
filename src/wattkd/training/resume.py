"""What a resume may continue: the checkpoint it starts from, and the config it continues with.

A resume continues the run's first part only if it trains the same experiment. Before anything
is written, the new resolved config is compared with the one in the run folder (config.yaml,
written by the run's last start) key by key; a difference in a key that changes the result is
refused (`ResumeConfigChanged`, naming each key with old -> new), unless `--allow-config-change`
accepts it: then every change is recorded with the step it applies from (run.json
`config_changes`, shown in the report).

Keys that do not change what is trained (`RESULT_NEUTRAL`): where and how results are written
or measured, and implementation choices with the same arithmetic. Budget keys (`BUDGET_KEYS`)
say how long to train: raising them continues a finished run, so they are accepted and recorded.
Every other key is compared, new keys included. `--resume never` on a folder holding an earlier
run moves that run's records into `archive/<time>/` first, so no report counts them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wattkd import checkpoint
from wattkd.config import dump, migrate_stored
from wattkd.errors import InputError
from wattkd.jobs import TrainJob, finished_run
from wattkd.runlock import LOCK_FILE

log = logging.getLogger(__name__)

RESULT_NEUTRAL = (
    "name", "output_dir",                       # labels and where the run folder is
    "slurm", "eval", "telemetry",               # scheduling, evaluation after training, metering
    "train.log_every", "train.tensorboard", "train.checkpoint_every", "train.keep_last",
    "train.eval_every", "train.eval_tokens",    # in-loop held-out loss: measured, not trained on
    "train.repeats",                            # how many repeats a study runs, not this one
    "train.device", "train.gradient_checkpointing", "train.strategy", "train.fsdp",
    "teacher.device_map",                       # placement (a strategy change: checkpoint.load)
    "distill.logit_chunk_tokens", "distill.fused_kernel",  # same loss, other implementation
    "distill.cache_dir",                        # the cache's identity is checked on its own
    "data.num_workers",
)
BUDGET_KEYS = ("train.max_steps", "train.max_tokens", "train.energy_budget_j",
               "teacher.pretrain.max_steps", "teacher.finetune.max_steps",
               "teacher.finetune.max_tokens")
ARCHIVED = ("archive",)  # never moved into an archive


class ResumeConfigChanged(InputError):
    """A resume whose config differs from the run's in a key that changes the result."""


@dataclass
class ResumePlan:
    """Where a training start stands, found before anything is written."""

    checkpoint: Path | None = None
    step: int = 0
    changes: dict[str, list[Any]] = field(default_factory=dict)  # key -> [old, new]
    archive: bool = False          # a fresh start over an earlier run's records


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted.key: leaf} of a nested config (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flat(value, name) if isinstance(value, dict) and value else {name: value})
    return out


def settings(config: dict[str, Any], method: str, repeat: int) -> dict[str, Any]:
    """The compared settings of one run: the experiment without the other methods, this
    method's entry, the repeat."""
    config = dict(config)
    distill = dict(config.get("distill") or {})
    methods = distill.pop("methods", None) or []
    config["distill"] = distill
    out = flat(config)
    out["method"] = method
    out["repeat"] = repeat
    entry = next((m for m in methods if isinstance(m, dict) and m.get("name") == method), None)
    if entry is not None:
        out.update(flat(entry, "method"))
    return {k: v for k, v in out.items() if not _neutral(k)}


def _neutral(key: str) -> bool:
    return any(key == n or key.startswith(n + ".") for n in RESULT_NEUTRAL)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """{key: [old, new]} of every compared key that differs (absent: None)."""
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)}


def _started_with(run_dir: Path) -> tuple[dict[str, Any], str, int] | None:
    """(config, method, repeat) the run in `run_dir` started with, in today's keys (a run
    written before a key was renamed compares as it was); None if it left no record."""
    try:
        config = migrate_stored(yaml.safe_load((run_dir / "config.yaml").read_text()))
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(config, dict) or not isinstance(info, dict):
        return None
    return config, str(info.get("method")), int(info.get("repeat") or 0)


def plan_resume(job: TrainJob, resume: str, allow_config_change: bool) -> ResumePlan:
    """The checkpoint to resume from and the config changes it accepts; refuses a changed
    config (before anything is written) unless allowed."""
    if resume == "never":
        return ResumePlan(archive=_has_records(job.run_dir))
    ckpt = checkpoint.latest(job.run_dir) if resume == "auto" else Path(resume)
    if ckpt is None:
        return ResumePlan(archive=resume == "auto" and _finished(job.run_dir))
    meta = checkpoint.verify(ckpt)
    plan = ResumePlan(ckpt, int(meta["step"]))
    origin = ckpt.parent.parent       # <run_dir>/checkpoints/step_N
    before = _started_with(origin)
    if before is None:
        log.warning("%s has no config.yaml / run.json beside its checkpoints: the config "
                    "cannot be compared with the one it started with", origin)
        return plan
    new = settings(json.loads(json.dumps(yaml.safe_load(dump(job.cfg)))), job.method.name,
                   job.repeat)
    changes = config_changes(settings(*before), new)
    plan.changes = changes
    refused = {k: v for k, v in changes.items() if k not in BUDGET_KEYS}
    if refused and not allow_config_change:
        listed = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in refused.items())
        raise ResumeConfigChanged(
            f"resuming {ckpt} (step {plan.step}) with a config that changes the result: "
            f"{listed}. The run would no longer record how its first part was trained: "
            "restore those keys, start over with --resume never, or pass "
            "--allow-config-change to continue and record the change in run.json")
    return plan


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _finished(run_dir: Path) -> bool:
    return finished_run(run_dir) is not None


def _has_records(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(p.name not in ARCHIVED and p.name != LOCK_FILE
                                    for p in run_dir.iterdir())


def archive_previous(run_dir: Path) -> Path | None:
    """Move an earlier run's records (metrics, ledger, telemetry, checkpoints, final/, eval
    results, run.json, config.yaml) into archive/<time>/; the lock file and older archives stay.
    Called by the writer holding the lock, after every check."""
    if not _has_records(run_dir):
        return None
    dest = run_dir / "archive" / time.strftime("%Y%m%dT%H%M%S")
    while dest.exists():
        dest = dest.with_name(dest.name + "x")
    dest.mkdir(parents=True)
    for item in sorted(run_dir.iterdir()):
        if item.name in ARCHIVED or item.name == LOCK_FILE:
            continue
        os.replace(item, dest / item.name)
    log.warning("%s held an earlier run: its records were moved to %s (a fresh start; the "
                "report reads only the new run)", run_dir, dest)
    return dest
