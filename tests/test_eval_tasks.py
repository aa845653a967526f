"""Offline task data: the MMLU JSONL and BIG-bench task.json loaders behind the lm-eval YAMLs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import require_shared
from wattkd.config import EvalConfig
from wattkd.eval.suites import (
    BIGBENCH_TASKS,
    OFFLINE_FULL_BIGBENCH,
    SUITES,
    SuiteError,
    get_suite,
    task_metadata,
)
from wattkd.eval.tasks import TASKS_DIR
from wattkd.eval.tasks.utils import (
    TaskDataError,
    load_bigbench_mc,
    load_mmlu,
    read_bigbench,
    read_mmlu,
)


def _mmlu(tmp_path: Path, rows: list[dict]) -> Path:
    p = tmp_path / "mmlu.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _q(subject: str, i: int, answer: int = 0) -> dict:
    return {"subject": subject, "question": f"{subject} q{i}?", "choices": ["w", "x", "y", "z"],
            "answer": answer}


def test_mmlu_interleaves_subjects_so_a_limit_spreads(tmp_path):
    p = _mmlu(tmp_path, [_q("b", 0), _q("b", 1), _q("b", 2), _q("a", 0), _q("c", 0)])
    rows = read_mmlu(p)
    assert [r["question"] for r in rows] == ["a q0?", "b q0?", "c q0?", "b q1?", "b q2?"]
    assert [r["question"] for r in read_mmlu(p, ["c", "b"])] == [
        "b q0?", "c q0?", "b q1?", "b q2?"]


@pytest.mark.parametrize("row, needle", [
    ({"subject": "a", "question": "q", "choices": ["1", "2", "3"], "answer": 0}, "4 strings"),
    ({"subject": "a", "question": "q", "choices": ["1", "2", "3", "4"], "answer": 4}, "0-3"),
    ({"subject": "a", "question": "q", "choices": ["1", "2", "3", "4"]}, "keys"),
])
def test_mmlu_bad_rows_name_file_line_and_expectation(tmp_path, row, needle):
    p = _mmlu(tmp_path, [_q("a", 0), row])
    with pytest.raises(TaskDataError, match=rf"mmlu.jsonl:2: .*{needle}"):
        read_mmlu(p)


def test_mmlu_unknown_subject_and_missing_file(tmp_path):
    p = _mmlu(tmp_path, [_q("a", 0)])
    with pytest.raises(TaskDataError, match=r"unknown MMLU subject\(s\) \['zz'\].*has: a"):
        read_mmlu(p, ["zz"])
    with pytest.raises(TaskDataError, match="MMLU file not found"):
        read_mmlu(tmp_path / "nope.jsonl")
    with pytest.raises(TaskDataError, match="eval.mmlu_path"):
        load_mmlu(subjects=["a"])  # no path in the metadata


def test_mmlu_real_file_mini_subjects(shared_dir):
    rows = read_mmlu(shared_dir / "data/eval/mmlu_test.jsonl",
                     ["abstract algebra", "marketing"])
    assert len(rows) == 100 + 234
    assert {rows[0]["subject"], rows[1]["subject"]} == {"abstract algebra", "marketing"}


def _bb(tmp_path: Path, spec: dict, name: str = "toy") -> Path:
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    (tmp_path / name / "task.json").write_text(json.dumps(spec))
    return tmp_path


def test_bigbench_mc_uses_bigbench_defaults_and_keeps_ties(tmp_path):
    root = _bb(tmp_path, {"examples": [
        {"input": "Pick", "target_scores": {"b": 0, "a": 1, "c": 1}},
        {"input": "Pick", "target_scores": {"b": 0, "a": 1, "c": 1}},  # duplicate: dropped
        {"input": "Two", "target_scores": {"yes": 0, "no": 1}},
    ]})
    docs = read_bigbench(root, "toy", "mc")
    assert len(docs) == 2
    d = docs[0]
    assert d["choices"] == ["b", "a", "c"]          # scored in target_scores order
    assert d["golds"] == [1, 2] and d["gold"] == 1  # every top-scored choice counts
    assert d["prompt"].startswith("\nQ: Pick\n  choice: ")
    assert d["prompt"].endswith("\nA: ")
    shown = d["prompt"].removeprefix("\nQ: Pick").removesuffix("\nA: ").split("\n  choice: ")
    assert sorted(shown[1:]) == ["a", "b", "c"]      # all choices listed, permuted
    assert d["task_prefix"] == ""


def test_bigbench_custom_prefixes_and_no_appended_choices(tmp_path):
    root = _bb(tmp_path, {"task_prefix": "Decide.\n", "example_input_prefix": "\nS: ",
                          "example_output_prefix": "\nAnswer: ", "append_choices_to_input": False,
                          "examples": [{"input": "x", "target_scores": {"p": 1, "q": 0}}]})
    d = read_bigbench(root, "toy", "mc")[0]
    assert d["prompt"] == "\nS: x\nAnswer: " and d["task_prefix"] == "Decide.\n"


def test_bigbench_generation_targets(tmp_path):
    root = _bb(tmp_path, {"examples": [{"input": "n?", "target": ["three", "3"]},
                                       {"input": "m?", "target": "4"}]})
    docs = read_bigbench(root, "toy", "gen")
    assert [d["targets"] for d in docs] == [["three", "3"], ["4"]]
    assert docs[1]["prompt"] == "\nQ: m?\nA: "


def test_bigbench_errors_are_specific(tmp_path):
    with pytest.raises(TaskDataError, match="toy/task.json"):
        read_bigbench(tmp_path, "toy", "mc")
    root = _bb(tmp_path, {"examples": [{"input": "x", "target": "y"}]})
    with pytest.raises(TaskDataError, match=r"examples\[0\].*target_scores"):
        read_bigbench(root, "toy", "mc")
    with pytest.raises(TaskDataError, match="eval.bigbench_dir"):
        load_bigbench_mc(bigbench_task="toy")


def test_every_shipped_bigbench_yaml_loads_its_shared_task(shared_dir):
    root = shared_dir / "data/eval/bigbench"
    assert len(BIGBENCH_TASKS) == 24
    for task, mode in BIGBENCH_TASKS.items():
        docs = read_bigbench(root, task, mode)
        assert docs, task
        if mode == "mc":
            assert all(0 <= g < len(d["choices"]) for d in docs for g in d["golds"])
    assert {t for t, m in BIGBENCH_TASKS.items() if m == "gen"} == {"object_counting",
                                                                    "word_sorting"}


def test_a_packaged_task_joins_a_preset_only_through_its_list():
    """offline-full is its explicit list, in that order (not a glob of tasks/bigbench/: a
    YAML shipped there without a line in the list stays out of every preset, issue 29)."""
    full = [t.name for t in get_suite("offline-full").tasks if t.name.startswith("wattkd_bb_")]
    assert full == [f"wattkd_bb_{t}" for t in OFFLINE_FULL_BIGBENCH]
    assert set(OFFLINE_FULL_BIGBENCH) <= set(BIGBENCH_TASKS)  # each listed task is shipped
    offline = [t.name for t in get_suite("offline").tasks if t.name.startswith("wattkd_bb_")]
    assert offline == ["wattkd_bb_sports_understanding", "wattkd_bb_date_understanding",
                       "wattkd_bb_object_counting"]


def test_shared_data_is_required_in_ci(tmp_path, monkeypatch):
    """Locally a missing ../shared skips its tests; in CI (CI=true) it fails them."""
    missing = tmp_path / "shared"
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_shared(missing)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must provide it"):
        require_shared(missing)
    assert require_shared(tmp_path) == tmp_path


def test_suites_fix_protocol_fields_and_check_data_before_work(tmp_path, shared_dir):
    off = get_suite("offline")
    assert not off.apply_chat_template and all(t.num_fewshot == 0 for t in off.tasks)
    kinds = {t.name: t.metric for t in off.tasks}
    assert kinds["wattkd_bb_object_counting"] == "exact_match,extract"
    assert sum(m == "acc,none" for m in kinds.values()) == 3
    assert {t.name for t in SUITES["seed"].tasks} == {"mmlu", "arc_challenge", "hellaswag",
                                                      "bbh"}
    assert all((TASKS_DIR / "bigbench" / f"{t.name}.yaml").is_file()
               for t in off.tasks if t.name.startswith("wattkd_bb_"))

    with pytest.raises(SuiteError, match="set eval.mmlu_path"):
        task_metadata(off, EvalConfig())
    with pytest.raises(SuiteError, match="eval.mmlu_path .*does not exist"):
        task_metadata(off, EvalConfig(mmlu_path=str(tmp_path / "x.jsonl")))
    mmlu = str(shared_dir / "data/eval/mmlu_test.jsonl")
    with pytest.raises(SuiteError, match="set eval.bigbench_dir"):
        task_metadata(off, EvalConfig(mmlu_path=mmlu))
    (tmp_path / "sports_understanding").mkdir()
    with pytest.raises(SuiteError, match="lacks task.json for: sports_understanding, "
                                         "date_understanding, object_counting"):
        task_metadata(off, EvalConfig(mmlu_path=mmlu, bigbench_dir=str(tmp_path)))
    with pytest.raises(SuiteError, match="known suites: offline, offline-full, seed"):
        get_suite("nope")
    with pytest.raises(SuiteError, match="HF_HUB_OFFLINE"):
        task_metadata(SUITES["seed"], EvalConfig())  # conftest sets the hub offline
