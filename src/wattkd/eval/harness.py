"""lm-evaluation-harness runner with a locked protocol.

`run_eval(model_dir, suite, cfg, out)` loads an HF model (plus optional LoRA adapter), runs the
suite's tasks through lm-eval's own evaluator (`lm_eval.simple_evaluate`) and writes
`eval/<suite>.json`: one primary score per task, every scored example's value of that metric
(`per_example`, so the report can pair two models example by example), the protocol and its
hash. The suite, not the
caller, decides few-shot, chat template, limit and metric keys (see suites.py), and the hash
lets the report refuse teacher/student pairs measured differently.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from wattkd.config import EvalConfig
from wattkd.errors import InputError
from wattkd.eval.custom import bigbench_task_config, resolve_suite
from wattkd.eval.protocol import (
    PROTOCOL_FORMAT,
    docs_digest,
    finite_or_none,
    protocol_hash,
    sha256_text,
    task_config_digest,
    write_json_atomic,
)
from wattkd.eval.suites import Suite, SuiteError, task_metadata
from wattkd.eval.tasks import TASKS_DIR
from wattkd.models import load_pretrained, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

EVAL_SCHEMA = "wattkd.eval/1"


class EvalError(InputError, RuntimeError):
    """The harness ran but its output is not what the suite declares."""


class _DropNoise(logging.Filter):
    """lm-eval warns about `custom_dataset` metadata for every local task; it is expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def _quiet_lm_eval() -> None:
    lg = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _DropNoise) for f in lg.filters):
        lg.addFilter(_DropNoise())


# ------------------------------------------------------------------------------ loading
def load_model(model: str, *, adapter: str | None = None, device: str = "auto",
               dtype: str = "auto", device_map: str | None = None) -> tuple[Any, Any]:
    """(model in eval mode on `device`, tokenizer) from an HF folder or hub id.

    An adapter (LoRA) is merged into the base so lm-eval and the EPT benchmark measure the
    model as it would be deployed.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        net = load_pretrained(model, dtype=torch_dtype, device_map=device_map)
        if adapter is not None:
            from peft import PeftModel  # lazy: slow import, LoRA only

            if not (Path(adapter) / "adapter_config.json").is_file() and Path(adapter).exists():
                raise SuiteError(f"adapter {adapter} has no adapter_config.json")
            net = PeftModel.from_pretrained(net, adapter).merge_and_unload()
        tok_src = model
        if not _has_tokenizer(model) and adapter is not None and _has_tokenizer(adapter):
            tok_src = adapter
        tokenizer = AutoTokenizer.from_pretrained(tok_src)
    except OSError as exc:
        raise SuiteError(f"cannot load model {model!r}"
                         f"{f' with adapter {adapter!r}' if adapter else ''}: {exc}") from None
    if device_map is None:
        net.to(dev)
    net.eval()
    net.requires_grad_(False)
    return net, tokenizer


def _has_tokenizer(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def make_lm(model: Any, tokenizer: Any, cfg: EvalConfig) -> Any:
    """Wrap a loaded HF model in lm-eval's HFLM (its own batching and scoring code)."""
    from lm_eval.models.huggingface import HFLM  # lazy: optional extra [eval]

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)


# ----------------------------------------------------------------------------- protocol
def _task_manager(suite: Suite, metadata: dict[str, str]) -> Any:
    from lm_eval.tasks import TaskManager  # lazy: optional extra [eval]

    include = [str(TASKS_DIR), *suite.include_paths] if suite.include_paths else str(TASKS_DIR)
    return TaskManager(include_path=include, include_defaults=suite.hub, metadata=metadata)


def load_tasks(suite: Suite, cfg: EvalConfig) -> tuple[Any, list[Any], dict[str, list[Any]]]:
    """(task manager, top-level task/group objects, leaves per suite task), few-shot set."""
    _quiet_lm_eval()
    from lm_eval.api.group import Group  # lazy: optional extra [eval]

    tm = _task_manager(suite, task_metadata(suite, cfg))
    objs: list[Any] = []
    leaves: dict[str, list[Any]] = {}
    for st in suite.tasks:
        loaded = tm.load([bigbench_task_config(st) if st.bigbench_json else st.name])
        if st.name in loaded["groups"]:
            obj = loaded["groups"][st.name]
            assert isinstance(obj, Group)
            members = list(obj.get_all_tasks())
        elif st.name in loaded["tasks"]:
            obj = loaded["tasks"][st.name]
            members = [obj]
        else:  # pragma: no cover - lm-eval raises first for unknown names
            raise SuiteError(f"lm-eval did not load task {st.name!r}")
        for task in members:
            task.set_config(key="num_fewshot", value=st.num_fewshot)
        objs.append(obj)
        leaves[st.name] = members
    return tm, objs, leaves


def build_protocol(suite: Suite, cfg: EvalConfig, leaves: dict[str, list[Any]]) -> dict[str, Any]:
    """Everything that decides a score, and nothing about where files live."""
    import lm_eval  # lazy: optional extra [eval]

    limit = suite.effective_limit(cfg)
    tasks = []
    for st in suite.tasks:
        members = sorted(leaves[st.name], key=lambda t: t.task_name)
        cfg_digests = {t.task_name: task_config_digest(t.dump_config()) for t in members}
        data = {}
        n_docs = 0
        for t in members:
            digest, n = docs_digest(t.eval_docs)
            data[t.task_name] = digest
            n_docs += n
        entry: dict[str, Any] = {
            "name": st.name,
            "metric": st.metric,
            "num_fewshot": st.num_fewshot,
            "versions": {t.task_name: t.VERSION for t in members},
            "config_sha256": sha256_text("".join(f"{k}={v};" for k, v in
                                                 sorted(cfg_digests.items()))),
            "data_sha256": sha256_text("".join(f"{k}={v};" for k, v in sorted(data.items()))),
            "docs": n_docs,
        }
        if st.limit is not None:  # config suites only: presets keep their protocol
            entry["limit"] = suite.task_limit(st, cfg)
        if st.files:
            entry["files"] = dict(st.files)
        tasks.append(entry)
    return {
        "format": PROTOCOL_FORMAT,
        "kind": "lm-eval",
        "suite": suite.name,
        "harness": {"name": "lm-eval", "version": lm_eval.__version__},
        "limit": limit,
        "apply_chat_template": suite.apply_chat_template,
        "fewshot_as_multiturn": suite.fewshot_as_multiturn,
        "system_instruction": suite.system_instruction,
        "fewshot_seed": suite.fewshot_seed,
        "tasks": tasks,
    }


# ------------------------------------------------------------------------------- running
def evaluate_lm(lm: Any, suite: str | Suite, cfg: EvalConfig, *,
                model_info: dict[str, Any] | None = None,
                tasks: tuple[Any, list[Any], dict[str, list[Any]]] | None = None
                ) -> dict[str, Any]:
    """Run `suite` on an lm-eval LM object and return the result dict (not written).

    Used by `run_eval` and by callers that hold a model in memory (in-loop evaluation:
    `evaluate_lm(make_lm(model, tokenizer, cfg), "offline", cfg)`). `tasks` is a
    `load_tasks` result when the caller loaded them already.
    """
    import lm_eval  # lazy: optional extra [eval]

    s = resolve_suite(suite, cfg)
    t0 = time.perf_counter()
    tm, objs, leaves = tasks if tasks is not None else load_tasks(s, cfg)
    protocol = build_protocol(s, cfg, leaves)
    limit = protocol["limit"]
    samples = None
    if s.per_task_limits and cfg.limit is None:  # lm-eval's `limit` is one number for all
        limit = None
        samples = {}
        for st in s.tasks:
            n = s.task_limit(st, cfg)
            for t in leaves[st.name]:
                total = len(t.eval_docs)
                samples[t.task_name] = list(range(total if n is None else min(n, total)))
    log.info("eval suite %s (%s), limit %s, protocol %s", s.name,
             ", ".join(t.name for t in s.tasks), limit, protocol_hash(protocol)[:19])
    res = lm_eval.simple_evaluate(
        model=lm, tasks=objs, task_manager=tm, num_fewshot=None, limit=limit, samples=samples,
        apply_chat_template=s.apply_chat_template,
        fewshot_as_multiturn=s.fewshot_as_multiturn,
        system_instruction=s.system_instruction,
        log_samples=True, bootstrap_iters=1000,
        random_seed=0, numpy_random_seed=1234, torch_random_seed=1234,
        fewshot_random_seed=s.fewshot_seed,
    )
    if res is None:  # non-zero rank in a distributed launch
        return {}
    scores = _scores(s, res)
    per_example = _per_example(s, res, leaves)
    return {
        "schema": EVAL_SCHEMA,
        "suite": s.name,
        "model": dict(model_info or {}),
        "protocol": protocol,
        "protocol_hash": protocol_hash(protocol),
        "scores": scores,
        "per_example": per_example,
        "harness": {"name": "lm-eval", "version": lm_eval.__version__},
        "lm_eval": {
            "results": res.get("results", {}),
            "versions": res.get("versions", {}),
            "n-shot": res.get("n-shot", {}),
            "n-samples": res.get("n-samples", {}),
            "higher_is_better": res.get("higher_is_better", {}),
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t0, 3),
    }


def _scores(s: Suite, res: dict[str, Any]) -> dict[str, Any]:
    results = res.get("results", {})
    samples = res.get("n-samples", {})
    out: dict[str, Any] = {}
    for st in s.tasks:
        row = results.get(st.name)
        if row is None or st.metric not in row:
            have = sorted(k for k in (row or {}) if k != "alias")
            raise EvalError(f"suite {s.name!r} declares metric {st.metric!r} for task "
                            f"{st.name!r}, but lm-eval reported {have or 'no results'}")
        metric, _, filt = st.metric.partition(",")
        stderr = row.get(f"{metric}_stderr,{filt}")
        n = samples.get(st.name, {}).get("effective")
        if n is None:  # a group: sum its members
            n = sum(v.get("effective", 0) for k, v in samples.items()
                    if k in res.get("group_subtasks", {}).get(st.name, []))
        out[st.name] = {
            "metric": st.metric,
            "value": finite_or_none(row[st.metric]),
            "stderr": finite_or_none(stderr) if isinstance(stderr, int | float) else None,
            "samples": n,
        }
    return out


def _per_example(s: Suite, res: dict[str, Any], leaves: dict[str, list[Any]]
                 ) -> dict[str, Any]:
    """Per suite task, each scored example's value of the task's primary metric as
    [leaf task, doc_id, value], sorted by (leaf task, doc_id): the same order for every model
    scored under the same protocol. Documents and model outputs are not kept (size)."""
    samples = res.get("samples") or {}
    out: dict[str, Any] = {}
    for st in s.tasks:
        metric, _, filt = st.metric.partition(",")
        rows = [[t.task_name, int(ex["doc_id"]), finite_or_none(float(ex[metric]))]
                for t in leaves[st.name] for ex in samples.get(t.task_name, [])
                if ex.get("filter") == filt and metric in ex]
        rows.sort(key=lambda r: (r[0], r[1]))
        want = _scored_examples(res, leaves[st.name])
        if len(rows) != want:
            raise EvalError(f"lm-eval logged {len(rows)} {st.metric} samples for task "
                            f"{st.name!r}, expected {want}")
        out[st.name] = {"metric": st.metric, "examples": rows}
    return out


def _scored_examples(res: dict[str, Any], members: list[Any]) -> int:
    """Examples lm-eval scored over `members` (their effective sample counts)."""
    ns = res.get("n-samples", {})
    return sum(int(ns.get(t.task_name, {}).get("effective", 0)) for t in members)


def _result_path(out_path: Path, name: str) -> Path:
    """`out_path` is the JSON file, or a run directory (then <run>/eval/<name>.json)."""
    p = Path(out_path)
    return p if p.suffix == ".json" else p / "eval" / f"{name}.json"


def run_eval(model: str, suite: str | Suite, cfg: EvalConfig, out_path: Path, *,
             device: str = "auto",
             adapter: str | None = None, device_map: str | None = None) -> dict[str, Any]:
    """Evaluate an HF model folder or hub id on a named suite; write eval/<suite>.json.

    `out_path` is the JSON file to write, or a run directory. Data paths are checked and the
    tasks loaded before the model, so bad settings fail in seconds.
    """
    s = resolve_suite(suite, cfg)
    tasks = load_tasks(s, cfg)  # data checked and parsed before any weights are loaded
    net, tokenizer = load_model(model, adapter=adapter, device=device, device_map=device_map)
    lm = make_lm(net, tokenizer, cfg)
    info = {
        "id": model,
        "adapter": adapter,
        "dtype": str(next(net.parameters()).dtype).removeprefix("torch."),
        "device": str(next(net.parameters()).device),
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    result = evaluate_lm(lm, s, cfg, model_info=info, tasks=tasks)
    if not result:  # a non-zero rank of a distributed launch: rank 0 writes
        return result
    target = _result_path(out_path, s.name)
    write_json_atomic(target, result)
    log.info("wrote %s: %s", target, ", ".join(f"{k}={v['value']}"
                                                for k, v in result["scores"].items()))
    return result
