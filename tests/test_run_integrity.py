"""Runs that cannot be silently corrupted (issue 26): one writer per run folder, a resume that
refuses a changed experiment, sealed state.json and manifests, --resume never archiving the
earlier run, and the resume tracebacks turned into one `error:` line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from wattkd import checkpoint
from wattkd.checkpoint import CheckpointError
from wattkd.cli import app
from wattkd.config import validate
from wattkd.data.manifest import ManifestError, read_manifest
from wattkd.jobs import student_job
from wattkd.report.collect import load_run
from wattkd.runlock import LOCK_FILE, RunFolderBusy, RunLock
from wattkd.sealed import SEAL_KEY, SealError, check_seal, seal
from wattkd.teacher_cache.manifest import CacheError, read_cache_manifest
from wattkd.train import train
from wattkd.training.resume import ResumeConfigChanged

LAYERS = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 64, "tie_word_embeddings": True}


def experiment(root: Path, name: str, **train_keys: object) -> dict:
    return {"name": name, "output_dir": str(root / name),
            "data": {"tokenizer": "bundled:bpe-4096", "seq_len": 32, "total_tokens": 20_000,
                     "shards_dir": str(root / "shards"), "rows_per_part": 64,
                     "heldout_fraction": 0.0},
            "teacher": {"build": LAYERS}, "student": {"build": LAYERS},
            "distill": {"methods": [{"name": "baseline", "method": "none",
                                     "losses": [{"name": "ce"}]},
                                    {"name": "feature", "method": "feature",
                                     "layer_map": [[1, 1], [2, 2]],
                                     "losses": [{"name": "hidden_mse"}, {"name": "ce"}]}]},
            "train": {"max_steps": 4, "micro_batch_size": 4, "lr": 3e-3, "log_every": 2,
                      "checkpoint_every": 2, "tensorboard": False, "device": "cpu",
                      **train_keys},
            "telemetry": {"enabled": False}}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wattkd.data.shards import build_shards

    root = tmp_path_factory.mktemp("runint")
    cfg = validate(experiment(root, "x"))
    build_shards(cfg.data, cfg.shards_dir, progress=False)
    return root


# ------------------------------------------------------------------------------- seals
def test_every_single_bit_flip_of_a_sealed_state_is_caught() -> None:
    """All 8 x len bit flips of a sealed state.json: each is invalid JSON or refused by the
    seal (a flip in the seal's key name included); none reads as an intact record."""
    meta = seal({"format": "wattkd-checkpoint", "version": 1, "step": 20, "samples": 160,
                 "tokens": 5120, "energy_j": 12.5, "full_weights": True,
                 "files": {"model.pt": {"bytes": 1234, "sha256": "ab" * 32}}})
    raw = json.dumps(meta, indent=2).encode()
    assert check_seal(json.loads(raw)) is True
    undetected = 0
    for i in range(len(raw) * 8):
        bad = bytearray(raw)
        bad[i // 8] ^= 1 << (i % 8)
        try:
            rec = json.loads(bytes(bad))
        except (ValueError, UnicodeDecodeError):
            continue
        try:
            check_seal(rec)
        except SealError:
            continue
        undetected += 1
    assert undetected == 0


def test_unsealed_record_reads_as_old_and_a_renamed_seal_is_refused() -> None:
    assert check_seal({"step": 20}) is False                 # written before seals
    sealed = seal({"step": 20})
    renamed = {"step": 20, "content_sha257": sealed[SEAL_KEY]}
    with pytest.raises(SealError, match="key name 'content_sha256' is damaged"):
        check_seal(renamed)


def _tiny_checkpoints(run_dir: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (10, 20):
        checkpoint.save(run_dir, step, module=model, optimizer=opt, scheduler=sched,
                        progress={"samples": step * 8, "tokens": step * 256},
                        full_weights=True, keep_last=3)


def test_flipped_step_in_state_json_falls_back_to_the_previous_checkpoint(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _tiny_checkpoints(tmp_path)
    state = tmp_path / "checkpoints" / "step_0000020" / "state.json"
    text = state.read_text()
    state.write_text(text.replace('"samples": 160', '"samples": 161'))
    assert checkpoint.latest(tmp_path).name == "step_0000010"
    assert "state.json" in caplog.text and "content_sha256" in caplog.text
    # a checkpoint written before seals (no content_sha256) is still resumed from
    old = json.loads(text)
    del old[SEAL_KEY]
    state.write_text(json.dumps(old))
    assert checkpoint.latest(tmp_path).name == "step_0000020"
    old["step"] = 30      # unsealed, yet the folder name still disagrees
    state.write_text(json.dumps(old))
    with pytest.raises(CheckpointError, match="step 30 does not match the folder name"):
        checkpoint.verify(state.parent)


def test_shard_manifest_flip_is_a_named_error_and_old_manifests_still_read(
        root: Path, tmp_path: Path) -> None:
    import shutil

    shards = tmp_path / "s"
    shutil.copytree(root / "shards" / "train", shards)
    path = shards / "manifest.json"
    raw = path.read_text()
    assert SEAL_KEY in json.loads(raw)
    path.write_text(raw.replace('"seq_len": 32', '"seq_len": 33'))
    with pytest.raises(ManifestError, match=r"manifest\.json: its content differs"):
        read_manifest(shards)
    old = json.loads(raw)
    del old[SEAL_KEY]
    path.write_text(json.dumps(old))
    assert read_manifest(shards)["seq_len"] == 32


def _cache_manifest() -> dict:
    part = {"file": "part-00000.parquet", "shard_file": "part-00000.parquet", "row_start": 0,
            "rows": 4, "row_group_rows": 4, "bytes": 10, "sha256": "0" * 64}
    return {"format": "wattkd-teacher-cache", "version": 1,
            "identity": {k: None for k in ("shards_sha256", "tokenizer_sha256",
                                           "teacher_fingerprint", "teacher_dtype", "signals",
                                           "encoding")},
            "shards": {"path": "s", "manifest_sha256": "0" * 64},
            "tokenizer": {"name": "t", "sha256": "0" * 64},
            "teacher": {"id": "t", "fingerprint": "f", "vocab": 8},
            "signals": {"spec": "topk:8"}, "encoding": "packed", "columns": {},
            "rows": 4, "tokens": 128, "parts": [part]}


def test_cache_manifest_missing_a_part_key_is_a_named_error(tmp_path: Path) -> None:
    m = _cache_manifest()
    (tmp_path / "manifest.json").write_text(json.dumps(m))   # an old (unsealed) cache
    assert read_cache_manifest(tmp_path)["parts"][0]["row_group_rows"] == 4
    del m["parts"][0]["row_group_rows"]
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match=r"parts\[0\]\.row_group_rows missing"):
        read_cache_manifest(tmp_path)


# -------------------------------------------------------------------------------- lock
def test_second_writer_is_refused_naming_the_holder_and_a_dead_lock_is_taken_over(
        tmp_path: Path) -> None:
    first = RunLock(tmp_path, "train").acquire()
    with pytest.raises(RunFolderBusy, match=rf"pid {os.getpid()} on host .*started"):
        RunLock(tmp_path, "train").acquire()
    first.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""         # a clean end names nobody
    second = RunLock(tmp_path, "train").acquire()
    assert second.taken_over is None
    second.release()
    # a holder that died without releasing: its record stays, the lock is free
    (tmp_path / LOCK_FILE).write_text(json.dumps({"stage": "train", "pid": 999999,
                                                  "host": "elsewhere", "started": "then"}))
    third = RunLock(tmp_path, "train").acquire()
    assert third.taken_over["pid"] == 999999 and "taken_over" in third.taken_over
    third.release()


# ------------------------------------------------------------------------------ resume
def _cfg(root: Path, **train_keys: object):
    return validate(experiment(root, "r", **train_keys))


def test_resume_with_a_changed_config_is_refused_before_anything_is_written(
        root: Path) -> None:
    first = train(student_job(_cfg(root), "baseline"), progress=False)
    run_dir = first.run_dir
    config_before = (run_dir / "config.yaml").read_text()
    run_before = (run_dir / "run.json").read_text()
    changed = _cfg(root, max_steps=6, lr=1e-3, seed=5)
    with pytest.raises(ResumeConfigChanged) as err:
        train(student_job(changed, "baseline"), progress=False)
    msg = str(err.value)
    assert "train.lr: 0.003 -> 0.001" in msg and "train.seed: 0 -> 5" in msg
    assert "max_steps" not in msg            # a raised budget continues a run
    assert (run_dir / "config.yaml").read_text() == config_before
    assert (run_dir / "run.json").read_text() == run_before
    # a key that does not change the result (log_every) is no change
    quiet = _cfg(root, max_steps=6, log_every=3)
    assert train(student_job(quiet, "baseline"), progress=False).step == 6
    # accepted explicitly: recorded with the step it applies from
    more = _cfg(root, max_steps=8, lr=1e-3, log_every=3)
    res = train(student_job(more, "baseline"), progress=False, allow_config_change=True)
    assert res.step == 8
    info = json.loads((run_dir / "run.json").read_text())
    last = info["config_changes"][-1]
    assert last["step"] == 6 and last["changes"]["train.lr"] == [0.003, 0.001]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"] == 0.001
    notes = load_run(run_dir).read_notes          # the report's "Read first" names it
    assert any("config changed at step 6" in n and "train.lr: 0.003 -> 0.001" in n
               for n in notes)


def test_a_run_folder_written_before_the_mode_rename_resumes_without_a_change(
        root: Path) -> None:
    """A run whose config.yaml still says `mode:` (written before issue 29 renamed it to
    `method:`) resumes: the stored config is migrated on read, so the rename is no change."""
    first = train(student_job(validate(experiment(root, "old")), "feature"), progress=False)
    stored = first.run_dir / "config.yaml"
    old = yaml.safe_load(stored.read_text())
    for entry in old["distill"]["methods"]:
        entry["mode"] = entry.pop("method")
    stored.write_text(yaml.safe_dump(old, sort_keys=False))
    more = validate(experiment(root, "old", max_steps=6))
    res = train(student_job(more, "feature"), progress=False)
    assert res.step == 6
    recorded = json.loads((first.run_dir / "run.json").read_text())["config_changes"]
    assert recorded == [{"step": 4, "changes": {"train.max_steps": [4, 6]}}]  # the budget only


def test_architecture_change_and_another_methods_checkpoint_are_one_error_line(
        root: Path) -> None:
    base = experiment(root, "a")
    yaml_path = root / "a.yaml"
    yaml_path.write_text(yaml.safe_dump(base))
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(yaml_path), "--method", "baseline"])
    assert res.exit_code == 0, res.output
    run_dir = root / "a" / "baseline" / "rep0"
    config_before = (run_dir / "config.yaml").read_text()
    wider = {**base, "student": {"build": {**LAYERS, "intermediate_size": 96}},
             "train": {**base["train"], "max_steps": 6}}
    yaml_path.write_text(yaml.safe_dump(wider))
    res = runner.invoke(app, ["train", str(yaml_path), "--method", "baseline"])
    assert res.exit_code == 2 and "student.build.intermediate_size: 64 -> 96" in res.output
    res = runner.invoke(app, ["train", str(yaml_path), "--method", "baseline",
                              "--allow-config-change"])
    assert res.exit_code == 5, res.output
    assert "does not fit this run's model" in res.output and "Traceback" not in res.output
    assert (run_dir / "config.yaml").read_text() == config_before
    # --resume pointing at the baseline's checkpoint from the feature method (projectors)
    yaml_path.write_text(yaml.safe_dump({**base, "train": {**base["train"], "max_steps": 6}}))
    ckpt = str(run_dir / "checkpoints" / "step_0000004")
    res = runner.invoke(app, ["train", str(yaml_path), "--method", "feature",
                              "--resume", ckpt])
    assert res.exit_code == 2 and "method: baseline -> feature" in res.output
    res = runner.invoke(app, ["train", str(yaml_path), "--method", "feature",
                              "--resume", ckpt, "--allow-config-change"])
    assert res.exit_code == 5 and "Traceback" not in res.output, res.output
    assert "does not fit" in res.output


def test_resume_never_archives_the_earlier_run(root: Path) -> None:
    cfg = validate(experiment(root, "n"))
    first = train(student_job(cfg, "baseline"), progress=False)
    before = (first.run_dir / "metrics.jsonl").read_text()
    again = train(student_job(cfg, "baseline"), resume="never", progress=False)
    lines = (again.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    (archived,) = (again.run_dir / "archive").iterdir()
    assert (archived / "metrics.jsonl").read_text() == before
    assert (archived / "checkpoints").is_dir() and not (again.run_dir / "final").samefile(
        archived / "final")
