"""The original study's lm-eval output (eval.json) -> wattkd's eval/<suite>.json.

Scores are lm-eval's own figures; the protocol is what the file tells: harness version,
chat template (applied when lm-eval recorded one), few-shot as multi-turn, system instruction,
few-shot seed, limit, and per task its metric, shots, versions and the hash of its task configs
(with the model arguments lm-eval copies into each config's metadata left out). The data hash
is unknown (lm-eval did not record it): null. `fewshot_as_multiturn` changes nothing when every
task of the suite is zero-shot, so it is recorded as null there.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from wattkd.eval.protocol import protocol_hash, task_config_digest
from wattkd.importers.seed_layout import SeedImportError, SeedRequestError

__all__ = ["DEFAULT_TASKS", "SUITE", "eval_doc", "parse_tasks"]

SUITE = "seed"
# the study's four benchmarks and each one's usual primary metric
DEFAULT_TASKS = {"arc_challenge": "acc_norm,none", "hellaswag": "acc_norm,none",
                 "mmlu": "acc,none", "bbh": "exact_match,get-answer"}


def parse_tasks(text: str | None) -> dict[str, str | None]:
    """`arc_challenge,mmlu:acc,none`-style list -> {task: metric or None (the default)}."""
    if not text:
        return dict(DEFAULT_TASKS)
    out: dict[str, str | None] = {}
    for item in [t.strip() for t in text.split(";" if ":" in text else ",") if t.strip()]:
        name, _, metric = item.partition(":")
        out[name.strip()] = metric.strip() or DEFAULT_TASKS.get(name.strip())
    if not out:
        raise SeedRequestError("--tasks is empty; expected e.g. arc_challenge,hellaswag,mmlu")
    return out


def _leaves(doc: dict[str, Any], task: str) -> list[str]:
    subs = (doc.get("group_subtasks") or {}).get(task)
    if not subs:
        return [task]
    return [leaf for s in subs for leaf in _leaves(doc, s)]


def _metric(block: dict[str, Any], wanted: str | None, task: str, rel: str) -> str:
    if wanted:
        if wanted not in block:
            have = [k for k in block if k != "alias" and "_stderr" not in k]
            raise SeedImportError(f"{rel}: task {task!r} has no metric {wanted!r} (it has "
                                  f"{', '.join(have)})")
        return wanted
    keys = [k for k in block if k != "alias" and "_stderr" not in k]
    if not keys:
        raise SeedImportError(f"{rel}: task {task!r} carries no metric")
    return keys[0]


def _model_arg_keys(doc: dict[str, Any]) -> set[str]:
    args = str((doc.get("config") or {}).get("model_args") or "")
    return {a.split("=", 1)[0].strip() for a in args.split(",") if "=" in a}


def _task_config(doc: dict[str, Any], leaf: str, drop: set[str]) -> dict[str, Any]:
    cfg = dict((doc.get("configs") or {}).get(leaf) or {})
    meta = {k: v for k, v in (cfg.get("metadata") or {}).items() if k not in drop}
    cfg["metadata"] = meta
    return cfg


def _protocol(doc: dict[str, Any], tasks: dict[str, str], rel: str) -> dict[str, Any]:
    drop = _model_arg_keys(doc)
    entries, shots_all = [], set()
    for task, metric in tasks.items():
        leaves = _leaves(doc, task)
        shots = sorted({(doc.get("n-shot") or {}).get(leaf) for leaf in leaves} - {None})
        shots_all.update(shots)
        entries.append({
            "name": task, "metric": metric,
            "num_fewshot": shots[0] if len(shots) == 1 else shots,
            "versions": {leaf: (doc.get("versions") or {}).get(leaf) for leaf in leaves},
            "config_sha256": task_config_digest({leaf: _task_config(doc, leaf, drop)
                                                 for leaf in leaves}),
            "data_sha256": None,
            "docs": sum(int(((doc.get("n-samples") or {}).get(leaf) or {}).get("effective") or 0)
                        for leaf in leaves)})
    cfg = doc.get("config") or {}
    few_shot = any(s for s in shots_all)
    return {"kind": "lm-eval", "format": 1, "suite": SUITE,
            "harness": {"name": "lm-eval", "version": doc.get("lm_eval_version")},
            "limit": cfg.get("limit"), "apply_chat_template": bool(doc.get("chat_template")),
            "chat_template_sha256": doc.get("chat_template_sha"),
            "fewshot_as_multiturn": doc.get("fewshot_as_multiturn") if few_shot else None,
            "system_instruction": doc.get("system_instruction"),
            "fewshot_seed": cfg.get("fewshot_seed"), "tasks": entries}


def model_args(doc: dict[str, Any]) -> dict[str, str]:
    args = str((doc.get("config") or {}).get("model_args") or "")
    return dict(a.split("=", 1) for a in args.split(",") if "=" in a)


def eval_doc(doc: dict[str, Any], wanted: dict[str, str | None], rel: str) -> dict[str, Any]:
    """wattkd.eval/1 document of one eval.json (named error for a missing task or metric)."""
    results = doc.get("results")
    if not isinstance(results, dict):
        raise SeedImportError(f"{rel}: no 'results' object (expected lm-eval's output)")
    scores, metrics = {}, {}
    for task, want in wanted.items():
        block = results.get(task)
        if not isinstance(block, dict):
            raise SeedImportError(f"{rel}: task {task!r} is not in its results (it has "
                                  f"{', '.join(sorted(results)[:8])}, ...)")
        m = metrics[task] = _metric(block, want, task, rel)
        name, _, filt = m.partition(",")
        se = block.get(f"{name}_stderr,{filt}") if filt else block.get(f"{name}_stderr")
        samples = sum(int(((doc.get("n-samples") or {}).get(leaf) or {}).get("effective") or 0)
                      for leaf in _leaves(doc, task))
        scores[task] = {"metric": m, "value": block[m],
                        "stderr": se if isinstance(se, int | float) else None,
                        "samples": samples or None}
    proto = _protocol(doc, metrics, rel)
    args = model_args(doc)
    cfg = doc.get("config") or {}
    created = doc.get("date")
    return {"schema": "wattkd.eval/1", "suite": SUITE,
            "model": {"id": args.get("pretrained"), "adapter": args.get("peft"),
                      "lora_merged": False if args.get("peft") else None,
                      "dtype": cfg.get("model_dtype"), "device": cfg.get("device"),
                      "parameters": cfg.get("model_num_parameters")},
            "scores": scores, "protocol": proto, "protocol_hash": protocol_hash(proto),
            "harness": {"name": "lm-eval", "version": doc.get("lm_eval_version")},
            "lm_eval": {k: doc.get(k) for k in ("results", "versions", "n-shot", "n-samples",
                                                "higher_is_better")},
            "created": (datetime.fromtimestamp(created, UTC).isoformat()
                        if isinstance(created, int | float) else None),
            "duration_s": _float(doc.get("total_evaluation_time_seconds")),
            "imported": {"format": "seed", "file": f"{rel}/eval.json",
                         "model_args": cfg.get("model_args"), "batch_size": cfg.get("batch_size")}}


def _float(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None
