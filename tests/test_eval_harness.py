"""lm-eval end to end on a tiny real model: offline MMLU + BIG-bench MC + BIG-bench generation.

Accuracy is computed by lm-eval itself. A planted model (the real tiny model plus a large bonus
on the answer the raw data marks correct, looked up without wattkd's loaders) must score 1.0;
the same bonus on wrong answers must score 0.0, so the wiring cannot pass by accident.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_eval_common import build_model, build_tokenizer, one_thread, save_model_dir
from wattkd.config import EvalConfig
from wattkd.eval import (
    ProtocolMismatch,
    SuiteError,
    compare_protocols,
    evaluate_lm,
    get_suite,
    protocol_hash,
    run_eval,
)

LIMIT = 5

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def eval_cfg(shared_dir) -> EvalConfig:
    return EvalConfig(limit=LIMIT, batch_size=8,
                      mmlu_path=str(shared_dir / "data/eval/mmlu_test.jsonl"),
                      bigbench_dir=str(shared_dir / "data/eval/bigbench"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def e2e(model_dir, eval_cfg, tmp_path_factory) -> tuple[dict, Path]:
    run = tmp_path_factory.mktemp("run")
    return run_eval(str(model_dir), "offline", eval_cfg, run, device="cpu"), run


# ------------------------------------------------------------------ planted-answer model
class AnswerKey:
    """Correct answers read straight from the raw files (not through wattkd's loaders)."""

    def __init__(self, shared: Path, suite_tasks: list[str]) -> None:
        self.mmlu: dict[tuple, str] = {}
        for line in (shared / "data/eval/mmlu_test.jsonl").read_text().splitlines():
            r = json.loads(line)
            self.mmlu[(r["question"], tuple(r["choices"]))] = " " + "ABCD"[r["answer"]]
        self.mc: dict[str, dict[str, set[str]]] = {}
        self.gen: dict[str, dict[str, list[str]]] = {}
        for name in suite_tasks:
            if not name.startswith("wattkd_bb_"):
                continue
            task = name.removeprefix("wattkd_bb_")
            spec = json.loads((shared / "data/eval/bigbench" / task / "task.json").read_text())
            for ex in spec["examples"]:
                if "target_scores" in ex:
                    top = max(ex["target_scores"].values())
                    self.mc.setdefault(name, {})[ex["input"]] = {
                        c for c, s in ex["target_scores"].items() if s == top}
                else:
                    t = ex["target"]
                    self.gen.setdefault(name, {})[ex["input"]] = t if isinstance(t, list) else [t]

    def correct(self, req) -> bool:
        ctx, cont = req.args
        doc = req.doc
        if req.task_name.startswith("wattkd_mmlu"):
            assert doc["question"].strip() in ctx
            return cont == self.mmlu[(doc["question"], tuple(doc["choices"]))]
        assert doc["input"] in ctx
        return cont in self.mc[req.task_name][doc["input"]]

    def answer(self, req) -> str:
        assert req.doc["input"] in req.args[0]
        return self.gen[req.task_name][req.doc["input"]][0]


def planted_lm(model, tok, key: AnswerKey, *, wrong: bool):
    from lm_eval.models.huggingface import HFLM

    class Planted(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            base = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
            return [(ll + (1000.0 if key.correct(r) != wrong else 0.0), g)
                    for r, (ll, g) in zip(requests, base, strict=True)]

        def generate_until(self, requests, disable_tqdm: bool = False):
            return [f" {key.answer(r)}.\n" if not wrong else " no idea\n" for r in requests]

    return Planted(pretrained=model, tokenizer=tok, batch_size=8)


@pytest.fixture(scope="module")
def tiny_in_memory():
    tok = build_tokenizer()
    return build_model(tok), tok


# ---------------------------------------------------------------------------------- tests
def test_offline_suite_end_to_end_writes_scored_result(e2e):
    result, run = e2e
    path = run / "eval" / "offline.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["protocol_hash"] == result["protocol_hash"] == protocol_hash(
        on_disk["protocol"])
    assert on_disk["schema"] == "wattkd.eval/1"
    names = [t.name for t in get_suite("offline").tasks]
    assert list(on_disk["scores"]) == names
    for name in names:
        s = on_disk["scores"][name]
        assert s["samples"] == LIMIT
        assert 0.0 <= s["value"] <= 1.0
        assert s["value"] == on_disk["lm_eval"]["results"][name][s["metric"]]
    p = on_disk["protocol"]
    assert p["limit"] == LIMIT and p["apply_chat_template"] is False
    assert p["harness"] == {"name": "lm-eval", "version": on_disk["harness"]["version"]}
    assert {t["name"]: t["num_fewshot"] for t in p["tasks"]} == dict.fromkeys(names, 0)
    assert on_disk["model"]["dtype"] == "float32" and on_disk["model"]["device"] == "cpu"
    assert not list((run / "eval").glob(".*"))  # no temp file left behind


def test_result_keeps_every_scored_example_for_pairing(e2e):
    """Per task, [task, doc_id, value] for each scored example, in doc order; their mean is
    lm-eval's score, so the report can pair two models example by example."""
    result, run = e2e
    on_disk = json.loads((run / "eval" / "offline.json").read_text())
    assert on_disk["per_example"] == result["per_example"]
    for name, s in on_disk["scores"].items():
        pe = on_disk["per_example"][name]
        assert pe["metric"] == s["metric"]
        rows = pe["examples"]
        assert len(rows) == s["samples"] == LIMIT
        assert [r[:2] for r in rows] == sorted(r[:2] for r in rows)
        assert {r[0] for r in rows} == {name} and len({r[1] for r in rows}) == LIMIT
        assert all(r[2] in (0.0, 1.0) for r in rows)
        assert sum(r[2] for r in rows) / len(rows) == pytest.approx(s["value"])
    assert "samples" not in on_disk["lm_eval"]  # documents and outputs are not stored


def test_planted_model_scores_one_and_wrong_planted_scores_zero(tiny_in_memory, eval_cfg,
                                                                shared_dir, e2e):
    model, tok = tiny_in_memory
    names = [t.name for t in get_suite("offline").tasks]
    key = AnswerKey(shared_dir, names)
    right = evaluate_lm(planted_lm(model, tok, key, wrong=False), "offline", eval_cfg)
    assert {n: s["value"] for n, s in right["scores"].items()} == dict.fromkeys(names, 1.0)
    wrong = evaluate_lm(planted_lm(model, tok, key, wrong=True), "offline", eval_cfg)
    assert {n: s["value"] for n, s in wrong["scores"].items()} == dict.fromkeys(names, 0.0)
    # different models, same protocol: comparable
    compare_protocols(e2e[0], right)
    assert right["protocol_hash"] == e2e[0]["protocol_hash"]


def test_protocol_mismatch_between_real_runs_is_refused(tiny_in_memory, eval_cfg, e2e):
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny_in_memory
    other = evaluate_lm(HFLM(pretrained=model, tokenizer=tok, batch_size=8), "offline",
                        eval_cfg.model_copy(update={"limit": 2}))
    with pytest.raises(ProtocolMismatch, match=r"limit: 5 \(.*\) vs 2 \(.*\)"):
        compare_protocols(e2e[0], other)


def test_bad_settings_fail_before_the_model_is_loaded(tmp_path):
    # the model path does not exist: the data check must speak first
    with pytest.raises(SuiteError, match="set eval.mmlu_path"):
        run_eval(str(tmp_path / "no-model"), "offline", EvalConfig(), tmp_path)
    with pytest.raises(SuiteError, match="unknown eval suite 'mmlu'"):
        run_eval(str(tmp_path / "no-model"), "mmlu", EvalConfig(), tmp_path)
    with pytest.raises(SuiteError, match="HF_HUB_OFFLINE"):
        run_eval(str(tmp_path / "no-model"), "seed", EvalConfig(), tmp_path)


def test_lora_adapter_is_merged_into_the_evaluated_model(model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from wattkd.eval import load_model

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids).logits
    merged, tok = load_model(str(model_dir), adapter=str(tmp_path / "adapter"), device="cpu")
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, plain, atol=1e-3)
    assert not hasattr(merged, "peft_config") and tok.eos_token == "</s>"
    with pytest.raises(SuiteError, match="has no adapter_config.json"):
        load_model(str(model_dir), adapter=str(tmp_path), device="cpu")


def test_a_metric_the_harness_did_not_report_is_an_error():
    from wattkd.eval.harness import EvalError, _scores

    suite = get_suite("offline")
    res = {"results": {t.name: {"alias": t.name, "acc,none": 0.5} for t in suite.tasks},
           "n-samples": {}}
    with pytest.raises(EvalError, match="declares metric 'exact_match,extract' for task "
                                        r"'wattkd_bb_object_counting', but lm-eval reported "
                                        r"\['acc,none'\]"):
        _scores(suite, res)


def test_malformed_data_fails_before_the_model_is_loaded(tmp_path, shared_dir):
    from wattkd.eval.tasks.utils import TaskDataError

    bad = tmp_path / "mmlu.jsonl"
    bad.write_text('{"subject": "marketing", "question": "q", "choices": ["a"], "answer": 0}\n')
    cfg = EvalConfig(mmlu_path=str(bad), bigbench_dir=str(shared_dir / "data/eval/bigbench"))
    with pytest.raises(TaskDataError, match=r"mmlu.jsonl:1: 'choices' must be a list of 4"):
        run_eval(str(tmp_path / "no-model"), "offline", cfg, tmp_path)
