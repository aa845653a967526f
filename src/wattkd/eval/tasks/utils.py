"""Data loaders for wattkd's offline lm-eval tasks (local MMLU JSONL, BIG-bench task.json).

lm-eval calls these through `custom_dataset: !function wattkd.eval.tasks.utils.<name>` (the
importable module, so errors raised here are the `TaskDataError` wattkd callers catch) with the
TaskManager's metadata (where wattkd puts the data paths, under the keys below) and the task's
`dataset_kwargs` as keyword arguments. With wattkd installed, the task folder also works with
the plain lm-eval CLI:

    lm_eval --include_path <this folder> --tasks wattkd_mmlu_mini \
            --metadata '{"wattkd_mmlu_path": "/data/mmlu_test.jsonl"}' ...

Formatting follows the original benchmarks (see docs/eval-formats.md): MMLU as in lm-eval's
`mmlu` task; BIG-bench with its json_task defaults (input prefix "\\nQ: ", output prefix
"\\nA: ", choices appended as "\\n  choice: X" in a seeded permutation of the sorted choices).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wattkd.errors import DataError

# The loaders' source is part of the evaluation protocol hash (eval/protocol.py), so their
# bodies stay byte-for-byte as they are: their imports (datasets: slow, only task data needs it;
# numpy) stay inside them.

MMLU_PATH_KEY = "wattkd_mmlu_path"
BIGBENCH_DIR_KEY = "wattkd_bigbench_dir"
TASK_JSON_KEY = "wattkd_task_json"  # dataset_kwargs of a config suite's BIG-bench folder
MMLU_KEYS = ("subject", "question", "choices", "answer")

# BIG-bench json_task defaults, used when a task.json does not set its own.
BB_INPUT_PREFIX = "\nQ: "
BB_OUTPUT_PREFIX = "\nA: "
BB_CHOICE_PREFIX = "\n  choice: "
BB_CHOICE_SEED = 42


class TaskDataError(DataError, ValueError):
    """Local evaluation data is missing or not in the expected format."""


# ------------------------------------------------------------------------------------- MMLU
def read_mmlu(path: str | Path, subjects: list[str] | None = None) -> list[dict[str, Any]]:
    """Questions of `subjects` (all if None), interleaved subject by subject.

    Round-robin order (sorted subjects, file order inside a subject) makes a `limit` take a
    spread of subjects instead of the first subject only.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise TaskDataError(f"MMLU file not found: {p} (expected a JSONL of "
                            "{subject, question, choices, answer}; set eval.mmlu_path)")
    by_subject: dict[str, list[dict[str, Any]]] = {}
    with p.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskDataError(f"{p}:{n}: not valid JSON ({exc.msg})") from None
            by_subject.setdefault(_check_mmlu_row(row, p, n)["subject"], []).append(row)
    if not by_subject:
        raise TaskDataError(f"{p}: no questions found")
    wanted = sorted(by_subject) if subjects is None else list(subjects)
    unknown = [s for s in wanted if s not in by_subject]
    if unknown:
        raise TaskDataError(f"{p}: unknown MMLU subject(s) {unknown}; the file has: "
                            f"{', '.join(sorted(by_subject))}")
    out: list[dict[str, Any]] = []
    queues = [list(by_subject[s]) for s in sorted(wanted)]
    i = 0
    while any(queues):
        for q in queues:
            if i < len(q):
                out.append(q[i])
        i += 1
        queues = [q for q in queues if i < len(q)]
    return out


def _check_mmlu_row(row: Any, p: Path, n: int) -> dict[str, Any]:
    where = f"{p}:{n}"
    if not isinstance(row, dict) or any(k not in row for k in MMLU_KEYS):
        raise TaskDataError(f"{where}: expected an object with keys {list(MMLU_KEYS)}")
    choices, answer = row["choices"], row["answer"]
    if not (isinstance(choices, list) and len(choices) == 4
            and all(isinstance(c, str) for c in choices)):
        raise TaskDataError(f"{where}: 'choices' must be a list of 4 strings")
    if not (isinstance(answer, int) and 0 <= answer < 4):
        raise TaskDataError(f"{where}: 'answer' must be an integer 0-3, got {answer!r}")
    if not isinstance(row["question"], str) or not isinstance(row["subject"], str):
        raise TaskDataError(f"{where}: 'question' and 'subject' must be strings")
    return row


def load_mmlu(**kwargs: Any) -> Any:
    """lm-eval `custom_dataset` hook: {'test': Dataset} of MMLU questions."""
    path = kwargs.get(MMLU_PATH_KEY)
    if not path:
        raise TaskDataError(f"no MMLU file given: pass metadata {{'{MMLU_PATH_KEY}': path}} "
                            "(wattkd: set eval.mmlu_path)")
    rows = read_mmlu(path, kwargs.get("subjects"))
    import datasets

    rows = [{k: r[k] for k in MMLU_KEYS} for r in rows]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


# --------------------------------------------------------------------------------- BIG-bench
def bigbench_task_path(root: str | Path, task: str) -> Path:
    p = Path(root).expanduser() / task / "task.json"
    if not p.is_file():
        raise TaskDataError(f"BIG-bench task file not found: {p} (expected "
                            "<bigbench_dir>/<task>/task.json; set eval.bigbench_dir)")
    return p


def read_bigbench(root: str | Path, task: str, mode: str) -> list[dict[str, Any]]:
    """Examples of one BIG-bench task as flat docs, formatted the way BIG-bench does.

    mode "mc": each doc has `prompt`, `choices` (target_scores order), `golds` (indices of every
    choice with the top score; ties all count, as BIG-bench's multiple_choice_grade does) and
    `gold` (the first of them, used to render few-shot answers).
    mode "gen": each doc has `prompt` and `targets` (any of them is a correct answer).
    """
    return read_bigbench_file(bigbench_task_path(root, task), mode)


def read_bigbench_file(p: Path, mode: str) -> list[dict[str, Any]]:
    """`read_bigbench` of one task.json file, wherever it is (see read_bigbench)."""
    import numpy as np

    try:
        spec = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TaskDataError(f"{p}: not valid JSON ({exc.msg})") from None
    examples = spec.get("examples") if isinstance(spec, dict) else None
    if not isinstance(examples, list) or not examples:
        raise TaskDataError(f"{p}: expected an object with a non-empty 'examples' list")
    in_prefix = str(spec.get("example_input_prefix", BB_INPUT_PREFIX))
    out_prefix = str(spec.get("example_output_prefix", BB_OUTPUT_PREFIX))
    choice_prefix = str(spec.get("choice_prefix", BB_CHOICE_PREFIX))
    append_choices = bool(spec.get("append_choices_to_input", True))
    task_prefix = str(spec.get("task_prefix", ""))

    docs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, ex in enumerate(examples):
        key = json.dumps(ex, sort_keys=True)
        if key in seen:  # BIG-bench de-duplicates examples too
            continue
        seen.add(key)
        where = f"{p}: examples[{i}]"
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            raise TaskDataError(f"{where}: expected an object with a string 'input'")
        doc: dict[str, Any] = {"idx": i, "task_prefix": task_prefix, "input": ex["input"]}
        if mode == "mc":
            scores = ex.get("target_scores")
            if not isinstance(scores, dict) or len(scores) < 2:
                raise TaskDataError(f"{where}: multiple choice needs 'target_scores' with at "
                                    "least 2 choices")
            choices = list(scores)
            top = max(scores.values())
            golds = [j for j, c in enumerate(choices) if scores[c] == top]
            text = in_prefix + ex["input"]
            if append_choices:
                rng = np.random.RandomState(seed=BB_CHOICE_SEED)
                shown = [str(c) for c in rng.permutation(sorted(choices))]
                text += choice_prefix + choice_prefix.join(shown)
            doc.update(prompt=text + out_prefix, choices=choices, golds=golds, gold=golds[0])
        elif mode == "gen":
            target = ex.get("target")
            targets = target if isinstance(target, list) else [target]
            if not targets or not all(isinstance(t, str) for t in targets):
                raise TaskDataError(f"{where}: generation needs a string (or list of strings) "
                                    "'target'")
            doc.update(prompt=in_prefix + ex["input"] + out_prefix, targets=targets)
        else:
            raise TaskDataError(f"unknown BIG-bench mode {mode!r}; expected 'mc' or 'gen'")
        docs.append(doc)
    return docs


def _load_bigbench(mode: str, kwargs: dict[str, Any]) -> Any:
    root = kwargs.get(BIGBENCH_DIR_KEY)
    task = kwargs.get("bigbench_task")
    if not root:
        raise TaskDataError(f"no BIG-bench folder given: pass metadata "
                            f"{{'{BIGBENCH_DIR_KEY}': path}} (wattkd: set eval.bigbench_dir)")
    if not task:
        raise TaskDataError("task YAML lacks dataset_kwargs.bigbench_task")
    docs = read_bigbench(root, task, mode)
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def load_bigbench_mc(**kwargs: Any) -> Any:
    """lm-eval `custom_dataset` hook for BIG-bench multiple choice (target_scores)."""
    return _load_bigbench("mc", kwargs)


def load_bigbench_gen(**kwargs: Any) -> Any:
    """lm-eval `custom_dataset` hook for BIG-bench generation (target)."""
    return _load_bigbench("gen", kwargs)



def _load_bigbench_file(mode: str, kwargs: dict[str, Any]) -> Any:
    path = kwargs.get(TASK_JSON_KEY)
    if not path:
        raise TaskDataError(f"no task.json given: pass dataset_kwargs {{'{TASK_JSON_KEY}': path}}")
    p = Path(path)
    if not p.is_file():
        raise TaskDataError(f"BIG-bench task file not found: {p}")
    docs = read_bigbench_file(p, mode)
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def load_bigbench_file_mc(**kwargs: Any) -> Any:
    """lm-eval `custom_dataset` hook: one BIG-bench folder (multiple choice) of a config suite."""
    return _load_bigbench_file("mc", kwargs)


def load_bigbench_file_gen(**kwargs: Any) -> Any:
    """lm-eval `custom_dataset` hook: one BIG-bench folder (generation) of a config suite."""
    return _load_bigbench_file("gen", kwargs)
