"""The real-study configs, exercised on scaled-down random-init models of the same architecture.

The real teachers/students cannot be downloaded here, so each config's models are replaced by
tiny ones of the same `model_type` (same model class, layer names, LoRA target modules and
teacher/student width ratio); everything else — methods, losses, layer maps scaled to the tiny
depth, LoRA settings — is the config's own. Each method trains a few steps through `train()`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from wattkd.config import load, validate
from wattkd.distill.methods import get_method
from wattkd.jobs import student_job
from wattkd.train import train

REPO = Path(__file__).resolve().parents[1]

# (config, tiny teacher, tiny student, teacher depth scale, student depth scale)
TINY = {
    "gemma-270m": ({"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 1,
                    "head_dim": 32, "max_position_embeddings": 128, "sliding_window": 16},
                   None),
    "llama-3.1-70b-8b": ({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                          "num_hidden_layers": 8, "num_attention_heads": 4,
                          "num_key_value_heads": 2, "max_position_embeddings": 128},
                         {"model_type": "llama", "hidden_size": 32, "intermediate_size": 96,
                          "num_hidden_layers": 4, "num_attention_heads": 4,
                          "num_key_value_heads": 2, "max_position_embeddings": 128}),
    "qwen2.5-72b-7b": ({"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
                        "num_hidden_layers": 8, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "max_position_embeddings": 128},
                       {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 96,
                        "num_hidden_layers": 4, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "max_position_embeddings": 128}),
}


def scaled(name: str, root: Path) -> dict:
    cfg = load(REPO / "configs" / name / "study.yaml")
    data = cfg.model_dump(mode="json")
    teacher, student = TINY[name]
    t_layers, t_real = teacher["num_hidden_layers"], None
    data["output_dir"] = str(root / name)
    data["data"] = {"tokenizer": "bundled:bpe-4096", "seq_len": 32, "total_tokens": 20_000,
                    "shards_dir": str(root / "shards"), "rows_per_part": 128}
    data["teacher"] = {"build": teacher}
    if cfg.student.from_teacher_layers:
        t_real = 18  # Gemma 3 270M depth
        picks = sorted({round(i * (t_layers - 1) / (t_real - 1))
                        for i in cfg.student.from_teacher_layers})
        data["student"]["from_teacher_layers"] = picks
        s_layers = len(picks)
    else:
        # The real config loads a pretrained student: save a tiny one and load it the same way.
        from wattkd.models import build_from_config

        base = root / f"{name}-student"
        if not base.exists():
            build_from_config(student, 4096, seed=0).save_pretrained(base)
        data["student"]["model"] = str(base)
        s_layers = student["num_hidden_layers"]
    for method in data["distill"]["methods"]:
        if method["layer_map"]:
            s_max = max(s for s, _ in method["layer_map"])
            t_max = max(t for _, t in method["layer_map"])
            method["layer_map"] = [[max(1, round(s * s_layers / s_max)),
                                    max(1, round(t * t_layers / t_max))]
                                   for s, t in method["layer_map"]]
    data["distill"]["teacher_signals"] = "online"
    data["train"].update(max_steps=3, micro_batch_size=4, grad_accum=1, log_every=1,
                         checkpoint_every=0, eval_every=0, tensorboard=False, device="cpu",
                         repeats=1)
    data["telemetry"]["idle_seconds"] = 0
    return data


@pytest.mark.parametrize("name", sorted(TINY))
def test_study_config_runs_every_method_on_its_architecture(tmp_path_factory, name: str) -> None:
    from wattkd.data.shards import build_shards

    root = tmp_path_factory.mktemp("study")
    cfg = validate(scaled(name, root))
    build_shards(cfg.data, cfg.shards_dir, progress=False)
    real = load(REPO / "configs" / name / "study.yaml")
    for method in cfg.distill.methods:
        result = train(student_job(cfg, method.name), progress=False)
        assert result.status == "completed" and result.step == 3, (name, method.name)
        final = result.final_dir
        assert final is not None
        if real.student.lora is not None and not real.student.lora.merge_on_save:
            assert (final / "adapter_config.json").exists()
            from safetensors.torch import load_file

            weights = load_file(final / "adapter_model.safetensors")
            lora_b = [v for k, v in weights.items() if "lora_B" in k]
            # LoRA B starts at zero: non-zero means the config's target modules trained
            # (also through gradient checkpointing, which these configs enable).
            assert lora_b and all(v.abs().sum() > 0 for v in lora_b), method.name
        else:
            assert (final / "config.json").exists()


@pytest.mark.parametrize("config", sorted(p.relative_to(REPO).as_posix() for p in
                                          (REPO / "configs").rglob("*.yaml")))
def test_every_shipped_config_gives_each_method_the_batch_it_needs(config: str) -> None:
    """A shipped config must not be refused by its own pre-flight: relation KD compares the
    sequences of a micro-batch (RKD angle needs 3), so micro_batch_size 1 would stop it."""
    cfg = load(REPO / config)
    for method in cfg.distill.methods:
        need = get_method(method.method).min_batch(method)
        assert cfg.train.micro_batch_size >= need, (
            f"{config}: method {method.name} needs micro_batch_size >= {need}, "
            f"the config has {cfg.train.micro_batch_size}")
