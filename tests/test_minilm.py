"""MiniLM-style self-attention relation KD (distill/methods/minilm.py): against a hand-written
fp64 reference, gradients, the teacher cache against the online teacher, config errors, and
the example config training on CPU."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from wattkd.config import ConfigError, MethodConfig, validate
from wattkd.data.shards import build_shards
from wattkd.distill.modes import make_mode
from wattkd.distill.objective import DistillObjective, StepInputs
from wattkd.distill.teacher import OnlineTeacher
from wattkd.jobs import student_job, teacher_pretrain_job
from wattkd.teacher_cache import build_cache
from wattkd.train import train

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 256
TEACHER = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 64, "vocab_size": VOCAB,
           "initializer_range": 0.5}  # peaked relations: a KL well above fp32 rounding
STUDENT = {**TEACHER, "hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 1}   # q 24, k/v 12 wide
PARAMS = {"teacher_layer": 1, "student_layer": -1, "relation_heads": 2}
METHOD = {"name": "minilm", "method": "minilm", "params": PARAMS,
          "losses": [{"name": "attention_relation_kl", "weight": 1.0}]}


def model(build: dict, seed: int) -> torch.nn.Module:
    kwargs = dict(build)
    torch.manual_seed(seed)
    conf = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    return AutoModelForCausalLM.from_config(conf).eval()


def batch(b: int = 3, n: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, 6:] = 0   # padded tail
    mask[2, 3] = 0    # one masked position inside
    return {"input_ids": ids, "loss_mask": mask}


def method_config(**params) -> MethodConfig:
    return MethodConfig(**{**METHOD, "params": {**PARAMS, **params}})


def objective_loss(student, teacher_signals, method, inputs) -> torch.Tensor:
    mode = make_mode(method, student, (3, 32))
    obj = DistillObjective(student, mode, method, vocab=VOCAB, chunk_tokens=64)
    loss, parts = obj(inputs, teacher_signals)
    assert parts["attention_relation_kl"] == pytest.approx(float(loss.detach()))
    return loss


def reference(student, teacher, ids, mask, t_layer, s_layer, heads) -> float:
    """MiniLMv2 in fp64 with loops, Q/K/V recomputed from the layer input (no hooks)."""
    def qkv(m, layer):
        m = m.double()
        hs = m(input_ids=ids, output_hidden_states=True).hidden_states
        block = m.model.layers[layer]
        x = block.input_layernorm(hs[layer % len(m.model.layers)])
        return [getattr(block.self_attn, f"{p}_proj")(x) for p in "qkv"]

    s_all, t_all = qkv(student, s_layer), qkv(teacher, t_layer)
    total = 0.0
    b, n = ids.shape
    valid = mask.clone()
    valid[:, 0] = 1
    for s_x, t_x in zip(s_all, t_all):
        kl_sum, rows = 0.0, 0
        for i in range(b):
            for a in range(heads):
                for q in range(n):
                    if not valid[i, q]:
                        continue
                    keys = [k for k in range(q + 1) if valid[i, k]]
                    dists = []
                    for x in (t_x, s_x):
                        dr = x.shape[-1] // heads
                        h = x[i, :, a * dr:(a + 1) * dr]
                        z = torch.stack([h[q] @ h[k] / math.sqrt(dr) for k in keys])
                        dists.append(torch.softmax(z, 0))
                    p_t, p_s = dists
                    kl_sum += float((p_t * (p_t.log() - p_s.log())).sum())
                    rows += 1
        total += kl_sum / rows
    return total


def test_relation_loss_matches_fp64_reference_and_trains_the_student() -> None:
    teacher, student = model(TEACHER, 1), model(STUDENT, 2)
    method = method_config()
    raw = batch()
    mode = make_mode(method, student, (3, 32))
    signals = OnlineTeacher(teacher, mode.request).signals(raw)
    inputs = StepInputs.from_batch(raw, torch.device("cpu"))
    loss = objective_loss(student, signals, method, inputs)
    loss.backward()
    grads = {n: p.grad for n, p in student.named_parameters()}
    for proj in "qkv":  # the student's relation layer learns from the loss
        g = grads[f"model.layers.1.self_attn.{proj}_proj.weight"]
        assert g is not None and float(g.abs().sum()) > 0
    assert float(grads["model.layers.0.mlp.up_proj.weight"].abs().sum()) > 0
    want = reference(student, teacher, raw["input_ids"], raw["loss_mask"], 1, -1, 2)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert want > 0


def test_masked_positions_do_not_count() -> None:
    teacher, student = model(TEACHER, 1), model(STUDENT, 2)
    method = method_config()
    raw = batch()
    mode = make_mode(method, student, (3, 32))
    base = objective_loss(student, OnlineTeacher(teacher, mode.request).signals(raw), method,
                          StepInputs.from_batch(raw, torch.device("cpu")))
    changed = {**raw, "input_ids": raw["input_ids"].clone()}
    changed["input_ids"][1, 6:] = 7  # only padded positions change (they are last: causal)
    again = objective_loss(student, OnlineTeacher(teacher, mode.request).signals(changed),
                           method, StepInputs.from_batch(changed, torch.device("cpu")))
    assert float(again) == pytest.approx(float(base), rel=1e-6)


def experiment(root: Path, **distill) -> dict:
    return {
        "name": "mlm", "output_dir": str(root / "exp"),
        "data": {"tokenizer": "bundled:bpe-4096", "seq_len": 16, "total_tokens": 1024,
                 "shards_dir": str(root / "shards"), "rows_per_part": 16,
                 "heldout_fraction": 0.0},
        "teacher": {"build": {**TEACHER, "vocab_size": 4096}},
        "student": {"build": {**STUDENT, "vocab_size": 4096}},
        "distill": {"methods": [METHOD], "cache_dir": str(root / "cache"), **distill},
        "train": {"micro_batch_size": 4, "device": "cpu", "tensorboard": False},
        "telemetry": {"idle_seconds": 0, "enabled": False},
    }


def test_cache_holds_what_the_method_declares_and_equals_the_online_teacher(
        tmp_path: Path) -> None:
    from wattkd.data.shards import build_shards
    from wattkd.models import load_teacher
    from wattkd.teacher_cache import CachedTeacher, build_cache, read_cache_manifest
    from wattkd.teacher_cache.spec import default_spec

    cfg = validate(experiment(tmp_path))
    assert default_spec(cfg).canonical() == "qkv:1"
    build_shards(cfg.data, cfg.shards_dir, progress=False)
    root = build_cache(cfg, progress=False)
    assert "qkv_L1_q" in read_cache_manifest(root)["columns"]
    teacher = load_teacher(cfg.teacher, device=torch.device("cpu"), vocab_size=4096,
                           seed=cfg.train.seed)
    student = model({**STUDENT, "vocab_size": 4096}, 2)
    method = cfg.method("minilm")
    mode = make_mode(method, student, (3, 32))
    from wattkd.data.loader import ShardDataset

    ds = ShardDataset(cfg.shards_dir / "train", shuffle=False)
    rows = [0, 5, 9]
    samples = [ds.row(r) for r in rows]
    raw = {"input_ids": torch.stack([s["input_ids"] for s in samples]),
           "loss_mask": torch.stack([s["loss_mask"] for s in samples]),
           "row": torch.tensor(rows)}
    online = OnlineTeacher(teacher, mode.request).signals(raw)
    cached = CachedTeacher(cfg, mode.request, device="cpu").signals(raw)
    for proj in "qkv":  # the cache stores fp16: exactly the online values rounded
        assert torch.equal(cached.extra["qkv"][1][proj],
                           online.extra["qkv"][1][proj].half())
    inputs = StepInputs.from_batch(raw, torch.device("cpu"))
    with torch.no_grad():
        from_cache = objective_loss(student, cached, method, inputs)
        rounded = {1: {p: t.half() for p, t in online.extra["qkv"][1].items()}}
        online.extra["qkv"] = rounded
        from_online = objective_loss(student, online, method, inputs)
    assert float(from_cache) == float(from_online)


@pytest.mark.parametrize("params, message", [
    ({"teacher_layer": 3}, r"params.teacher_layer: 3 is out of range: the teacher has 3"),
    ({"student_layer": 2}, r"params.student_layer: 2 is out of range: the student has 2"),
    ({"relation_heads": 5}, r"params.relation_heads: 5 does not divide the teacher's q_proj"),
    ({"relation_heads": 0}, r"params.relation_heads: Input should be greater than 0"),
    ({"heads": 2}, r"params.heads: Extra inputs are not permitted"),
])
def test_bad_params_are_refused_at_config_load(tmp_path: Path, params: dict,
                                               message: str) -> None:
    data = experiment(tmp_path)
    data["distill"]["methods"] = [{**METHOD, "params": {**PARAMS, **params}}]
    with pytest.raises(ConfigError, match=message):
        validate(data)


def test_example_config_trains_two_steps_on_cpu(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "configs" / "examples" / "minilm.yaml").read_text())
    data["output_dir"] = str(tmp_path / "out")
    data["data"].update(total_tokens=16384, seq_len=32, heldout_fraction=0.0,
                        shards_dir=str(tmp_path / "shards"))
    data["teacher"]["pretrain"]["max_steps"] = 2
    data["train"].update(max_steps=2, micro_batch_size=4, log_every=1, tensorboard=False,
                         device="cpu", warmup_steps=0)
    data["telemetry"] = {"enabled": False, "idle_seconds": 0}
    cfg = validate(data)
    build_shards(cfg.data, cfg.shards_dir, progress=False)
    train(teacher_pretrain_job(cfg), progress=False)
    runs = {}
    for signals in ("online", "cache"):  # the same two steps from the teacher cache
        data["distill"]["teacher_signals"] = signals
        data["output_dir"] = str(tmp_path / "out" / signals) if signals == "cache" \
            else data["output_dir"]
        cfg = validate(data)
        if signals == "cache":
            shutil.copytree(tmp_path / "out" / "teacher", cfg.out / "teacher")
            build_cache(cfg, progress=False)
        result = train(student_job(cfg, "minilm"), progress=False)
        steps = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
        runs[signals] = [s["attention_relation_kl"] for s in steps if "attention_relation_kl" in s]
        assert result.status == "completed" and len(runs[signals]) >= 2
        assert all(math.isfinite(v) and v > 0 for v in runs[signals])
    # fp16 Q/K/V in the cache: the relation loss moves by far less than its value
    assert runs["cache"] == pytest.approx(runs["online"], rel=1e-2)


def test_qkv_signal_grammar() -> None:
    from wattkd.teacher_cache.spec import SpecError, parse_signals

    s = parse_signals("topk:8,qkv:3:1", default_k=64)
    assert s.extra == (("qkv", (1, 3)),) and s.canonical() == "topk:8,qkv:1:3"
    with pytest.raises(SpecError, match=r"'qkv:x'.*decoder layer index.*expected qkv:L"):
        parse_signals("qkv:x", default_k=64)
