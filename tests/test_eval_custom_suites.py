"""Suites written in the experiment YAML (eval.suite: {tasks: [...]}), through the real lm-eval.

Each task source (a local BIG-bench folder wattkd ships no YAML for, a user's lm-eval YAML
from eval.include_path, a wattkd task by name), each refusal at config load, the protocol lock
on everything a suite contains, and the presets' protocol hashes pinned as they were before
config suites existed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from test_eval_common import build_model, build_tokenizer, one_thread, save_model_dir
from wattkd.cli import app
from wattkd.config import ConfigError, EvalConfig, validate
from wattkd.eval import ProtocolMismatch, compare_protocols, evaluate_lm, get_suite, run_eval
from wattkd.eval.custom import resolve_suite
from wattkd.eval.harness import build_protocol, load_tasks
from wattkd.eval.protocol import protocol_hash

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

# Computed on main at 8c30546 (before config suites) with lm-eval 0.4.13 and ../shared data.
PRESET_HASHES = {
    "offline": "sha256:e0dfd45df611fea797bc9fd6f3e10b31afd1986fdb5e872078a49f24beb920fd",
    "offline@limit5": "sha256:6943fc693da7e01656e6ee9f3d0272e998ed0b261cca4b635786c0d1cdd3e981",
    "offline-full": "sha256:89141678cfd263f2101a3ae617db948bfa7742bce89fa92461c741e9d48623f1",
    "offline-full@limit5":
        "sha256:a1aca61e809f31c576ccb48d207449d1347157a3fbd2032c3b19492c8412358b",
}

ARITH = [  # the include-path task's data: question, choices, index of the right one
    ("2 + 2 =", ["4", "5", "22"], 0), ("3 + 4 =", ["1", "7", "34"], 1),
    ("1 + 1 =", ["11", "3", "2"], 2), ("5 + 0 =", ["5", "0", "50"], 0),
]


def _trimmed_copy(src: Path, dst: Path, n: int) -> Path:
    """A BIG-bench folder under a new name, first `n` examples: a task wattkd has never seen."""
    spec = json.loads((src / "task.json").read_text())
    spec["examples"] = spec["examples"][:n]
    dst.mkdir(parents=True)
    (dst / "task.json").write_text(json.dumps(spec))
    return dst


@pytest.fixture(scope="module")
def sources(shared_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    bb = shared_dir / "data/eval/bigbench"
    mc = _trimmed_copy(bb / "winowhy", root / "bb" / "why_not", 12)
    gen = _trimmed_copy(bb / "word_sorting", root / "bb" / "sorting", 12)
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "arith.jsonl").write_text("".join(
        json.dumps({"question": q, "choices": c, "label": a}) + "\n" for q, c, a in ARITH))
    (tasks / "arith.yaml").write_text(f"""\
task: my_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / 'arith.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
""")
    return {"mc": mc, "gen": gen, "include": tasks, "bigbench_dir": bb,
            "mmlu": shared_dir / "data/eval/mmlu_test.jsonl"}


def suite_eval(sources, **suite) -> EvalConfig:
    spec = {"name": "mine", "limit": 3, "tasks": [
        {"bigbench": str(sources["mc"]), "limit": 5},
        {"bigbench": str(sources["gen"])},
        {"task": "my_arith", "metric": "acc_norm,none"},
        {"task": "wattkd_bb_sports_understanding", "limit": 2},
    ]}
    spec.update(suite)
    return EvalConfig(suite=spec, include_path=str(sources["include"]),
                      bigbench_dir=str(sources["bigbench_dir"]), batch_size=8)


def experiment(ev: dict) -> dict:
    return {"name": "t", "teacher": {"model": "x"}, "student": {"build": {"model_type": "llama"}},
            "eval": ev}


# ------------------------------------------------------------------------------- presets
def test_preset_protocol_hashes_are_unchanged(shared_dir):
    import lm_eval

    if lm_eval.__version__ != "0.4.13":
        pytest.skip(f"hashes pinned under lm-eval 0.4.13 (the protocol records the harness "
                    f"version); this is {lm_eval.__version__}")
    cfg = EvalConfig(mmlu_path=str(shared_dir / "data/eval/mmlu_test.jsonl"),
                     bigbench_dir=str(shared_dir / "data/eval/bigbench"))
    for name in ("offline", "offline-full"):
        suite = get_suite(name)
        _, _, leaves = load_tasks(suite, cfg)
        assert protocol_hash(build_protocol(suite, cfg, leaves)) == PRESET_HASHES[name]
        limited = cfg.model_copy(update={"limit": 5})
        assert protocol_hash(build_protocol(suite, limited, leaves)) == \
            PRESET_HASHES[f"{name}@limit5"]
    seed = get_suite("seed")  # hub data: pinned by its definition
    assert [(t.name, t.metric, t.num_fewshot, t.limit, t.files) for t in seed.tasks] == [
        ("mmlu", "acc,none", 5, None, ()), ("arc_challenge", "acc_norm,none", 25, None, ()),
        ("hellaswag", "acc_norm,none", 10, None, ()), ("bbh", "exact_match,get-answer", 3, None,
                                                       ())]
    assert seed.hub and seed.limit is None and not seed.include_paths


# --------------------------------------------------------------------- each task source
class Planted:
    """Right answers read from the raw files (not through wattkd's loaders)."""

    def __init__(self, sources) -> None:
        self.mc = {}
        for ex in json.loads((sources["mc"] / "task.json").read_text())["examples"]:
            top = max(ex["target_scores"].values())
            self.mc[ex["input"]] = {c for c, s in ex["target_scores"].items() if s == top}
        self.gen = {ex["input"]: ex["target"] for ex in
                    json.loads((sources["gen"] / "task.json").read_text())["examples"]}
        sports = sources["bigbench_dir"] / "sports_understanding" / "task.json"
        for ex in json.loads(sports.read_text())["examples"]:
            top = max(ex["target_scores"].values())
            self.mc[ex["input"]] = {c for c, s in ex["target_scores"].items() if s == top}
        self.arith = {q: " " + c[a] for q, c, a in ARITH}

    def correct(self, req) -> bool:
        cont, doc = req.args[1], req.doc
        if req.task_name == "my_arith":
            return cont == self.arith[doc["question"]]
        return cont in self.mc[doc["input"]]

    def lm(self, model, tok, wrong: bool):
        from lm_eval.models.huggingface import HFLM

        key = self

        class LM(HFLM):
            def loglikelihood(self, requests, disable_tqdm: bool = False):
                base = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
                return [(ll + (1000.0 if key.correct(r) != wrong else 0.0), g)
                        for r, (ll, g) in zip(requests, base, strict=True)]

            def generate_until(self, requests, disable_tqdm: bool = False):
                return [" nothing\n" if wrong else f" {key.gen[r.doc['input']]}.\n"
                        for r in requests]

        return LM(pretrained=model, tokenizer=tok, batch_size=8)


def test_each_task_source_is_scored_by_lm_eval(sources, tmp_path):
    ev = suite_eval(sources)
    model_dir = save_model_dir(tmp_path / "model")
    result = run_eval(str(model_dir), ev.suite.name, ev, tmp_path / "run", device="cpu")
    on_disk = json.loads((tmp_path / "run" / "eval" / "mine.json").read_text())
    assert on_disk["protocol_hash"] == result["protocol_hash"] == protocol_hash(
        on_disk["protocol"])
    scores = on_disk["scores"]
    assert list(scores) == ["why_not", "sorting", "my_arith", "wattkd_bb_sports_understanding"]
    assert {k: v["samples"] for k, v in scores.items()} == {
        "why_not": 5, "sorting": 3, "my_arith": 3, "wattkd_bb_sports_understanding": 2}
    assert [v["metric"] for v in scores.values()] == [
        "acc,none", "exact_match,extract", "acc_norm,none", "acc,none"]
    tasks = {t["name"]: t for t in on_disk["protocol"]["tasks"]}
    assert set(tasks["why_not"]["files"]) == {"task.json"}
    assert set(tasks["my_arith"]["files"]) == {"arith.yaml"}
    assert tasks["why_not"]["limit"] == 5 and "limit" not in tasks["sorting"]
    assert "files" not in tasks["wattkd_bb_sports_understanding"]

    # planted answers (from the raw files) score 1.0, planted wrong answers 0.0
    tok = build_tokenizer()
    model = build_model(tok)
    key = Planted(sources)
    right = evaluate_lm(key.lm(model, tok, wrong=False), ev.suite.name, ev)
    assert {k: v["value"] for k, v in right["scores"].items()} == dict.fromkeys(scores, 1.0)
    wrong = evaluate_lm(key.lm(model, tok, wrong=True), ev.suite.name, ev)
    assert {k: v["value"] for k, v in wrong["scores"].items()} == dict.fromkeys(scores, 0.0)
    compare_protocols(result, right)  # other model, same protocol


def test_detected_kind_and_paths_do_not_enter_the_hash(sources, tmp_path):
    ev = suite_eval(sources)
    suite = resolve_suite(ev.suite, ev)
    assert [t.mode for t in suite.tasks[:2]] == ["mc", "gen"] and not suite.hub
    moved = shutil.copytree(sources["mc"], tmp_path / "elsewhere" / "why_not")
    ev2 = suite_eval(sources, tasks=[{"bigbench": str(moved), "limit": 5},
                                     *ev.suite.model_dump()["tasks"][1:]])
    p1 = build_protocol(suite, ev, load_tasks(suite, ev)[2])
    s2 = resolve_suite(ev2.suite, ev2)
    assert protocol_hash(p1) == protocol_hash(build_protocol(s2, ev2, load_tasks(s2, ev2)[2]))


# ---------------------------------------------------------------------- protocol lock
@pytest.mark.parametrize("change, key", [
    ({"tasks.0.num_fewshot": 1}, "tasks.why_not.num_fewshot"),
    ({"tasks.0.limit": 4}, "tasks.why_not.limit"),
    ({"limit": 2}, "limit"),
    ({"system_instruction": "Answer briefly."}, "system_instruction"),
    ({"fewshot_seed": 7}, "fewshot_seed"),
    ({"edit_task_json": True}, "tasks.why_not.files.task.json"),
    ({"drop_task": 2}, "tasks.my_arith"),
])
def test_suite_differences_are_refused_by_name(sources, tmp_path, change, key):
    def protocol(ev):
        s = resolve_suite(ev.suite, ev)
        return build_protocol(s, ev, load_tasks(s, ev)[2])

    base = protocol(suite_eval(sources))
    spec = suite_eval(sources).suite.model_dump()
    if change.get("edit_task_json"):
        folder = shutil.copytree(sources["mc"], tmp_path / "why_not")
        data = json.loads((folder / "task.json").read_text())
        data["examples"][0]["input"] += " (edited)"
        (folder / "task.json").write_text(json.dumps(data))
        spec["tasks"][0]["bigbench"] = str(folder)
    elif "drop_task" in change:
        del spec["tasks"][change["drop_task"]]
    else:
        for dotted, value in change.items():
            node, *path = dotted.split(".")
            if node == "tasks":
                spec["tasks"][int(path[0])][path[1]] = value
            else:
                spec[node] = value
    other = protocol(suite_eval(sources, **spec))
    with pytest.raises(ProtocolMismatch) as err:
        compare_protocols(base, other, names=("teacher", "student"))
    assert f"  - {key}:" in str(err.value)


# ------------------------------------------------------------------- refusals at load
def _refused(ev: dict, *needles: str) -> str:
    with pytest.raises(ConfigError) as err:
        validate(experiment(ev), "study.yaml")
    msg = str(err.value)
    assert "study.yaml" in msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_bad_task_json_is_refused_with_file_and_field(sources, tmp_path):
    missing = tmp_path / "nothing_here"
    missing.mkdir()
    _refused({"suite": {"tasks": [{"bigbench": str(missing)}]}},
             "eval.suite.tasks.0", str(missing / "task.json"), "not found")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "task.json").write_text('{"examples": [')
    _refused({"suite": {"tasks": [{"bigbench": str(broken)}]}}, "broken/task.json",
             "not valid JSON")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "task.json").write_text(json.dumps({"examples": [
        {"input": "a", "target": "b"}, {"input": "c", "answer": "d"}]}))
    _refused({"suite": {"tasks": [{"bigbench": str(mixed)}]}}, "examples[1]",
             "'target_scores'", "'target'")
    one_choice = tmp_path / "one_choice"
    one_choice.mkdir()
    (one_choice / "task.json").write_text(json.dumps({"examples": [
        {"input": "a", "target_scores": {"yes": 1}}]}))
    _refused({"suite": {"tasks": [{"bigbench": str(one_choice)}]}}, "examples[0]",
             "'target_scores' with at least 2 choices")


def test_a_metric_the_task_does_not_produce_is_refused(sources):
    _refused({"suite": {"tasks": [{"bigbench": str(sources["mc"]),
                                   "metric": "exact_match,extract"}]}},
             "multiple choice task", "'acc,none'", "not 'exact_match,extract'")
    _refused({"include_path": [str(sources["include"])],
              "suite": {"tasks": [{"task": "my_arith", "metric": "f1,none"}]}},
             "task 'my_arith' does not produce metric 'f1,none'", "acc,none, acc_norm,none")


def test_unknown_names_hub_offline_and_shape_are_refused(sources, monkeypatch):
    _refused({"suite": "holdout"}, "eval.suite: unknown suite 'holdout'", "offline-full")
    _refused({"suite": {"tasks": [{"task": "hellaswagg"}]}},
             "unknown lm-eval task 'hellaswagg'", "closest: hellaswag")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _refused({"suite": {"tasks": [{"task": "arc_easy"}]}}, "eval.suite.tasks.0",
             "'arc_easy' comes from lm-eval's registry", "HF_HUB_OFFLINE")
    _refused({"suite": {"tasks": [{"task": "x", "bigbench": "y"}]}},
             "eval.suite.tasks.0: Value error, a suite task sets exactly one of")
    _refused({"suite": {"tasks": [{"bigbench": "y", "metrc": "acc,none"}]}},
             "eval.suite.tasks.0.metrc: unknown key; expected one of: bigbench, limit, metric")
    _refused({"suite": 5}, "eval.suite: Input should be a valid dictionary")
    one = {"bigbench": str(sources["mc"])}
    _refused({"suite": {"name": "a", "tasks": [one]},
              "train_suite": {"name": "a", "limit": 2, "tasks": [one]}},
             "eval.train_suite.name: 'a' is eval.suite's name")
    _refused({"suite": {"name": "offline", "tasks": [{"bigbench": str(sources["mc"])}]}},
             "is a preset's name")
    _refused({"include_path": "/no/such/dir", "suite": {"tasks": [{"task": "my_arith"}]}},
             "eval.include_path /no/such/dir: not a folder")


def test_hub_tasks_resolve_when_online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    ev = EvalConfig(suite={"name": "hub", "tasks": [{"task": "arc_easy", "num_fewshot": 25},
                                                   {"task": "mmlu"}]})
    s = resolve_suite(ev.suite, ev)
    assert s.hub and [(t.name, t.metric, t.num_fewshot) for t in s.tasks] == [
        ("arc_easy", "acc,none", 25), ("mmlu", "acc,none", 0)]


# ---------------------------------------------------------------------------------- CLI
def test_cli_prints_one_error_line_and_lists_tasks(sources, tmp_path):
    import yaml

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(experiment({"suite": {"tasks": [
        {"bigbench": str(tmp_path / "nope")}]}})))
    res = CliRunner().invoke(app, ["eval", "some-model", "--config", str(bad)])
    assert res.exit_code == 2 and res.output.startswith("error: invalid config")
    assert "Traceback" not in res.output
    res = CliRunner().invoke(app, ["eval", "some-model", "--suite", "holdout"])
    assert res.exit_code == 2 and "error: unknown eval suite 'holdout'" in res.output
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(experiment({
        "include_path": [str(sources["include"])], "bigbench_dir": str(sources["mc"].parent),
        "suite": None})))
    res = CliRunner().invoke(app, ["eval", "--list-tasks", "--config", str(good)])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "wattkd_bb_sports_understanding" in out and "wattkd_mmlu_mini" in out
    assert f"eval.include_path {sources['include']}" in out and "  my_arith" in out
    assert f"{sources['mc']}  (multiple choice, 12 examples)" in out
    assert f"{sources['gen']}  (generative, 12 examples)" in out
    assert "  hellaswag\n" in out and "  mmlu  (group)" in out


def test_in_training_suite_is_prepared_before_training_and_refused_with_fsdp(sources):
    from wattkd.eval.in_training import task_evaluator

    ev = suite_eval(sources).model_copy(update={"train_suite": suite_eval(sources).suite})
    assert task_evaluator(ev, eval_every=0, strategy="ddp") is None
    assert task_evaluator(ev.model_copy(update={"train_suite": None}), eval_every=5,
                          strategy="ddp") is None
    with pytest.raises(ConfigError, match="eval.train_suite runs lm-eval on one process"):
        task_evaluator(ev, eval_every=5, strategy="fsdp")
    evaluator = task_evaluator(ev, eval_every=5, strategy="ddp")
    tok = build_tokenizer()
    model = build_model(tok).train()
    rec = evaluator(model, tok)
    assert model.training  # the training mode comes back
    assert rec["suite"] == "mine" and list(rec["tasks"]) == [
        "why_not", "sorting", "my_arith", "wattkd_bb_sports_understanding"]
