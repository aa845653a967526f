"""Suites written in the experiment YAML: resolve `eval.suite: {tasks: [...]}` into a `Suite`.

A task is an lm-eval task or group name (wattkd's own tasks, a YAML under `eval.include_path`,
or lm-eval's registry with hub data) or a local BIG-bench folder (`task.json`; multiple choice
when every example has `target_scores`, generative when every example has `target`). Every
check runs here, at config load and again before any model is loaded, so a bad suite costs
seconds: unknown names (with the closest known ones), a missing or malformed task.json, a
metric the task does not produce, a hub task while HF_HUB_OFFLINE is set.
"""

from __future__ import annotations

import difflib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from wattkd.eval.suites import (
    SUITES,
    EvalSettings,
    Suite,
    SuiteError,
    SuiteSettings,
    SuiteTask,
    TaskSettings,
    _offline_env,
    get_suite,
    task_metadata,
)
from wattkd.eval.tasks import TASKS_DIR
from wattkd.eval.tasks import utils as task_utils
from wattkd.hashing import file_sha256
from wattkd.names import safe_name

# lm-eval's metrics for a task that declares no metric_list (lm_eval.api.registry).
_DEFAULT_METRICS = {
    "loglikelihood": ["perplexity", "acc"],
    "loglikelihood_rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
    "multiple_choice": ["acc", "acc_norm"],
    "generate_until": ["exact_match"],
}
BIGBENCH_METRICS = {"mc": "acc,none", "gen": "exact_match,extract"}
_TEMPLATES = {"mc": "_bigbench_mc_template.yaml", "gen": "_bigbench_gen_template.yaml"}


# --------------------------------------------------------------------------- task managers
@lru_cache(maxsize=8)
def local_task_manager(include_paths: tuple[str, ...] = ()) -> Any:
    """lm-eval's TaskManager over wattkd's task folder plus the user's include paths (fast)."""
    from lm_eval.tasks import TaskManager  # lazy: optional extra [eval]

    return TaskManager(include_path=[str(TASKS_DIR), *include_paths], include_defaults=False)


@lru_cache(maxsize=1)
def registry_task_manager() -> Any:
    """lm-eval's full registry (about 15k names; indexing takes seconds, so done once)."""
    from lm_eval.tasks import TaskManager  # lazy: optional extra [eval]

    return TaskManager(include_defaults=True)


def _lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------ BIG-bench
def detect_bigbench(path: Path) -> tuple[str, int]:
    """('mc' | 'gen', number of examples) of a task.json, checked the way the loader reads it.

    Raises SuiteError naming the file and the field when the file cannot be evaluated.
    """
    if not path.is_file():
        raise SuiteError(f"{path} not found (a bigbench task is a folder with task.json)")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SuiteError(f"{path}: not valid JSON ({exc})") from None
    examples = spec.get("examples") if isinstance(spec, dict) else None
    if not isinstance(examples, list) or not examples:
        raise SuiteError(f"{path}: expected an object with a non-empty 'examples' list")
    if all(isinstance(e, dict) and "target_scores" in e for e in examples):
        mode = "mc"
    elif all(isinstance(e, dict) and "target" in e for e in examples):
        mode = "gen"
    else:
        bad = next(i for i, e in enumerate(examples)
                   if not (isinstance(e, dict) and ("target_scores" in e or "target" in e)))
        raise SuiteError(f"{path}: examples[{bad}] has neither 'target_scores' (multiple "
                         "choice) nor 'target' (generation); every example needs the same one")
    try:
        docs = task_utils.read_bigbench_file(path, mode)
    except task_utils.TaskDataError as exc:
        raise SuiteError(str(exc)) from None
    return mode, len(docs)


def bigbench_task_config(st: SuiteTask) -> dict[str, Any]:
    """The lm-eval task config of a local BIG-bench folder: wattkd's template, this file."""
    from lm_eval.tasks._yaml_loader import load_yaml  # lazy: optional extra [eval]

    assert st.bigbench_json is not None and st.mode in _TEMPLATES
    cfg = load_yaml(TASKS_DIR / _TEMPLATES[st.mode], resolve_func=True)
    cfg["task"] = st.name
    cfg["custom_dataset"] = (task_utils.load_bigbench_file_mc if st.mode == "mc"
                             else task_utils.load_bigbench_file_gen)
    cfg["dataset_kwargs"] = {task_utils.TASK_JSON_KEY: st.bigbench_json}
    return cfg


# --------------------------------------------------------------------------- lm-eval names
def _produced_metrics(entry: Any) -> list[str] | None:
    """'<metric>,<filter>' keys lm-eval reports for an index entry; None when unknowable."""
    from lm_eval.tasks._index import Kind  # lazy: optional extra [eval]
    from lm_eval.tasks._yaml_loader import load_yaml  # lazy: optional extra [eval]

    cfg = load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else (entry.cfg or {})
    if entry.kind == Kind.GROUP:
        out = []
        for agg in cfg.get("aggregate_metric_list") or []:
            filters = agg.get("filter_list", "none")
            for f in [filters] if isinstance(filters, str) else filters:
                out.append(f"{agg['metric']},{f}")
        return out
    if entry.kind != Kind.TASK:
        return None  # a Python task class: its metrics are known once built
    metrics = [m["metric"] for m in cfg.get("metric_list") or [] if isinstance(m, dict)
               and isinstance(m.get("metric"), str)]
    if not metrics:
        metrics = _DEFAULT_METRICS.get(cfg.get("output_type", "generate_until"), [])
    filters = [f["name"] for f in cfg.get("filter_list") or [] if isinstance(f, dict)] or ["none"]
    return [f"{m},{f}" for m in metrics for f in filters]


def _find_entry(name: str, include: tuple[str, ...]) -> tuple[Any, str]:
    """(index entry, 'wattkd' | 'include' | 'registry') of an lm-eval name, or SuiteError."""
    local = local_task_manager(include)
    entry = local.task_index.get(name)
    if entry is not None:
        packaged = entry.yaml_path is not None and Path(entry.yaml_path).is_relative_to(TASKS_DIR)
        return entry, "wattkd" if packaged else "include"
    registry = registry_task_manager()
    entry = registry.task_index.get(name)
    if entry is not None:
        return entry, "registry"
    close = difflib.get_close_matches(name, [*local.all_tasks, *registry.all_tasks], n=5,
                                      cutoff=0.6)
    hint = f"; closest: {', '.join(close)}" if close else ""
    where = f" or in {', '.join(include)}" if include else ""
    raise SuiteError(f"unknown lm-eval task {name!r} (not in lm-eval's registry, wattkd's "
                     f"tasks{where}){hint}. `wattkd eval --list-tasks` lists them")


def _packaged_data(name: str) -> str | None:
    """Data tag of a wattkd task (which eval.* path it reads), like the presets declare."""
    if name.startswith("wattkd_mmlu"):
        return "mmlu"
    if name.startswith("wattkd_bb_"):
        return f"bigbench:{name.removeprefix('wattkd_bb_')}"
    return None


def _lm_eval_task(tc: TaskSettings, include: tuple[str, ...]) -> tuple[SuiteTask, bool]:
    """(SuiteTask, reads hub data) for a `task:` entry."""
    from lm_eval.tasks._index import Kind  # lazy: optional extra [eval]

    name = tc.task
    assert name is not None
    entry, source = _find_entry(name, include)
    if entry.kind == Kind.TAG:
        raise SuiteError(f"{name!r} is an lm-eval tag (a loose set of tasks without a combined "
                         "score); list its tasks, or use a group")
    hub = source == "registry"
    if hub and _offline_env():
        raise SuiteError(f"task {name!r} comes from lm-eval's registry and reads its data from "
                         "the Hugging Face hub, but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set; "
                         "use local data (a bigbench folder or a YAML under eval.include_path)")
    produced = _produced_metrics(entry)
    metric = tc.metric
    if produced is not None:
        if not produced:
            raise SuiteError(f"group {name!r} reports no combined score (no "
                             "aggregate_metric_list); list its tasks instead")
        if metric is None:
            metric = produced[0]
        elif metric not in produced:
            raise SuiteError(f"task {name!r} does not produce metric {metric!r}; it reports: "
                             f"{', '.join(produced)}")
    elif metric is None:
        raise SuiteError(f"task {name!r} is a Python task: name its metric ('<metric>,<filter>')")
    files: tuple[tuple[str, str], ...] = ()
    if source == "include" and entry.yaml_path is not None:
        files = ((Path(entry.yaml_path).name, file_sha256(entry.yaml_path)),)
    return SuiteTask(name, metric, tc.num_fewshot, _packaged_data(name) if source == "wattkd"
                     else None, limit=tc.limit, files=files), hub


def _bigbench_task(tc: TaskSettings) -> SuiteTask:
    assert tc.bigbench is not None
    folder = Path(tc.bigbench).expanduser().resolve()
    path = folder / "task.json"
    mode, _ = detect_bigbench(path)
    metric = tc.metric or BIGBENCH_METRICS[mode]
    if metric != BIGBENCH_METRICS[mode]:
        kind = "multiple choice" if mode == "mc" else "generative"
        raise SuiteError(f"{path} is a {kind} task: it produces metric "
                         f"{BIGBENCH_METRICS[mode]!r}, not {metric!r}")
    name = tc.name or folder.name
    try:
        safe_name(name, "task name")
    except ValueError as exc:
        raise SuiteError(f"{exc}; set 'name' for folder {folder}") from None
    return SuiteTask(name, metric, tc.num_fewshot, None, limit=tc.limit,
                     bigbench_json=str(path), mode=mode,
                     files=(("task.json", file_sha256(path)),))


# ------------------------------------------------------------------------------- suites
def _include_paths(ev: EvalSettings) -> tuple[str, ...]:
    out = []
    for p in ev.include_path:
        d = Path(p).expanduser().resolve()
        if not d.is_dir():
            raise SuiteError(f"eval.include_path {p}: not a folder (expected lm-eval task YAMLs)")
        out.append(str(d))
    return tuple(out)


def build_suite(sc: SuiteSettings, ev: EvalSettings, key: str = "eval.suite") -> Suite:
    """A `Suite` from a suite written in the config; SuiteError names `key.tasks.N`."""
    if sc.name in SUITES:
        raise SuiteError(f"{key}.name: {sc.name!r} is a preset's name; name your suite "
                         "differently (results go to eval/<name>.json)")
    include = _include_paths(ev)
    tasks: list[SuiteTask] = []
    hub = False
    for i, tc in enumerate(sc.tasks):
        try:
            if tc.bigbench is not None:
                st = _bigbench_task(tc)
            else:
                st, is_hub = _lm_eval_task(tc, include)
                hub = hub or is_hub
        except SuiteError as exc:
            raise SuiteError(f"{key}.tasks.{i}: {exc}") from None
        if any(t.name == st.name for t in tasks):
            raise SuiteError(f"{key}.tasks.{i}: task name {st.name!r} appears twice; set "
                             "'name' to tell bigbench folders apart")
        tasks.append(st)
    return Suite(name=sc.name, description=sc.description or "suite from the experiment config",
                 tasks=tuple(tasks), limit=sc.limit,
                 apply_chat_template=sc.apply_chat_template,
                 fewshot_as_multiturn=sc.fewshot_as_multiturn,
                 system_instruction=sc.system_instruction, hub=hub,
                 fewshot_seed=sc.fewshot_seed, include_paths=include)


def _written(spec: str | SuiteSettings | None) -> bool:
    """Whether a suite spec of the config is a suite written out (config.SuiteConfig), not a name."""
    return spec is not None and not isinstance(spec, str)


def resolve_suite(spec: str | SuiteSettings | Suite, ev: EvalSettings) -> Suite:
    """A preset name, the name of a suite written in the config, or a suite config -> Suite."""
    if isinstance(spec, Suite):
        return spec
    if _written(spec):
        key = "eval.train_suite" if spec is ev.train_suite else "eval.suite"
        return build_suite(spec, ev, key)
    for key, inline in (("eval.suite", ev.suite), ("eval.train_suite", ev.train_suite)):
        if _written(inline) and inline.name == spec:
            return build_suite(inline, ev, key)
    return get_suite(spec)


def suite_name(spec: str | SuiteSettings | None) -> str | None:
    """The result name (eval/<name>.json) of eval.suite, without resolving it."""
    return spec.name if _written(spec) else spec


def check_eval_config(ev: EvalSettings) -> list[str]:
    """Problems of the config's suites (empty: fine). Presets are checked when they run."""
    problems = []
    for key, spec in (("eval.suite", ev.suite), ("eval.train_suite", ev.train_suite)):
        if isinstance(spec, str) and spec not in SUITES:
            close = difflib.get_close_matches(spec, list(SUITES), n=3)
            problems.append(f"{key}: unknown suite {spec!r}; presets: {', '.join(sorted(SUITES))}"
                            + (f" (closest: {', '.join(close)})" if close else "")
                            + "; or write a suite {name, tasks: [...]} (docs/eval-formats.md)")
        elif _written(spec):
            if not _lm_eval_available():
                continue  # checked again before evaluation, where lm-eval is required
            try:
                task_metadata(build_suite(spec, ev, key), ev)
            except SuiteError as exc:
                problems.append(str(exc))
    if (_written(ev.suite) and _written(ev.train_suite)
            and ev.suite.name == ev.train_suite.name and ev.suite != ev.train_suite):
        problems.append(f"eval.train_suite.name: {ev.train_suite.name!r} is eval.suite's name "
                        "but the suites differ; give it its own name")
    if ev.include_path and not any(_written(s) for s in (ev.suite, ev.train_suite)):
        try:
            _include_paths(ev)
        except SuiteError as exc:
            problems.append(str(exc))
    return problems


# ------------------------------------------------------------------------------- listing
def list_tasks(ev: EvalSettings | None) -> str:
    """What a suite can name: presets, wattkd's tasks, include paths, BIG-bench folders, and
    lm-eval's registry (hub data). Without a config: no include paths, no BIG-bench folder."""
    include = _include_paths(ev) if ev is not None else ()
    bigbench_dir = ev.bigbench_dir if ev is not None else None
    lines = ["Preset suites (eval.suite: NAME):"]
    lines += [f"  {n}: {s.description}" for n, s in SUITES.items()]
    local = local_task_manager(include)
    by_source: dict[str, list[str]] = {}
    for name, entry in sorted(local.task_index.items()):
        if entry.yaml_path is None:
            continue  # a tag: no combined score, so a suite cannot name it
        src = str(Path(entry.yaml_path).parent)
        if Path(entry.yaml_path).is_relative_to(TASKS_DIR):
            src = "wattkd"
        by_source.setdefault(src, []).append(name)
    lines.append("wattkd's tasks (task: NAME; data from eval.mmlu_path / eval.bigbench_dir):")
    lines += [f"  {n}" for n in by_source.pop("wattkd", [])]
    for src, names in by_source.items():
        lines.append(f"eval.include_path {src} (task: NAME):")
        lines += [f"  {n}" for n in names]
    folders = []
    if bigbench_dir and Path(bigbench_dir).expanduser().is_dir():
        folders = sorted(p.parent for p in Path(bigbench_dir).expanduser().glob("*/task.json"))
    if folders:
        lines.append(f"BIG-bench folders in eval.bigbench_dir {bigbench_dir} "
                     "(bigbench: FOLDER):")
        for f in folders:
            try:
                mode, n = detect_bigbench(f / "task.json")
                lines.append(f"  {f}  ({'multiple choice' if mode == 'mc' else 'generative'}, "
                             f"{n} examples)")
            except SuiteError as exc:
                lines.append(f"  {f}  (unusable: {exc})")
    registry = registry_task_manager()
    lines.append(f"lm-eval {_lm_eval_version()} registry (task: NAME; data from the Hugging Face "
                 f"hub): {len(registry.all_groups)} groups, {len(registry.all_subtasks)} tasks")
    lines += [f"  {n}  (group)" for n in registry.all_groups]
    lines += [f"  {n}" for n in registry.all_subtasks]
    return "\n".join(lines)


def _lm_eval_version() -> str:
    import lm_eval  # lazy: optional extra [eval]

    return lm_eval.__version__
