"""Protocol lock: hashing is canonical, and any difference is refused with its name."""

from __future__ import annotations

import copy
import json

import pytest

from wattkd.eval.protocol import (
    ProtocolMismatch,
    compare_protocols,
    diff_protocols,
    protocol_hash,
    task_config_digest,
    write_json_atomic,
)


def _protocol(**over) -> dict:
    p = {
        "format": 1, "kind": "lm-eval", "suite": "offline",
        "harness": {"name": "lm-eval", "version": "0.4.13"},
        "limit": 100, "apply_chat_template": False, "fewshot_as_multiturn": False,
        "system_instruction": None, "fewshot_seed": 1234,
        "tasks": [
            {"name": "wattkd_mmlu_mini", "metric": "acc,none", "num_fewshot": 0,
             "versions": {"wattkd_mmlu_mini": 1.0}, "config_sha256": "c1",
             "data_sha256": "d1", "docs": 1166},
            {"name": "wattkd_bb_object_counting", "metric": "exact_match,extract",
             "num_fewshot": 0, "versions": {"wattkd_bb_object_counting": 1.0},
             "config_sha256": "c2", "data_sha256": "d2", "docs": 1000},
        ],
    }
    p.update(over)
    return p


def _result(model: str, protocol: dict) -> dict:
    return {"model": {"id": model}, "protocol": protocol, "protocol_hash": protocol_hash(protocol),
            "scores": {}}


def test_hash_is_canonical_and_sensitive():
    a = _protocol()
    b = json.loads(json.dumps(a, sort_keys=True))  # same content, other key order
    assert protocol_hash(a) == protocol_hash(b)
    assert protocol_hash(a).startswith("sha256:") and len(protocol_hash(a)) == 71
    assert protocol_hash(a) != protocol_hash(_protocol(limit=99))


def test_same_protocol_different_models_compare():
    compare_protocols(_result("teacher", _protocol()), _result("student", _protocol()))


def test_chat_template_on_for_one_side_is_refused_by_name():
    with pytest.raises(ProtocolMismatch) as err:
        compare_protocols(_result("teacher", _protocol(apply_chat_template=True)),
                          _result("student", _protocol()))
    msg = str(err.value)
    assert "apply_chat_template: true (teacher) vs false (student)" in msg
    assert "refusing to compare" in msg and msg.count("\n  - ") == 1


def test_task_level_differences_are_named_by_task():
    b = _protocol()
    b["tasks"][0]["num_fewshot"] = 5
    b["tasks"][1]["data_sha256"] = "other"
    b["harness"]["version"] = "0.4.14"
    with pytest.raises(ProtocolMismatch) as err:
        compare_protocols(_result("t", _protocol()), _result("s", b))
    msg = str(err.value)
    assert "tasks.wattkd_mmlu_mini.num_fewshot: 0 (t) vs 5 (s)" in msg
    assert "tasks.wattkd_bb_object_counting.data_sha256: d2 (t) vs other (s)" in msg
    assert "harness.version: 0.4.13 (t) vs 0.4.14 (s)" in msg


def test_missing_task_is_named():
    b = _protocol()
    del b["tasks"][1]
    diffs = {k: (x, y) for k, x, y in diff_protocols(_protocol(), b)}
    assert diffs["tasks.wattkd_bb_object_counting"][1] == "<absent>"


def test_edited_file_and_missing_protocol_are_refused():
    r = _result("student", _protocol())
    forged = copy.deepcopy(r)
    forged["protocol"]["limit"] = 5  # edited without re-hashing
    with pytest.raises(ProtocolMismatch, match="student: recorded protocol_hash .* file was "
                                               "edited"):
        compare_protocols(_result("teacher", _protocol()), forged)
    with pytest.raises(ProtocolMismatch, match="old: no evaluation protocol recorded"):
        compare_protocols({"model": {"id": "old"}, "scores": {}}, r)


def test_bare_protocols_and_same_names():
    with pytest.raises(ProtocolMismatch, match=r"limit: 100 \(m \(a\)\) vs 1 \(m \(b\)\)"):
        compare_protocols(_result("m", _protocol()), _result("m", _protocol(limit=1)))
    compare_protocols(_protocol(), _protocol())


def test_task_config_digest_ignores_machine_paths():
    cfg = {"task": "x", "doc_to_text": "q", "metadata": {"version": 1.0,
                                                         "config_source": "/home/a/x.yaml",
                                                         "wattkd_mmlu_path": "/data/a.jsonl"}}
    moved = copy.deepcopy(cfg)
    moved["metadata"].update(config_source="/other/x.yaml", wattkd_mmlu_path="/b.jsonl")
    assert task_config_digest(cfg) == task_config_digest(moved)
    moved["metadata"]["version"] = 2.0
    assert task_config_digest(cfg) != task_config_digest(moved)


def test_write_json_atomic_nulls_nan(tmp_path):
    import numpy as np

    p = write_json_atomic(tmp_path / "eval" / "x.json",
                          {"a": float("nan"), "b": np.float64(0.5), "c": [float("inf")]})
    assert json.loads(p.read_text()) == {"a": None, "b": 0.5, "c": [None]}
    assert [f.name for f in p.parent.iterdir()] == ["x.json"]
