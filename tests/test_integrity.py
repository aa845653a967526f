"""Data integrity and errors a user can act on (issue 21).

A corruption suite (seeded random byte flips in shard parts, teacher-cache parts and
checkpoints: every flip is detected, every message names the file) and one test per bad input
of the issue: each gives a named `error:` line (or a correct recovery) before expensive work.
Everything is real: Parquet shards of the bundled corpus, a saved HF model folder, a real
teacher cache, real checkpoints from `train()`, the CLI through typer's runner.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from wattkd import checkpoint
from wattkd.checkpoint import CheckpointError
from wattkd.cli import app
from wattkd.config import ConfigError, validate
from wattkd.data.loader import ShardDataset
from wattkd.data.manifest import ManifestError, read_manifest, write_manifest
from wattkd.errors import describe_os_error
from wattkd.hashing import file_sha256
from wattkd.jobs import student_job
from wattkd.models import ModelError
from wattkd.teacher_cache import CacheError, CacheReader, build_cache
from wattkd.train import train

FLIPS = 12  # flips per file kind and run: fast, and seeded so a failure reproduces
TEACHER = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
           "max_position_embeddings": 64, "tie_word_embeddings": True}
STUDENT = {**TEACHER, "hidden_size": 16, "intermediate_size": 32}
METHODS = [
    {"name": "response", "method": "response", "losses": [{"name": "forward_kl"}]},
    {"name": "feature", "method": "feature", "layer_map": [[1, 2]],
     "losses": [{"name": "hidden_mse"}]},
    {"name": "relation", "method": "relation",
     "losses": [{"name": "rkd_distance"}, {"name": "rkd_angle"}]},
    {"name": "baseline", "method": "none", "losses": [{"name": "ce"}]},
]


def experiment(root: Path, out: str = "exp", **train_over: object) -> dict:
    return {
        "name": "ig", "output_dir": str(root / out),
        "data": {"tokenizer": "bundled:bpe-4096", "seq_len": 32, "total_tokens": 4096,
                 "shards_dir": str(root / "shards"), "rows_per_part": 32,
                 "heldout_fraction": 0.0},
        "teacher": {"model": str(root / "teacher")},
        "student": {"build": STUDENT},
        "distill": {"methods": METHODS, "cache_top_k": 8, "cache_dir": str(root / "cache")},
        "train": {"max_steps": 4, "micro_batch_size": 4, "lr": 1e-3, "log_every": 2,
                  "checkpoint_every": 2, "keep_last": 3, "eval_every": 0,
                  "tensorboard": False, "device": "cpu", **train_over},
        "telemetry": {"idle_seconds": 0},
    }


def save_teacher(folder: Path, vocab: int, tokenizer: bool = True) -> None:
    from wattkd.data.tokenizer import load_tokenizer
    from wattkd.models import build_from_config

    build_from_config(TEACHER, vocab, seed=0).save_pretrained(folder)
    if tokenizer:
        load_tokenizer("bundled:bpe-4096").save_pretrained(folder)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Shards (128 rows of 32 tokens, 4 parts), a saved teacher folder, a teacher cache and a
    finished response run with checkpoints at steps 2 and 4."""
    from wattkd.data.shards import build_shards

    root = tmp_path_factory.mktemp("integrity")
    cfg = validate(experiment(root))
    build_shards(cfg.data, cfg.shards_dir, progress=False)
    save_teacher(root / "teacher", 4096)
    build_cache(cfg, "topk:8,hidden:2,pooled", progress=False)
    result = train(student_job(cfg, "response"), progress=False)
    assert result.status == "completed"
    return {"root": root, "cfg": cfg, "run": result.run_dir}


def write_config(root: Path, data: dict, name: str = "c.yaml") -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def flip(path: Path, rng: random.Random) -> int:
    data = bytearray(path.read_bytes())
    pos = rng.randrange(len(data))
    data[pos] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return pos


def copy_tree(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


@contextlib.contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False):
    """A real small (or read-only) file system; skips where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs",
                                            str(path)], check=False, capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield path
    finally:
        # lazy: a file handle a failed writer left open must not keep the mount alive
        subprocess.run(["umount", "-l", str(path)], check=False)


# =========================================================================== corruption suite
def test_every_byte_flip_in_a_shard_part_is_detected(ws: dict) -> None:
    rng = random.Random(21)
    src = ws["cfg"].shards_dir / "train"
    for trial in range(FLIPS):
        shards = copy_tree(src, ws["root"] / "flip-shards")
        part = rng.randrange(len(read_manifest(shards)["parts"]))
        path = shards / f"part-{part:05d}.parquet"
        pos = flip(path, rng)
        ds = ShardDataset(shards, shuffle=False)   # same size: the open-time check catches it
        with pytest.raises(ManifestError) as err:
            ds.part_ids(part)
        assert str(path) in str(err.value), (trial, pos)
        assert "wattkd data build" in str(err.value)


def test_every_byte_flip_in_a_cache_part_is_detected(ws: dict) -> None:
    rng = random.Random(22)
    cfg = ws["cfg"]
    rows = 128
    for trial in range(FLIPS):
        cache = copy_tree(cfg.cache_dir, ws["root"] / "flip-cache")
        manifest = json.loads((cache / "manifest.json").read_text())
        part = rng.randrange(len(manifest["parts"]))
        info = manifest["parts"][part]
        path = cache / info["file"]
        flip(path, rng)
        reader = CacheReader(cache, threads=1)
        row = info["row_start"] + rng.randrange(info["rows"])
        assert 0 <= row < rows
        with pytest.raises(CacheError) as err:
            reader.cells([row], ("topk_ids", "topk_logprobs", "topk_tail", "hidden_L2",
                                 "pooled_mean"))
        assert str(path) in str(err.value), trial
        assert "wattkd teacher cache" in str(err.value)
        reader.close()


def test_cell_checksums_cover_every_signal_column(ws: dict) -> None:
    """Without the part sha256 (verify=False) no flip changes a signal silently: a read
    either fails naming the file, or returns exactly the original cells (flips in bytes no
    value depends on, e.g. statistics padding). Every signal column has its checksum."""
    cfg = ws["cfg"]
    cols = ("topk_ids", "topk_logprobs", "topk_tail", "hidden_L2", "pooled_mean")
    clean = CacheReader(cfg.cache_dir, threads=1)
    assert all(clean._has_crc(c) for c in cols)
    rng = random.Random(23)
    detected = 0
    for _ in range(FLIPS):
        cache = copy_tree(cfg.cache_dir, ws["root"] / "flip-cache-crc")
        info = json.loads((cache / "manifest.json").read_text())["parts"][1]
        path = cache / info["file"]
        flip(path, rng)
        rows = list(range(info["row_start"], info["row_start"] + info["rows"]))
        reader = CacheReader(cache, threads=1, verify=False)
        try:
            got = reader.cells(rows, cols)
        except CacheError as exc:
            assert str(path) in str(exc)
            detected += 1
        else:
            assert got == clean.cells(rows, cols)
        reader.close()
    assert detected >= FLIPS // 2   # most flips land in the (compressed) cell data


def test_every_byte_flip_in_a_checkpoint_is_detected_and_resume_uses_the_one_before(
        ws: dict, caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(24)
    for trial in range(FLIPS):
        run = copy_tree(ws["run"], ws["root"] / "flip-run")
        newest = checkpoint.checkpoint_root(run) / "step_0000004"
        name = rng.choice(checkpoint.CHECKPOINT_FILES)
        flip(newest / name, rng)
        with pytest.raises(CheckpointError) as err:
            checkpoint.verify(newest)
        assert str(newest / name) in str(err.value), trial
        caplog.clear()
        assert checkpoint.latest(run).name == "step_0000002"
        assert "skipping checkpoint step_0000004" in caplog.text and name in caplog.text


# =================================================================== one test per message
def test_out_of_range_token_id_names_file_and_row(ws: dict) -> None:
    """An id >= vocab in a part whose sha256 was re-recorded (so only the vocabulary check
    can catch it): refused with the file, the row and the id, not an IndexError mid-run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = copy_tree(ws["cfg"].shards_dir / "train", ws["root"] / "oov-shards")
    path = shards / "part-00001.parquet"
    table = pq.read_table(path)
    ids = table["input_ids"].to_pylist()
    ids[5][7] = 5000
    pq.write_table(table.set_column(0, "input_ids", pa.array(ids, table.schema.field(0).type)),
                   path)
    m = read_manifest(shards)
    m["parts"][1].update(bytes=path.stat().st_size, sha256=file_sha256(path))
    write_manifest(shards, m)   # re-recorded and resealed: only the token range can catch it
    with pytest.raises(ManifestError, match=r"part-00001\.parquet: row 5 \(global row 37\), "
                                            r"position 7 holds token id 5000, outside the "
                                            r"tokenizer's vocabulary of 4096"):
        ShardDataset(shards, shuffle=False).row(37)


def test_teacher_vocab_larger_than_tokenizer_needs_padding_evidence(ws: dict) -> None:
    from wattkd.preflight import check_vocab_sizes, model_config

    root, cfg = ws["root"], ws["cfg"]
    bare, tok = root / "teacher-8192-bare", root / "teacher-8192-tok"
    save_teacher(bare, 8192, tokenizer=False)
    save_teacher(tok, 8192, tokenizer=True)
    with pytest.raises(ModelError, match=r"vocab_size 8192.*4096 tokens, and nothing shows "
                                         r"the 4096 extra rows are padding"):
        check_vocab_sizes(cfg, model_config(str(bare), "teacher.model"), str(bare), 4096)
    # its own tokenizer of the data tokenizer's size beside it: the extra rows are padding
    check_vocab_sizes(cfg, model_config(str(tok), "teacher.model"), str(tok), 4096)
    data = experiment(root, "vocab")
    data["teacher"] = {"model": str(bare)}
    res = cli("train", str(write_config(root, data)), "--method", "response")
    assert res.exit_code == 4 and "error: teacher" in res.output
    assert not (root / "vocab").exists()


def test_missing_teacher_path_is_named_not_a_repo_id_error(ws: dict) -> None:
    root = ws["root"]
    data = experiment(root, "noteacher")
    data["teacher"] = {"model": str(root / "no" / "such" / "teacher")}
    res = cli("train", str(write_config(root, data)), "--method", "response")
    assert res.exit_code == 4
    assert f"error: teacher.model: no such folder {root}/no/such/teacher" in res.output
    assert "Repo id" not in res.output and "Traceback" not in res.output
    res = cli("teacher", "cache", str(write_config(root, data)))
    assert res.exit_code == 4 and "no such folder" in res.output


def test_layer_map_and_relation_batch_refused_before_anything_is_written(ws: dict) -> None:
    root = ws["root"]
    data = experiment(root, "layers")
    data["distill"]["methods"][1]["layer_map"] = [[1, 7]]
    res = cli("train", str(write_config(root, data)), "--method", "feature")
    assert res.exit_code == 4
    assert "error: method 'feature': layer_map pair (1, 7): the teacher has 2 layers" \
        in res.output
    data = experiment(root, "layers", micro_batch_size=2)
    res = cli("train", str(write_config(root, data)), "--method", "relation")
    assert res.exit_code == 2
    assert "error: train.micro_batch_size: method 'relation'" in res.output
    assert "needs at least 3, got 2" in res.output
    assert not (root / "layers").exists()   # no rep0/config.yaml left behind


def test_edited_vocab_size_in_teacher_config_gives_a_wattkd_message(ws: dict) -> None:
    root = ws["root"]
    teacher = copy_tree(root / "teacher", root / "teacher-edited")
    conf = json.loads((teacher / "config.json").read_text())
    conf["vocab_size"] = 5000
    (teacher / "config.json").write_text(json.dumps(conf))
    data = experiment(root, "edited")
    data["teacher"] = {"model": str(teacher)}
    res = cli("train", str(write_config(root, data)), "--method", "response")
    assert res.exit_code == 4
    assert (f"error: teacher.model: {teacher}/config.json says vocab_size 5000 but the "
            "weights (model.safetensors: model.embed_tokens.weight) have 4096 rows") \
        in res.output
    assert "ignore_mismatched_sizes" not in res.output


def test_negative_repeat_is_refused_and_leaves_no_folder(ws: dict) -> None:
    root = ws["root"]
    res = cli("train", str(write_config(root, experiment(root, "neg"))), "--method",
              "baseline", "--repeat", "-1")
    assert res.exit_code == 2 and "error: --repeat -1: the repeat index must be >= 0" \
        in res.output
    assert not (root / "neg").exists()
    with pytest.raises(ConfigError):
        train(student_job(validate(experiment(root, "neg")), "baseline", -1), progress=False)


def test_empty_model_pt_is_not_aborted_and_resume_skips_to_the_valid_checkpoint(
        ws: dict) -> None:
    root = ws["root"]
    run = copy_tree(ws["run"], root / "empty-pt" / "response" / "rep0")
    (run / "final").rename(run / "final-old")     # not finished: it will resume
    newest = run / "checkpoints" / "step_0000004"
    (newest / "model.pt").write_bytes(b"")
    config = write_config(root, experiment(root, "empty-pt", max_steps=5))
    res = cli("train", str(config), "--method", "response")
    assert res.exit_code == 0, res.output
    assert "Aborted" not in res.output
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["step"] == 5
    assert info["resumed_from"].endswith("step_0000002")
    # a checkpoint named explicitly that is corrupt: named, with what to do
    (newest / "model.pt").write_bytes(b"")
    res = cli("train", str(config), "--method", "response", "--resume", str(newest))
    assert res.exit_code == 5 and "Aborted" not in res.output
    assert f"error: {newest}/model.pt: 0 bytes" in res.output and f"delete {newest}" \
        in res.output


@pytest.mark.parametrize("name, damage", [("state.json", "truncate"), ("rng.pt", "truncate"),
                                          ("model.pt", "empty")])
def test_damaged_checkpoint_files_are_named(ws: dict, name: str, damage: str) -> None:
    run = copy_tree(ws["run"], ws["root"] / f"damaged-{name}")
    step = checkpoint.checkpoint_root(run) / "step_0000004"
    data = (step / name).read_bytes()
    (step / name).write_bytes(data[: len(data) // 2] if damage == "truncate" else b"")
    with pytest.raises(CheckpointError, match=str(step / name)):
        checkpoint.verify(step)
    # every checkpoint damaged: refused, not silently restarted from step 0
    step2 = checkpoint.checkpoint_root(run) / "step_0000002"
    (step2 / name).write_bytes(b"")
    with pytest.raises(CheckpointError, match="no valid checkpoint in .*--resume never"):
        checkpoint.latest(run)


def test_a_full_disk_during_a_checkpoint_says_no_space_left(tmp_path: Path) -> None:
    model = torch.nn.Linear(256, 256)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 256)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with tmpfs(tmp_path / "small", "256k") as disk:
        with pytest.raises(OSError) as err:
            checkpoint.save(disk, 1, module=model, optimizer=optimizer, scheduler=scheduler,
                            progress={}, full_weights=True, keep_last=2)
        msg = describe_os_error(err.value)
        assert msg.startswith(f"no space left on device: {disk}/checkpoints/step_0000001")
        assert "inline_container" not in msg
        assert not list((disk / "checkpoints").iterdir())  # no half-written checkpoint


def test_read_only_checkpoints_are_found_before_training(ws: dict) -> None:
    root = ws["root"]
    run = copy_tree(ws["run"], root / "ro" / "response" / "rep0")
    shutil.rmtree(run / "final")
    ckpts = run / "checkpoints"
    shutil.rmtree(ckpts)
    with tmpfs(ckpts, "1m", readonly=True):
        config = write_config(root, experiment(root, "ro", max_steps=8))
        res = cli("train", str(config), "--method", "response")
        assert res.exit_code == 6
        assert f"error: read-only file system: {ckpts}" in res.output
        assert not (run / "metrics.jsonl").read_text().count('"step": 5')


def test_teacher_cache_prints_its_size_and_refuses_a_disk_too_small(
        ws: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.INFO)
    with tmpfs(tmp_path / "tiny", "64k") as disk:
        cfg = validate({**experiment(ws["root"]),
                        "distill": {**experiment(ws["root"])["distill"],
                                    "cache_dir": str(disk / "cache")}})
        with pytest.raises(OSError) as err:
            build_cache(cfg, "topk:8,hidden:2,pooled", progress=False)
    msg = describe_os_error(err.value)
    assert msg.startswith(f"no space left on device: {disk}")
    assert "teacher cache needs about" in msg and "hidden 64.0 B/token" in msg
    assert "estimated" in caplog.text and "4,096 tokens" in caplog.text


def test_size_estimate_is_an_upper_bound_of_the_real_cache(ws: dict) -> None:
    from wattkd.teacher_cache import plan_cache, read_cache_manifest

    cfg = ws["cfg"]
    per = plan_cache(cfg, "topk:8,hidden:2,pooled").bytes_per_token_by_signal()
    real = read_cache_manifest(cfg.cache_dir)["bytes"]["per_token_by_signal"]
    assert per["hidden"] == 32 * 2          # one layer x hidden 32 x 2 bytes per position
    for signal in ("topk", "hidden", "pooled"):
        assert real[signal] <= per[signal] * 1.05, signal


def test_crashed_run_reads_crashed_and_the_next_start_records_it(tmp_path: Path) -> None:
    from wattkd.runinfo import effective_status, write_run_json

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_run_json(tmp_path, status="running", step=3)
    info = json.loads((tmp_path / "run.json").read_text())
    info["pid"] = dead.pid
    (tmp_path / "run.json").write_text(json.dumps(info))
    assert effective_status(info) == "crashed"
    write_run_json(tmp_path, status="running")
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["crashes"][0]["pid"] == dead.pid and info["crashes"][0]["step"] == 3
    assert effective_status(info) == "running"   # this process is alive


def test_an_error_mid_run_marks_run_json_failed_with_the_reason(ws: dict) -> None:
    """A shard part corrupted after the run started (found when the loader opens it):
    one error line, exit 3, and run.json says failed and why."""
    root = ws["root"]
    data = experiment(root, "midrun")
    data["data"]["shards_dir"] = str(root / "midrun-shards")
    shards = copy_tree(ws["cfg"].shards_dir, root / "midrun-shards")
    for p in (shards / "train").glob("part-*.parquet"):
        flip(p, random.Random(5))
    res = cli("train", str(write_config(root, data)), "--method", "baseline")
    assert res.exit_code == 3, res.output
    assert "Traceback" not in res.output
    [line] = [x for x in res.output.splitlines() if x.startswith("error:")]
    assert "sha256 differs from the manifest" in line
    info = json.loads((root / "midrun" / "baseline" / "rep0" / "run.json").read_text())
    assert info["status"] == "failed" and info["error"]["exit_code"] == 3
    assert "sha256 differs" in info["error"]["message"]
    res = cli("--debug", "train", str(write_config(root, data)), "--method", "baseline")
    assert res.exit_code == 3 and "Traceback" in res.output
