"""DDP on CPU (gloo, 2 processes under torchrun): same trajectory as one process with the same
global batch, and resume across ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

MODEL = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 64}


def config(root: Path) -> Path:
    data = {
        "name": "ddp",
        "output_dir": str(root / "unused"),
        "data": {"tokenizer": "bundled:bpe-4096", "seq_len": 32, "total_tokens": 30_000,
                 "shards_dir": str(root / "shards")},
        "teacher": {"build": {**MODEL, "hidden_size": 48, "intermediate_size": 96}},
        "student": {"build": MODEL},
        "distill": {"methods": [{"name": "response", "method": "response",
                                 "losses": [{"name": "forward_kl"}, {"name": "ce"}]}]},
        "train": {"max_steps": 6, "micro_batch_size": 8, "log_every": 1, "tensorboard": False,
                  "device": "cpu", "schedule": "constant", "lr": 1e-3},
        "telemetry": {"idle_seconds": 0},
    }
    path = root / "ddp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def train(cfg: Path, out: Path, *sets: str, procs: int = 1) -> dict[int, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-m", "wattkd.cli", "train", str(cfg), "--method", "response",
            "--set", f"output_dir={out}", *[a for s in sets for a in ("--set", s)]]
    if procs == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={procs}", *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    losses: dict[int, float] = {}
    for line in (out / "response" / "rep0" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] in ("train", "step"):
            losses[rec["step"]] = rec["loss"]
    return losses


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wattkd.config import load
    from wattkd.data.shards import build_shards

    root = tmp_path_factory.mktemp("ddp")
    path = config(root)
    c = load(path)
    build_shards(c.data, c.shards_dir, progress=False)
    return path


def test_ddp_matches_single_process_with_same_global_batch(cfg: Path) -> None:
    root = cfg.parent
    single = train(cfg, root / "single")
    ddp = train(cfg, root / "ddp", "train.micro_batch_size=4", procs=2)
    assert sorted(ddp) == sorted(single) == list(range(1, 7))
    for step in single:
        assert ddp[step] == pytest.approx(single[step], rel=1e-5), step
    run = json.loads((root / "ddp" / "response" / "rep0" / "run.json").read_text())
    assert run["world_size"] == 2


def test_ddp_resume_across_ranks(cfg: Path) -> None:
    root = cfg.parent
    straight = train(cfg, root / "straight", "train.micro_batch_size=4", procs=2)
    out = root / "resumed"
    train(cfg, out, "train.micro_batch_size=4", "train.max_steps=3", "train.checkpoint_every=3",
          procs=2)
    shutil.rmtree(out / "response" / "rep0" / "final")
    resumed = train(cfg, out, "train.micro_batch_size=4", procs=2)
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([straight[s] for s in (4, 5, 6)],
                                                            rel=1e-6)
    run = json.loads((out / "response" / "rep0" / "run.json").read_text())
    assert run["resumed_from"].endswith("step_0000003")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_feature_method_without_logit_terms(cfg: Path, strategy: str) -> None:
    """No CE/KL term: the LM head gets no gradient, which DDP must be told about (it failed
    at the second step before); FSDP must reduce-scatter around the unused parameters."""
    data = yaml.safe_load(cfg.read_text())
    data["distill"]["methods"] = [{"name": "response", "method": "feature",
                                   "layer_map": [[1, 1]], "losses": [{"name": "hidden_mse"}],
                                   "guard": {"enabled": True, "window": 2}}]
    data["student"]["build"]["tie_word_embeddings"] = False
    path = cfg.parent / f"feature-{strategy}.yaml"
    path.write_text(yaml.safe_dump(data))
    out = cfg.parent / f"feature-{strategy}"
    losses = train(path, out, "train.micro_batch_size=4", "train.max_steps=4",
                   f"train.strategy={strategy}", procs=2)
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses[4] < losses[1]  # the projector and student layers do learn
    assert (out / "response" / "rep0" / "final" / "projector.pt").exists()


# ------------------------------------------------------------------------------------- FSDP
def _final_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "response" / "rep0" / "final" / "model.safetensors"))


def test_fsdp_matches_single_process_and_writes_a_whole_final_folder(cfg: Path) -> None:
    """FSDP2 over 2 ranks (student sharded, online teacher's layers sharded): the same losses
    as one process with the same global batch, and rank 0's final/ holds the whole student."""
    root = cfg.parent
    single = train(cfg, root / "single_f")
    fsdp = train(cfg, root / "fsdp", "train.micro_batch_size=4", "train.strategy=fsdp",
                 procs=2)
    for step in single:
        assert fsdp[step] == pytest.approx(single[step], rel=1e-5), step
    a, b = _final_weights(root / "single_f"), _final_weights(root / "fsdp")
    assert sorted(a) == sorted(b)
    for name in a:
        assert b[name].shape == a[name].shape, name
        assert (b[name] - a[name]).abs().max() <= 1e-4 * (1 + a[name].abs().max()), name
    log = (root / "fsdp" / "response" / "rep0" / "metrics.jsonl").read_text()
    assert all(json.loads(x).get("grad_norm", 1.0) is not None for x in log.splitlines())


def test_fsdp_resume_across_ranks_and_strategy_is_checked(cfg: Path) -> None:
    root = cfg.parent
    fsdp = ("train.micro_batch_size=4", "train.strategy=fsdp")
    straight = train(cfg, root / "fsdp_straight", *fsdp, procs=2)
    out = root / "fsdp_resumed"
    train(cfg, out, *fsdp, "train.max_steps=3", "train.checkpoint_every=3", procs=2)
    shutil.rmtree(out / "response" / "rep0" / "final")
    resumed = train(cfg, out, *fsdp, procs=2)
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([straight[s] for s in (4, 5, 6)],
                                                            rel=1e-6)
    # the same checkpoint under DDP: refused by name, before any step
    import torch

    from wattkd.checkpoint import CheckpointError, load

    ckpt = out / "response" / "rep0" / "checkpoints" / "step_0000003"
    with pytest.raises(CheckpointError, match="train.strategy fsdp, this run uses ddp"):
        load(ckpt, module=None, optimizer=None, scheduler=None)  # type: ignore[arg-type]
    # a checkpoint that lacks a weight of the model is refused under FSDP too (set_state_dict
    # alone would keep the live value silently)
    bad = root / "fsdp_bad" / "response" / "rep0" / "checkpoints"
    shutil.copytree(ckpt, bad / ckpt.name)
    weights = torch.load(bad / ckpt.name / "model.pt", weights_only=True)
    dropped = next(k for k in weights if "layers.1." in k)
    torch.save({k: v for k, v in weights.items() if k != dropped}, bad / ckpt.name / "model.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "wattkd.cli", "train", str(cfg), "--method", "response",
           "--set", f"output_dir={root / 'fsdp_bad'}", *[x for f in fsdp for x in ("--set", f)]]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode != 0
    # the per-file checksums (issue 21) refuse the edited model.pt before the key check can
    assert (("does not fit this model" in res.stderr and dropped in res.stderr)
            or ("no valid checkpoint" in res.stderr and ckpt.name in res.stderr))


def lora_config(cfg: Path) -> Path:
    """The module's experiment with a LoRA student on a saved pretrained base (built once)."""
    from wattkd.models import build_from_config

    root = cfg.parent
    path, base = root / "lora.yaml", root / "lora_base"
    if not path.exists():
        build_from_config(MODEL, 4096, seed=3).save_pretrained(base)
        data = yaml.safe_load(cfg.read_text())
        data["student"] = {"model": str(base), "lora": {"r": 4, "alpha": 8, "dropout": 0.0,
                                                        "merge_on_save": False}}
        data["train"]["max_steps"] = 4
        path.write_text(yaml.safe_dump(data))
    return path


def test_fsdp_lora_student_matches_single_process_and_saves_its_adapter(cfg: Path) -> None:
    """LoRA under FSDP: frozen base and trainable adapters share units; rank 0 saves the
    adapter (whole, from the gathered state) as peft would on one process."""
    from safetensors.torch import load_file

    root = cfg.parent
    path = lora_config(cfg)
    single = train(path, root / "lora_single")
    fsdp = train(path, root / "lora_fsdp", "train.micro_batch_size=4", "train.strategy=fsdp",
                 procs=2)
    assert [fsdp[s] for s in sorted(single)] == pytest.approx([single[s] for s in
                                                               sorted(single)], rel=1e-5)
    files = {}
    for name in ("lora_single", "lora_fsdp"):
        final = root / name / "response" / "rep0" / "final"
        assert (final / "adapter_config.json").exists()
        files[name] = load_file(str(final / "adapter_model.safetensors"))
    a, b = files["lora_single"], files["lora_fsdp"]
    assert sorted(a) == sorted(b) and any("lora_A" in k for k in a)
    for k in a:
        assert b[k].shape == a[k].shape
        assert (b[k] - a[k]).abs().max() <= 1e-4 * (1 + a[k].abs().max()), k


def test_bf16_lora_base_changes_no_loss_and_shards_under_fsdp(cfg: Path) -> None:
    """student.dtype: bfloat16 stores the frozen LoRA base rounded as bf16 autocast would round
    it for every matmul: the same losses as the fp32 base, on one process and under FSDP."""
    from safetensors.torch import load_file

    root = cfg.parent
    path = lora_config(cfg)
    bf16_training, merged = "train.precision=bf16", "student.lora.merge_on_save=true"
    fp32 = train(path, root / "base_fp32", bf16_training, merged, "student.dtype=float32")
    bf16 = train(path, root / "base_bf16", bf16_training, merged, "student.dtype=bfloat16")
    steps = sorted(fp32)
    assert [bf16[s] for s in steps] == pytest.approx([fp32[s] for s in steps], rel=1e-6)
    fsdp = train(path, root / "base_bf16_fsdp", bf16_training, "student.dtype=bfloat16",
                 "train.micro_batch_size=4", "train.strategy=fsdp", procs=2)
    assert [fsdp[s] for s in steps] == pytest.approx([bf16[s] for s in steps], rel=1e-3)
    run = {name: json.loads((root / name / "response" / "rep0" / "run.json").read_text())
           for name in ("base_fp32", "base_bf16", "base_bf16_fsdp")}
    assert [run[n]["frozen_base_dtype"] for n in sorted(run)] == ["bfloat16", "bfloat16",
                                                                  "float32"]
    # The merge sums in fp32: final/ is fp32 and differs from the fp32 base's only by the
    # bf16 rounding of the (here fp32-initialised) base weights.
    finals = [load_file(str(root / n / "response" / "rep0" / "final" / "model.safetensors"))
              for n in ("base_fp32", "base_bf16")]
    assert sorted(finals[0]) == sorted(finals[1])
    for k, a in finals[0].items():
        b = finals[1][k]
        assert a.dtype == b.dtype == torch.float32, k
        assert (a - b).abs().max() <= 2 ** -8 * a.abs().max(), k
