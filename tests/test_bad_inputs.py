"""Bad inputs a new user tries (issue 26): each is refused through the real CLI with one
`error:` line that names the file or key and the fix, the documented exit code, no traceback,
and before any weights are loaded or any run folder is made.

Real parts throughout: Parquet shards of the bundled corpus, saved HF model folders with
their tokenizer, real safetensors files cut short, the `wattkd` typer app.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from wattkd.cli import app
from wattkd.config import ConfigError, load, validate
from wattkd.models import ModelError, load_pretrained, resolve_device

TEACHER = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
           "max_position_embeddings": 64, "tie_word_embeddings": True}
STUDENT = {**TEACHER, "hidden_size": 16, "intermediate_size": 32}
METHODS = [{"name": "response", "method": "response", "losses": [{"name": "forward_kl"}]},
           {"name": "baseline", "method": "none", "losses": [{"name": "ce"}]}]


def experiment(root: Path, out: str = "exp", **train_over: object) -> dict:
    return {
        "name": "bad", "output_dir": str(root / out),
        "data": {"tokenizer": "bundled:bpe-4096", "seq_len": 32, "total_tokens": 2048,
                 "shards_dir": str(root / "shards"), "rows_per_part": 32,
                 "heldout_fraction": 0.0},
        "teacher": {"model": str(root / "teacher")},
        "student": {"build": STUDENT},
        "distill": {"methods": METHODS, "cache_dir": str(root / "cache")},
        "train": {"max_steps": 2, "micro_batch_size": 4, "log_every": 1, "eval_every": 0,
                  "tensorboard": False, "device": "cpu", **train_over},
        "telemetry": {"idle_seconds": 0},
    }


def save_model(folder: Path, conf: dict, tokenizer: bool = True) -> Path:
    from wattkd.data.tokenizer import load_tokenizer
    from wattkd.models import build_from_config

    build_from_config(conf, 4096, seed=0).save_pretrained(folder)
    if tokenizer:
        load_tokenizer("bundled:bpe-4096").save_pretrained(folder)
    return folder


def swap_two_token_ids(folder: Path) -> tuple[str, str]:
    """Same tokens, same size, two ids exchanged: a tokenizer that maps ids differently."""
    path = folder / "tokenizer.json"
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(tok))
    return a, b


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards (64 rows of 32 tokens) and a saved 2-layer teacher with its tokenizer."""
    from wattkd.data.shards import build_shards

    root = tmp_path_factory.mktemp("bad_inputs")
    cfg = validate(experiment(root))
    build_shards(cfg.data, cfg.shards_dir, progress=False)
    save_model(root / "teacher", TEACHER)
    return root


def write_config(root: Path, data: dict, name: str = "c.yaml") -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(data))
    return path


def refused(res, code: int, *needles: str) -> str:
    """The one `error:` line, after checking the exit code, that no traceback leaked and that
    the line names every needle."""
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == code, res.output
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output, res.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


# ------------------------------------------------------------------------ duplicate YAML keys
def test_a_second_train_section_is_refused_with_both_line_numbers(tmp_path: Path) -> None:
    text = ("name: dup\n"                                  # 1
            "teacher: {build: {model_type: llama}}\n"      # 2
            "student: {build: {model_type: llama}}\n"      # 3
            "train:\n"                                     # 4
            "  max_steps: 3\n"                             # 5
            "  lr: 0.001\n"                                # 6
            "  lr: 0.002\n"                                # 7
            "train:\n"                                     # 8
            "  max_steps: 500\n")                          # 9
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    line = refused(cli("config", "show", str(path)), 2, str(path),
                   "'train' at lines 4 and 8", "'train.lr' at lines 6 and 7")
    assert "merge them into one" in line
    with pytest.raises(ConfigError, match="'train' at lines 4 and 8"):
        load(path)


def test_yaml_merge_keys_and_set_values_use_the_same_strict_loader(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("name: m\nteacher: {build: {model_type: llama}}\n"
                    "student: {build: {model_type: llama}}\n"
                    "train: &t {max_steps: 3, lr: 0.001}\n"
                    "distill: {methods: [{name: b, method: none, losses: [{name: ce}]}]}\n")
    assert load(path).train.max_steps == 3  # no false alarm on a plain file
    res = cli("config", "show", str(path), "--set", "train={max_steps: 4, max_steps: 5}")
    refused(res, 2, "--set", "'max_steps' at lines 1 and 1")


def test_duplicate_keys_in_an_include_path_task_yaml_are_refused(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text("task: mine\ndataset_path: json\n"
                                     "doc_to_text: !function utils.q\ntask: other\n")
    data = {"name": "inc", "teacher": {"build": {"model_type": "llama"}},
            "student": {"build": {"model_type": "llama"}},
            "eval": {"suite": None, "include_path": str(tasks)}}
    refused(cli("config", "show", str(write_config(tmp_path, data))), 2,
            str(tasks / "mine.yaml"), "'task' at lines 1 and 4")


# ------------------------------------------------------------------------- monitor --output
@pytest.mark.parametrize("where", ["proc", "under_a_file", "read_only_fs"])
def test_monitor_refuses_an_unwritable_output_before_sampling(tmp_path: Path, where: str
                                                               ) -> None:
    if where == "proc":
        output = Path("/proc/version")
        if not output.exists():
            pytest.skip("no /proc")
    elif where == "under_a_file":
        (tmp_path / "plain").write_text("x")
        output = tmp_path / "plain" / "telemetry.jsonl"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        if os.system(f"mount -t tmpfs -o size=64k,ro tmpfs {ro} 2>/dev/null") != 0:
            pytest.skip("needs root to mount a read-only tmpfs")
        output = ro / "telemetry.jsonl"
    try:
        res = cli("monitor", "--output", str(output), "--duration", "0.2")
    finally:
        if where == "read_only_fs":
            os.system(f"umount -l {tmp_path / 'ro'}")
    refused(res, 6, f"--output {output} cannot be written")
    assert "monitor: writing" not in res.output  # refused before any sampling


def test_monitor_refuses_a_non_positive_interval() -> None:
    refused(cli("monitor", "--output", "/dev/null", "--interval", "0"), 2, "--interval 0")


# ------------------------------------------------------------------------------- ~ in paths
def test_home_is_expanded_in_every_path_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = str(tmp_path / "home")
    (tmp_path / "home" / "tasks").mkdir(parents=True)  # include_path is checked at load
    cfg = validate({
        "name": "h", "output_dir": "~/runs/{name}",
        "data": {"sources": [{"path": "~/corpus/*.txt", "kind": "text"}],
                 "tokenizer": "~/tok", "shards_dir": "~/shards"},
        "teacher": {"model": "~/teacher"}, "student": {"model": "~/student"},
        "distill": {"cache_dir": "~/cache"},
        "eval": {"suite": None, "mmlu_path": "~/mmlu.jsonl", "bigbench_dir": "~/bb",
                 "include_path": "~/tasks", "ept": {"prompts": "~/prompts.txt"}},
        "slurm": {"venv": "~/venv"},
    })
    assert cfg.out == Path(home, "runs", "h")
    assert cfg.shards_dir == Path(home, "shards") and cfg.cache_dir == Path(home, "cache")
    paths = [cfg.data.sources[0].path, cfg.data.tokenizer, cfg.teacher.model,
             cfg.student.model, cfg.eval.mmlu_path, cfg.eval.bigbench_dir,
             cfg.eval.include_path[0], cfg.eval.ept.prompts, cfg.slurm.venv]
    assert all(p.startswith(home + "/") for p in paths), paths
    # hub ids and bundled names are left alone
    assert validate({"name": "h", "teacher": {"model": "org/name"},
                     "student": {"build": {"model_type": "llama"}}}).teacher.model == "org/name"


def test_output_dir_with_home_is_not_a_literal_tilde_folder(
        ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    data = experiment(ws)
    data["output_dir"] = "~/x"
    data["data"]["shards_dir"] = "{output_dir}/shards"
    res = cli("data", "build", str(write_config(tmp_path, data)))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "home" / "x" / "shards" / "train" / "manifest.json").is_file()
    assert not (tmp_path / "~").exists()


# ------------------------------------------------------------------------------ train.device
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_refused_not_run_on_the_cpu(ws: Path) -> None:
    c = write_config(ws, experiment(ws, "cuda"), "cuda.yaml")
    res = cli("train", str(c), "--method", "baseline", "--set", "train.device=cuda")
    refused(res, 2, "train.device is 'cuda' but there is no CUDA device here", "cpu")
    assert not (ws / "cuda").exists()
    res = cli("train", str(c), "--method", "baseline", "--set", "train.device=gpu")
    refused(res, 2, "train.device: 'gpu' is not a device")
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device("cuda:1")


# ----------------------------------------------------------------- seq_len vs max positions
def test_seq_len_above_the_students_positions_is_refused(ws: Path) -> None:
    data = experiment(ws, "pos")
    data["student"] = {"build": {**STUDENT, "max_position_embeddings": 16}}
    res = cli("train", str(write_config(ws, data)), "--method", "baseline")
    refused(res, 4, "student.build", "rows are 32 tokens", "at most 16 positions",
            "data.seq_len <= 16")
    assert not (ws / "pos").exists()


def test_seq_len_above_the_teachers_positions_is_refused_by_train_and_cache(ws: Path) -> None:
    save_model(ws / "teacher16", {**TEACHER, "max_position_embeddings": 16})
    data = experiment(ws, "tpos")
    data["teacher"] = {"model": str(ws / "teacher16")}
    c = write_config(ws, data)
    refused(cli("train", str(c), "--method", "response"), 4, "teacher.model",
            "at most 16 positions")
    refused(cli("teacher", "cache", str(c)), 4, "teacher.model", "at most 16 positions")
    assert not (ws / "tpos").exists() and not (ws / "cache").exists()


# ------------------------------------------------------------------------ train.max_tokens
def test_max_tokens_below_one_step_is_refused(ws: Path) -> None:
    c = write_config(ws, experiment(ws, "budget", max_steps=None, max_tokens=100))
    refused(cli("train", str(c), "--method", "baseline"), 2, "train.max_tokens 100",
            "one optimizer step, which trains 128 tokens",
            "micro_batch_size 4 x grad_accum 1 x seq_len 32")
    assert not (ws / "budget").exists()


# ----------------------------------------------------------------- tokenizers of the folders
def test_a_student_folder_whose_tokenizer_maps_ids_differently_is_refused(ws: Path) -> None:
    student = save_model(ws / "student-swapped", STUDENT)
    swapped = swap_two_token_ids(student)
    data = experiment(ws, "stok")
    data["student"] = {"model": str(student)}
    res = cli("train", str(write_config(ws, data)), "--method", "baseline")
    line = refused(res, 4, "tokenizer mismatch: the student folder", str(student))
    assert f"e.g. {swapped[1]!r} is id 300 there, 301 in the shards" in line
    assert not (ws / "stok").exists()


def test_the_teacher_check_is_the_same_one(ws: Path) -> None:
    teacher = save_model(ws / "teacher-swapped", TEACHER)
    swap_two_token_ids(teacher)
    data = experiment(ws, "ttok")
    data["teacher"] = {"model": str(teacher)}
    res = cli("train", str(write_config(ws, data)), "--method", "response")
    refused(res, 4, "tokenizer mismatch: the teacher folder", str(teacher))
    assert not (ws / "ttok").exists()


# --------------------------------------------------------------------- cut weights, bad bytes
def test_a_teacher_safetensors_cut_in_half_is_named(ws: Path) -> None:
    teacher = ws / "teacher-cut"
    shutil.copytree(ws / "teacher", teacher)
    weights = teacher / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    data = experiment(ws, "cut")
    data["teacher"] = {"model": str(teacher)}
    c = write_config(ws, data)
    refused(cli("train", str(c), "--method", "response"), 4, str(weights), "cut short",
            f"{len(raw) // 2:,} bytes", f"{len(raw):,}", "download the model again")
    refused(cli("teacher", "cache", str(c)), 4, str(weights), "cut short")
    with pytest.raises(ModelError, match="cut short"):  # eval and EPT load through this
        load_pretrained(str(teacher), dtype=torch.float32)
    weights.write_bytes(raw[:5])  # not even a header
    refused(cli("train", str(c), "--method", "response"), 4, str(weights),
            "not a readable safetensors file")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_byte_that_is_not_utf8_names_file_offset_and_line(tmp_path: Path, suffix: str) -> None:
    corpus = tmp_path / f"corpus{suffix}"
    lines = [f"line {i} of a perfectly ordinary document" for i in range(40)]
    if suffix == ".jsonl":
        lines = [json.dumps({"text": t}) for t in lines]
    raw = ("\n".join(lines) + "\n").encode()
    offset = raw.index(b"line 30 of") + 5  # on line 31
    corpus.write_bytes(raw[:offset] + b"\xff" + raw[offset + 1:])
    data = experiment(tmp_path)
    data["data"]["sources"] = [{"path": str(corpus)}]
    res = cli("data", "build", str(write_config(tmp_path, data)))
    refused(res, 3, str(corpus), "not UTF-8", "byte 0xff", f"offset {offset:,}", "line 31")
    assert "UnicodeDecodeError" not in res.output


# -------------------------------------------------------------------- eval of a missing path
def test_eval_of_a_missing_path_says_the_path_does_not_exist() -> None:
    res = cli("eval", "/abs/path/that/does/not/exist", "--suite", "offline")
    refused(res, 4, "no such folder /abs/path/that/does/not/exist")
    assert "Repo id" not in res.output and "hub id" in res.output
