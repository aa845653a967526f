"""Named evaluation suites: the tasks, few-shot counts, template settings, limit and the one
primary metric per task are fixed here, not on the command line, so a teacher and its
students cannot be evaluated with different flags by accident.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from wattkd.errors import ConfigError
from wattkd.eval.tasks import TASKS_DIR
from wattkd.eval.tasks import utils as task_utils


# The shapes eval reads from the config (config.EvalConfig, SuiteConfig, SuiteTaskConfig), as
# protocols: config imports eval/custom to check suites at load, so eval imports no config.
class TaskSettings(Protocol):
    """One task of a suite written in the config (config.SuiteTaskConfig)."""

    task: str | None
    bigbench: str | None
    name: str | None
    num_fewshot: int
    metric: str | None
    limit: int | None


class SuiteSettings(Protocol):
    """A suite written in the config (config.SuiteConfig)."""

    name: str
    description: str
    tasks: Sequence[TaskSettings]
    limit: int | None
    apply_chat_template: bool
    fewshot_as_multiturn: bool
    system_instruction: str | None
    fewshot_seed: int


class EvalSettings(Protocol):
    """The config's `eval:` section (config.EvalConfig), as far as suites read it."""

    suite: str | SuiteSettings | None
    train_suite: str | SuiteSettings | None
    include_path: Sequence[str]
    limit: int | None
    mmlu_path: str | None
    bigbench_dir: str | None


class SuiteError(ConfigError):
    """Unknown suite, or a suite whose tasks or data cannot be found (a config problem)."""


@dataclass(frozen=True)
class SuiteTask:
    name: str          # lm-eval task or group name
    metric: str        # key in lm-eval's results, "<metric>,<filter>"
    num_fewshot: int = 0
    data: str | None = None  # "mmlu" | "bigbench:<task>" | None (hub data)
    # Suites written in the config (eval/custom.py) only; presets leave the defaults.
    limit: int | None = None          # examples of this task (over the suite's limit)
    bigbench_json: str | None = None  # a local BIG-bench task.json (not a packaged YAML)
    mode: str | None = None           # its kind: "mc" | "gen"
    files: tuple[tuple[str, str], ...] = ()  # (file name, sha256) hashed into the protocol


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    tasks: tuple[SuiteTask, ...]
    limit: int | None = None  # per task; EvalConfig.limit overrides (and is hashed)
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None
    hub: bool = False  # tasks from lm-eval's own registry, data from the Hugging Face hub
    fewshot_seed: int = 1234
    extra: dict[str, Any] = field(default_factory=dict)
    include_paths: tuple[str, ...] = ()  # eval.include_path folders (config suites)

    def effective_limit(self, cfg: EvalSettings) -> int | None:
        return cfg.limit if cfg.limit is not None else self.limit

    def task_limit(self, task: SuiteTask, cfg: EvalSettings) -> int | None:
        """Examples of `task`: eval.limit (--limit) over the task's own over the suite's."""
        if cfg.limit is not None:
            return cfg.limit
        return task.limit if task.limit is not None else self.limit

    @property
    def per_task_limits(self) -> bool:
        return any(t.limit is not None for t in self.tasks)


def _bb(task: str, mode: str) -> SuiteTask:
    metric = "acc,none" if mode == "mc" else "exact_match,extract"
    return SuiteTask(f"wattkd_bb_{task}", metric, 0, f"bigbench:{task}")


def _bigbench_catalogue() -> dict[str, str]:
    """BIG-bench tasks wattkd ships a YAML for -> 'mc' | 'gen'."""
    out = {}
    for p in sorted((TASKS_DIR / "bigbench").glob("wattkd_bb_*.yaml")):
        text = p.read_text()
        out[p.stem.removeprefix("wattkd_bb_")] = "gen" if "_bigbench_gen_" in text else "mc"
    return out


BIGBENCH_TASKS = _bigbench_catalogue()

# The BIG-bench tasks of `offline-full`, listed: a YAML added to tasks/bigbench/ joins no
# preset by being there (a preset's protocol hash must not move when a task is shipped).
OFFLINE_FULL_BIGBENCH = (
    "causal_judgment", "date_understanding", "disambiguation_qa", "dyck_languages",
    "geometric_shapes", "logical_deduction_five_objects", "logical_deduction_seven_objects",
    "logical_deduction_three_objects", "movie_recommendation", "object_counting",
    "penguins_in_a_table", "physical_intuition", "reasoning_about_colored_objects",
    "ruin_names", "salient_translation_error_detection", "social_iqa",
    "sports_understanding", "strategyqa", "temporal_sequences",
    "tracking_shuffled_objects_five_objects", "tracking_shuffled_objects_seven_objects",
    "tracking_shuffled_objects_three_objects", "winowhy", "word_sorting",
)

SUITES: dict[str, Suite] = {
    "offline": Suite(
        name="offline",
        description="CPU-sized local suite: MMLU (8 subjects), BIG-bench sports_understanding "
                    "and date_understanding (multiple choice), object_counting (generation); "
                    "zero-shot, no chat template, 100 examples per task",
        tasks=(
            SuiteTask("wattkd_mmlu_mini", "acc,none", 0, "mmlu"),
            _bb("sports_understanding", "mc"),
            _bb("date_understanding", "mc"),
            _bb("object_counting", "gen"),
        ),
        limit=100,
    ),
    "offline-full": Suite(
        name="offline-full",
        description="All local data: MMLU (57 subjects) and the 24 bundled BIG-bench tasks; "
                    "zero-shot, no chat template, no limit",
        tasks=(SuiteTask("wattkd_mmlu", "acc,none", 0, "mmlu"),
               *(_bb(t, BIGBENCH_TASKS[t]) for t in OFFLINE_FULL_BIGBENCH)),
        limit=None,
    ),
    "seed": Suite(
        name="seed",
        description="The original study's tasks from the Hugging Face hub (Open LLM "
                    "Leaderboard v1 shots): mmlu 5-shot, arc_challenge 25-shot, hellaswag "
                    "10-shot, bbh 3-shot chain-of-thought; no chat template",
        tasks=(
            SuiteTask("mmlu", "acc,none", 5),
            SuiteTask("arc_challenge", "acc_norm,none", 25),
            SuiteTask("hellaswag", "acc_norm,none", 10),
            SuiteTask("bbh", "exact_match,get-answer", 3),
        ),
        limit=None,
        hub=True,
    ),
}


def get_suite(name: str) -> Suite:
    try:
        return SUITES[name]
    except KeyError:
        raise SuiteError(f"unknown eval suite {name!r}; known suites: "
                         f"{', '.join(sorted(SUITES))}") from None


def _offline_env() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def task_metadata(suite: Suite, cfg: EvalSettings) -> dict[str, str]:
    """Check every data file the suite reads and return the lm-eval metadata naming them.

    Runs before any model is loaded, so a missing file costs nothing.
    """
    if suite.hub and _offline_env():
        raise SuiteError(
            f"suite {suite.name!r} reads its data from the Hugging Face hub "
            f"({', '.join(t.name for t in suite.tasks)}) but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE "
            "is set; use suite 'offline' or 'offline-full' (local data) instead")
    meta: dict[str, str] = {}
    needs = {t.data.split(":")[0] for t in suite.tasks if t.data}
    if "mmlu" in needs:
        if not cfg.mmlu_path:
            raise SuiteError(f"suite {suite.name!r} needs MMLU data: set eval.mmlu_path to a "
                             "JSONL of {subject, question, choices, answer}")
        p = Path(cfg.mmlu_path).expanduser()
        if not p.is_file():
            raise SuiteError(f"eval.mmlu_path {p} does not exist (expected a JSONL of "
                             "{subject, question, choices, answer})")
        meta[task_utils.MMLU_PATH_KEY] = str(p.resolve())
    if "bigbench" in needs:
        if not cfg.bigbench_dir:
            raise SuiteError(f"suite {suite.name!r} needs BIG-bench data: set "
                             "eval.bigbench_dir to a folder of <task>/task.json")
        root = Path(cfg.bigbench_dir).expanduser()
        if not root.is_dir():
            raise SuiteError(f"eval.bigbench_dir {root} is not a folder (expected "
                             "<task>/task.json inside)")
        missing = [t.data.split(":", 1)[1] for t in suite.tasks
                   if t.data and t.data.startswith("bigbench:")
                   and not (root / t.data.split(":", 1)[1] / "task.json").is_file()]
        if missing:
            raise SuiteError(f"eval.bigbench_dir {root} lacks task.json for: "
                             f"{', '.join(missing)} (suite {suite.name!r})")
        meta[task_utils.BIGBENCH_DIR_KEY] = str(root.resolve())
    return meta
