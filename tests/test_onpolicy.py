"""On-policy distillation (distill/methods/onpolicy.py, training/rollouts.py): the loss on
fixed rollouts against an independent fp64 reference (reverse KL, JSD(beta), forward KL), the
seeded lambda mixing, the phase energy windows inside each step, exact resume with rollouts,
and the example config through the real `wattkd train` CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from wattkd.config import ConfigError, MethodConfig, validate
from wattkd.distill.modes import make_mode
from wattkd.distill.objective import DistillObjective, StepInputs
from wattkd.distill.teacher import OnlineTeacher
from wattkd.jobs import student_job
from wattkd.report.collect import load_run
from wattkd.report.onpolicy import step_split
from wattkd.train import train
from wattkd.training.rollouts import RolloutSource, StepPhases, TopKScores, is_on_policy

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 96
LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 64, "vocab_size": VOCAB, "initializer_range": 0.3}
GEMMA = {"model_type": "gemma3_text", "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
         "head_dim": 16, "max_position_embeddings": 64, "vocab_size": VOCAB,
         "sliding_window": 8, "query_pre_attn_scalar": 16, "final_logit_softcapping": 30.0,
         "initializer_range": 0.3}
P, C = 5, 6


def model(build: dict, seed: int) -> torch.nn.Module:
    kwargs = dict(build)
    torch.manual_seed(seed)
    conf = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    return AutoModelForCausalLM.from_config(conf).eval()


def method(loss: dict, **params) -> MethodConfig:
    return MethodConfig(name="op", method="onpolicy", losses=[loss],
                        params={"prompt_tokens": P, "completion_tokens": C, **params})


def rollouts_of(student, m: MethodConfig, seed: int = 0) -> RolloutSource:
    mode = make_mode(m, student, (2, 32))
    return RolloutSource(mode.rollout, student, seed=seed, rank=0, device=torch.device("cpu"),
                         eos_token_id=3)


def shard_batch(b: int = 3, n: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(4, VOCAB, (b, n), generator=g)}


def reference(student, teacher, ids, mask, name: str, beta: float, softcap) -> float:
    """Per-token divergence in fp64 over the whole vocabulary, averaged over loss tokens."""
    with torch.no_grad():
        zs = student.double()(input_ids=ids).logits[:, :-1]
        zt = teacher.double()(input_ids=ids).logits[:, :-1]
    student.float(), teacher.float()
    total, count = 0.0, 0
    for i in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if not mask[i, t + 1]:
                continue
            q = torch.softmax(zs[i, t], -1)
            p = torch.softmax(zt[i, t], -1)
            if name == "reverse_kl":
                d = (q * (q.log() - p.log())).sum()
            elif name == "forward_kl":
                d = (p * (p.log() - q.log())).sum()
            else:
                m = beta * p + (1 - beta) * q
                d = beta * (p * (p / m).log()).sum() + (1 - beta) * (q * (q / m).log()).sum()
            total += float(d)
            count += 1
    assert softcap is None or softcap == 30.0  # HF applies it inside .logits already
    return total / count


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("loss", [{"name": "reverse_kl"}, {"name": "forward_kl"},
                                  {"name": "jsd", "params": {"beta": 0.3}}])
def test_loss_on_fixed_rollouts_matches_fp64_reference(arch: str, loss: dict) -> None:
    build = LLAMA if arch == "llama" else GEMMA
    teacher = model({**build, "hidden_size": 48, "intermediate_size": 96}, 1)
    student = model(build, 2)
    m = method(loss, temperature=1.0)
    source = rollouts_of(student, m)
    batch = source.batch(shard_batch(), step=0, micro=0)
    ids, mask = batch["input_ids"], batch["loss_mask"]
    assert ids.shape == (3, P + C)
    assert mask[:, :P].sum() == 0 and mask[:, P:].sum() > 0   # the student's tokens only
    mode = make_mode(m, student, (2, 48))
    obj = DistillObjective(student, mode, m, vocab=VOCAB, chunk_tokens=7)
    signals = OnlineTeacher(teacher, mode.request).signals(batch)
    loss_value, _ = obj(StepInputs.from_batch(batch, torch.device("cpu")), signals)
    loss_value.backward()
    assert float(student.model.layers[0].mlp.up_proj.weight.grad.abs().sum()) > 0
    want = reference(student, teacher, ids, mask, loss["name"], 0.3,
                     getattr(student.config, "final_logit_softcapping", None))
    assert float(loss_value) == pytest.approx(want, rel=2e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_greedy_rollouts_on_cpu_are_hf_greedy_generate(arch: str) -> None:
    """The rollout path on CPU (generate's engine `auto` falls back to the eager loop):
    temperature 0 gives HF's own greedy `generate`, token for token, the first EOS ending a
    completion (padded after it) and only the generated tokens, EOS included, in the loss."""
    student = model(LLAMA if arch == "llama" else GEMMA, 2)
    raw = shard_batch()
    prompts = raw["input_ids"][:, :P]
    free = student.generate(prompts, attention_mask=torch.ones_like(prompts),
                            generation_config=GenerationConfig(
                                do_sample=False, max_new_tokens=C, min_new_tokens=C,
                                pad_token_id=0))
    eos = int(free[0, P + 2])   # a token row 0 emits greedily: a real stop at completion pos 2
    m = method({"name": "reverse_kl"}, temperature=0.0)
    source = RolloutSource(make_mode(m, student, (2, 32)).rollout, student, seed=0, rank=0,
                           device=torch.device("cpu"), eos_token_id=eos)
    got = source.batch(raw, 0, 0)
    ref = student.generate(prompts, attention_mask=torch.ones_like(prompts),
                           generation_config=GenerationConfig(
                               do_sample=False, max_new_tokens=C, eos_token_id=eos,
                               pad_token_id=eos))
    ref = torch.nn.functional.pad(ref, (0, P + C - ref.shape[1]), value=eos)
    assert torch.equal(got["input_ids"], ref)
    want = torch.zeros_like(ref)
    for i in range(ref.shape[0]):
        stop = next((t for t in range(P, P + C) if ref[i, t] == eos), P + C - 1)
        want[i, P:stop + 1] = 1
    assert torch.equal(got["loss_mask"], want) and want[0, P + 3:].sum() == 0
    assert source.last_new_tokens == int(want.sum())


def test_teacher_topk_equals_full_logits_when_k_is_the_vocab() -> None:
    teacher, student = model({**LLAMA, "hidden_size": 48}, 1), model(LLAMA, 2)
    m = method({"name": "reverse_kl"})
    batch = rollouts_of(student, m).batch(shard_batch(), 0, 0)
    mode = make_mode(m, student, (2, 48))
    obj = DistillObjective(student, mode, m, vocab=VOCAB, chunk_tokens=16)
    inputs = StepInputs.from_batch(batch, torch.device("cpu"))
    online = OnlineTeacher(teacher, mode.request)
    full, _ = obj(inputs, online.signals(batch))
    topk, _ = obj(inputs, TopKScores(online, VOCAB, VOCAB, 16).signals(batch))
    small, _ = obj(inputs, TopKScores(online, 4, VOCAB, 16).signals(batch))
    assert float(topk) == pytest.approx(float(full), rel=1e-5)
    assert float(small) != pytest.approx(float(full), rel=1e-3)


def test_lambda_mixing_is_seeded_and_picks_the_dataset_continuation() -> None:
    draws = [is_on_policy(7, s, m, 0.3) for s in range(400) for m in range(2)]
    assert draws == [is_on_policy(7, s, m, 0.3) for s in range(400) for m in range(2)]
    assert 0.25 < sum(draws) / len(draws) < 0.35
    assert draws != [is_on_policy(8, s, m, 0.3) for s in range(400) for m in range(2)]
    assert all(is_on_policy(0, s, 0, 1.0) for s in range(50))
    assert not any(is_on_policy(0, s, 0, 0.0) for s in range(50))
    student = model(LLAMA, 2)
    m = method({"name": "reverse_kl"}, **{"lambda": 0.3})
    source = rollouts_of(student, m, seed=7)
    raw = shard_batch()
    for step in range(12):
        out = source.batch(raw, step, 0)
        if is_on_policy(7, step, 0, 0.3):
            assert source.last_new_tokens > 0
        else:   # GKD's supervised batch: the row's own continuation, loss on it only
            assert source.last_new_tokens == 0
            assert torch.equal(out["input_ids"], raw["input_ids"][:, :P + C])
            assert out["loss_mask"][:, :P].sum() == 0 and out["loss_mask"][:, P:].all()


def test_rollout_reuse_and_generator_state_round_trip() -> None:
    student = model(LLAMA, 2)
    m = method({"name": "reverse_kl"}, rollout_every=3)
    a = rollouts_of(student, m)
    raw = shard_batch()
    first = a.batch(raw, 0, 0)["input_ids"]
    assert torch.equal(a.batch(raw, 2, 0)["input_ids"], first)   # reused
    state = a.state_dict()
    fresh = a.batch(raw, 3, 0)["input_ids"]                        # age 3: new rollout
    assert not torch.equal(fresh, first)
    b = rollouts_of(student, m, seed=99)
    b.load_state_dict(state)
    assert torch.equal(b.batch(raw, 3, 0)["input_ids"], fresh)
    # each rank samples with its own generator: rank 1 draws other tokens than rank 0
    ranks = [RolloutSource(make_mode(m, student, (2, 32)).rollout, student, seed=0, rank=r,
                           device=torch.device("cpu"), eos_token_id=3) for r in (0, 1)]
    assert not torch.equal(ranks[0].batch(raw, 0, 0)["input_ids"],
                           ranks[1].batch(raw, 0, 0)["input_ids"])


def test_phase_windows_sum_to_the_step_window(tmp_path: Path) -> None:
    """Two steps metered on a simulated GPU whose counter advances with time (300 W in 0.1 ms
    steps): each step window holds rollout, score and update windows, whose durations and
    energies add up to the step's within the edges' own reads."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_energy_fakes import FakeGpu, FakeNvml
    from wattkd.config import TelemetryConfig
    from wattkd.energy.ledger import EnergyMeter

    gpu = FakeGpu(uuid="GPU-aaaaaaaa-1111-2222-3333-444444444444", watts=300.0, period=1e-4)
    meter = EnergyMeter(TelemetryConfig(idle_seconds=0, progress_every_s=3600), tmp_path,
                        nvml_lib=FakeNvml([gpu]), leader=True)
    phases = StepPhases(meter, every=1)
    with meter:
        for step in (1, 2):
            with phases.step(step, 100):
                for name, tokens in (("rollout", 7), ("score", 50), ("update", 50)):
                    phases.switch(name, tokens)
                    time.sleep(0.03)   # the phase's work: the counter runs meanwhile
        with pytest.raises(KeyError), phases.step(3, 100):   # a failing step
            phases.switch("rollout")
            phases.switch("score")
            raise KeyError("boom")
    recs = [json.loads(line) for line in (tmp_path / "phases.jsonl").read_text().splitlines()]
    ends = [r for r in recs if r["kind"] == "phase"]
    for step in (1, 2):
        mine = [r for r in ends if r["meta"].get("step") == step]
        outer = next(r for r in mine if r["phase"] == "step")
        inner = [r for r in mine if r["phase"] != "step"]
        assert [r["phase"] for r in inner] == ["rollout", "score", "update"]
        assert all(r["parent"] == "step" and r["depth"] == outer["depth"] + 1 for r in inner)
        assert [r["tokens"] for r in inner] == [7, 50, 50] and outer["tokens"] == 100
        dur = sum(r["duration_s"] for r in inner)
        assert dur <= outer["duration_s"] and dur == pytest.approx(outer["duration_s"],
                                                                   rel=0.05)
        e_in = sum(r["energy_j"]["gpu"] for r in inner)
        e_out = outer["energy_j"]["gpu"]
        assert e_out > 300 * 0.09 and e_in == pytest.approx(e_out, rel=0.05)
    failed = {r["phase"]: r["status"] for r in ends if r["meta"].get("step") == 3}
    assert failed == {"rollout": "ok", "score": "error", "step": "error"}


# ---------------------------------------------------------------------------- through train
def experiment(out: Path, **train_kw) -> dict:
    data = yaml.safe_load((ROOT / "configs" / "examples" / "onpolicy.yaml").read_text())
    data["output_dir"] = str(out)
    data["data"].update(seq_len=32, total_tokens=20_000, heldout_fraction=0.0,
                        shards_dir=str(out.parent / "shards"))
    data["teacher"] = {"build": {**data["teacher"]["build"], "hidden_size": 32,
                                 "intermediate_size": 64, "num_hidden_layers": 2}}
    data["distill"]["methods"][0]["params"].update(prompt_tokens=8, completion_tokens=8,
                                                   rollout_every=2, **{"lambda": 0.6})
    data["train"] = {"max_steps": 6, "micro_batch_size": 4, "grad_accum": 2, "lr": 3e-3,
                     "log_every": 1, "checkpoint_every": 3, "device": "cpu", "schedule": "constant",
                     "tensorboard": False, **train_kw}
    data["telemetry"] = {"idle_seconds": 0, "cpu_watts_per_core": 10.0}
    data["eval"] = {"suite": None}
    return data


def losses(run_dir: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] in ("train", "step"):
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wattkd.data.shards import build_shards

    root = tmp_path_factory.mktemp("onpolicy")
    cfg = validate(experiment(root / "exp"))
    build_shards(cfg.data, cfg.shards_dir, progress=False)
    return root


def test_exact_resume_with_rollouts(shards: Path) -> None:
    """Stop after step 3's checkpoint, resume: losses and weights as an uninterrupted run."""
    straight = validate(experiment(shards / "straight"))
    train(student_job(straight, "onpolicy"), progress=False)
    cut = validate(experiment(shards / "cut", max_steps=3))
    train(student_job(cut, "onpolicy"), progress=False)
    resumed = validate(experiment(shards / "cut", max_steps=6))
    result = train(student_job(resumed, "onpolicy"), progress=False)
    assert result.status == "completed" and result.step == 6
    a, b = straight.out / "onpolicy" / "rep0", resumed.out / "onpolicy" / "rep0"
    assert losses(a) == losses(b) and len(losses(a)) == 6
    wa = torch.load(a / "checkpoints" / "step_0000006" / "model.pt", weights_only=True)
    wb = torch.load(b / "checkpoints" / "step_0000006" / "model.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    recs = [json.loads(x) for x in (b / "phases.jsonl").read_text().splitlines()]
    names = {r["phase"] for r in recs if r["kind"] == "phase" and r.get("parent") == "step"}
    assert names == {"rollout", "score", "update"}
    # the report's phase split of the uninterrupted run: 6 steps x 8 sequences x 16 tokens
    split = step_split(load_run(a), "cpu")
    ph = split.phases
    assert split.steps == 6 and split.step_tokens == 6 * 8 * 16
    assert ph["score"].tokens == ph["update"].tokens == 6 * 8 * 16
    assert 0 < ph["rollout"].tokens <= 6 * 8 * 8
    inner = sum(p.energy.value for p in ph.values())
    assert inner <= split.step_energy.value * 1.001
    assert sum(p.share.value for p in ph.values()) == pytest.approx(
        100 * inner / split.step_energy.value)


def test_bad_params_refused_at_config_load(shards: Path) -> None:
    data = experiment(shards / "bad")
    data["distill"]["methods"][0]["params"]["completion_tokens"] = 40
    with pytest.raises(ConfigError, match="exceeds data.seq_len 32"):
        validate(data)
    data = experiment(shards / "bad")
    data["distill"]["teacher_signals"] = "cache"
    with pytest.raises(ConfigError, match="expected online"):
        validate(data)
    data = experiment(shards / "bad")
    data["distill"]["methods"][0]["params"]["lambda"] = 1.5
    with pytest.raises(ConfigError, match="lambda"):
        validate(data)


def test_example_config_trains_two_steps_through_the_cli(shards: Path) -> None:
    data = experiment(shards / "cli", max_steps=2, checkpoint_every=0)
    path = shards / "cli.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "wattkd.cli", "train", str(path), "--method",
                           "onpolicy"], check=False, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = shards / "cli" / "onpolicy" / "rep0"
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    assert sorted(losses(run)) == [1, 2] and (run / "final").is_dir()


def test_ddp_ranks_draw_their_own_rollouts_and_resume_exactly(shards: Path) -> None:
    """2 processes under torchrun (gloo): each rank's generator is its own (both states in the
    checkpoint), and a resumed DDP run continues with the uninterrupted run's losses."""
    data = experiment(shards / "ddp", max_steps=4, checkpoint_every=2, grad_accum=1,
                      micro_batch_size=2)
    path = shards / "ddp.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}

    def run(out: Path, *sets: str) -> dict[int, float]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "wattkd.cli", "train", str(path), "--method",
               "onpolicy", "--set", f"output_dir={out}", *[a for s in sets
                                                         for a in ("--set", s)]]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                             check=False)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        return losses(out / "onpolicy" / "rep0")

    straight = run(shards / "ddp-straight")
    cut = shards / "ddp-cut"
    run(cut, "train.max_steps=2")
    rng = torch.load(cut / "onpolicy" / "rep0" / "checkpoints" / "step_0000002" / "rng.pt",
                     weights_only=True)
    gens = [r["rollouts"]["generator"] for r in rng]
    assert len(gens) == 2 and not torch.equal(gens[0], gens[1])
    shutil.rmtree(cut / "onpolicy" / "rep0" / "final")
    resumed = run(cut)
    assert sorted(resumed) == [1, 2, 3, 4]
    assert [resumed[s] for s in (3, 4)] == pytest.approx([straight[s] for s in (3, 4)],
                                                         rel=1e-6)


def test_phase_every_meters_every_kth_step(tmp_path: Path) -> None:
    from wattkd.energy.ledger import NullMeter

    phases = StepPhases(NullMeter(None, tmp_path), every=2)
    for step in range(1, 6):
        with phases.step(step, 10):
            phases.switch("rollout", 1)
            phases.switch("update", 10)
    recs = [json.loads(x) for x in (tmp_path / "phases.jsonl").read_text().splitlines()]
    ends = [(r["phase"], r["meta"]["step"]) for r in recs if r["kind"] == "phase"]
    assert ends == [("rollout", 2), ("update", 2), ("step", 2),
                    ("rollout", 4), ("update", 4), ("step", 4)]


def test_teacher_topk_scores_through_the_loop(shards: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = TopKScores.signals

    def counted(self, batch):
        sig = original(self, batch)
        calls.append(sig.topk.ids.shape[-1])
        return sig

    monkeypatch.setattr(TopKScores, "signals", counted)
    data = experiment(shards / "topk", max_steps=2, checkpoint_every=0)
    data["distill"]["methods"][0]["params"]["teacher_topk"] = 8
    data["distill"]["methods"][0]["losses"] = [{"name": "jsd", "params": {"beta": 0.5}}]
    cfg = validate(data)
    result = train(student_job(cfg, "onpolicy"), progress=False)
    got = losses(cfg.out / "onpolicy" / "rep0")
    assert result.status == "completed" and sorted(got) == [1, 2]
    assert all(0 < v < 10 for v in got.values())
    assert calls == [8] * 4   # 2 steps x grad_accum 2, each scored as top-8 + tail


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU path: CUDA, bf16 autocast")
def test_onpolicy_trains_on_cuda_with_bf16_rollouts_from_the_graph_engine(shards: Path) -> None:
    """On CUDA under bf16 the rollouts decode a bf16 copy of the fp32 student through the graph
    engine; the student is built on the CPU and moved by accelerate (a copy left on the CPU
    once failed the first rollout)."""
    data = experiment(shards / "cuda", max_steps=2, checkpoint_every=0, device="cuda",
                      precision="bf16")
    cfg = validate(data)
    result = train(student_job(cfg, "onpolicy"), progress=False)
    got = losses(cfg.out / "onpolicy" / "rep0")
    assert result.status == "completed" and sorted(got) == [1, 2]
    assert all(0 < v < 10 for v in got.values())
