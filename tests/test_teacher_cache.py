"""Teacher cache: exactness against the online teacher, refusal of mismatches, resume after
SIGKILL, amortisation bookkeeping. Real tiny llama teacher, real shards, real Parquet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wattkd.amortisation import amortisation, cache_users, record_cache_use
from wattkd.config import validate
from wattkd.distill.losses import LogitChunk, TopKTeacher, forward_kl, reverse_kl
from wattkd.distill.signals import SignalRequest
from wattkd.distill.teacher import OnlineTeacher
from wattkd.hashing import file_sha256
from wattkd.teacher_cache import (
    CachedTeacher,
    CacheError,
    build_cache,
    check_cache,
    read_cache_manifest,
)

VOCAB = 4096
# initializer_range 1.0 makes the random teacher's next-token distributions peaked, like a
# trained model's, so the top-k holds most of the mass and the tail is a real bucket.
TEACHER = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 64, "tie_word_embeddings": True,
           "initializer_range": 1.0}
STUDENT = {**TEACHER, "initializer_range": 0.5}
METHODS = [
    {"name": "response", "method": "response",
     "losses": [{"name": "forward_kl", "params": {"temperature": 2.0}},
                {"name": "ce", "weight": 0.5}]},
    {"name": "feature", "method": "feature", "layer_map": [[1, 1], [2, 2]],
     "losses": [{"name": "hidden_mse"}, {"name": "ce"}]},
    {"name": "relation", "method": "relation", "pooling": "last",
     "losses": [{"name": "rkd_distance"}, {"name": "ce"}]},
]
SIGNALS = "topk:16,hidden:1:2,pooled:mean:last"


def experiment(root: Path, cache: str = "cache", **over: object) -> dict:
    cfg = {
        "name": "tc", "output_dir": str(root / "exp"),
        "data": {"tokenizer": "bundled:bpe-4096", "seq_len": 32, "total_tokens": 2048,
                 "shards_dir": str(root / "shards"), "rows_per_part": 20,
                 "heldout_fraction": 0.0},
        "teacher": {"build": TEACHER},
        "student": {"build": STUDENT},
        "distill": {"methods": METHODS, "cache_top_k": 16,
                    "cache_dir": str(root / cache)},
        "train": {"micro_batch_size": 8, "device": "cpu", "tensorboard": False},
        "telemetry": {"idle_seconds": 0, "cpu_watts_per_core": 10.0},
    }
    for key, value in over.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Shards (64 rows of 32 tokens in 4 parts) and two caches of them: packed and raw."""
    from wattkd.data.shards import build_shards

    root = tmp_path_factory.mktemp("tcache")
    cfg = validate(experiment(root))
    build_shards(cfg.data, cfg.shards_dir, progress=False)
    build_cache(cfg, SIGNALS, progress=False)
    raw = validate(experiment(root, "cache_raw"))
    build_cache(raw, "topk", progress=False, encoding="raw")
    return {"root": root, "cfg": cfg, "raw": raw}


def batch_of(cfg, rows: list[int]) -> dict[str, torch.Tensor]:
    from wattkd.data.loader import ShardDataset

    ds = ShardDataset(cfg.shards_dir / "train", shuffle=False)
    samples = [ds.row(r) for r in rows]
    return {"input_ids": torch.stack([s["input_ids"] for s in samples]),
            "loss_mask": torch.stack([s["loss_mask"] for s in samples]),
            "row": torch.tensor(rows)}


def teacher_of(cfg):
    from wattkd.models import load_teacher

    return load_teacher(cfg.teacher, device=torch.device("cpu"), vocab_size=VOCAB,
                        seed=cfg.train.seed)


def online_topk(teacher, batch, k: int) -> TopKTeacher:
    """The online teacher's dense logits restricted to its top-k, as the cache defines them."""
    from wattkd.distill.objective import teacher_source

    sig = OnlineTeacher(teacher, SignalRequest(logits=True)).signals(batch)
    dense = teacher_source(sig, VOCAB).take(slice(None))
    logp = torch.log_softmax(dense.logits, -1)
    vals, idx = logp.topk(k, -1)
    tail = torch.logsumexp(logp.scatter(-1, idx, float("-inf")), -1)
    return TopKTeacher(idx, vals, tail)


def cached_topk(cfg, batch) -> TopKTeacher:
    from wattkd.distill.objective import teacher_source

    provider = CachedTeacher(cfg, SignalRequest(logits=True), rank=0, world_size=1,
                             device="cpu")
    return teacher_source(provider.signals(batch), VOCAB)


# ------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("which,tol", [("raw", 1e-5), ("cfg", 1e-3)])
def test_cached_topk_loss_matches_online_teacher(ws: dict, which: str, tol: float) -> None:
    """Same batch: KD loss on cached top-k == on the online teacher's top-k, for raw (fp32)
    exactly and for the default packed encoding within fp16-level tolerance."""
    cfg = ws[which]
    batch = batch_of(cfg, [5, 41, 17, 60, 0, 33])
    teacher = teacher_of(cfg)
    online = online_topk(teacher, batch, 16)
    cached = cached_topk(cfg, batch)
    torch.manual_seed(0)
    student = torch.randn(online.num_tokens, VOCAB) * 3
    for fn in (forward_kl, reverse_kl):
        for t in (1.0, 2.0):
            a = fn(LogitChunk(student), online, None, temperature=t).mean()
            b = fn(LogitChunk(student), cached, None, temperature=t).mean()
            assert abs(float(a - b)) <= tol * abs(float(a)), (fn.__name__, t, a, b)
    # the same K ids per position (packed stores them sorted by id)
    assert torch.equal(online.ids.sort(-1).values, cached.ids.sort(-1).values)


@pytest.mark.parametrize("which,tol", [("raw", 1e-5), ("cfg", 1e-2)])
def test_topk_mass_plus_tail_is_one(ws: dict, which: str, tol: float) -> None:
    cfg = ws[which]
    batch = batch_of(cfg, list(range(64)))
    t = cached_topk(cfg, batch)
    total = t.logprobs.double().exp().sum(-1) + t.tail_logprob.double().exp()
    assert torch.allclose(total, torch.ones_like(total), atol=tol, rtol=0), total
    assert (t.tail_logprob.exp() > 1e-4).any()  # the tail is a real bucket here


def test_hidden_and_pooled_match_online(ws: dict) -> None:
    cfg = ws["cfg"]
    batch = batch_of(cfg, [3, 30, 63])
    req = SignalRequest(hidden_layers=(1, 2), pooled="last")
    online = OnlineTeacher(teacher_of(cfg), req).signals(batch)
    cached = CachedTeacher(cfg, req, rank=0, world_size=1, device="cpu").signals(batch)
    for i in (1, 2):
        assert cached.hidden[i].dtype == torch.float16
        torch.testing.assert_close(cached.hidden[i].float(), online.hidden[i], rtol=1e-3,
                                   atol=1e-3)
    torch.testing.assert_close(cached.pooled["last"], online.pooled["last"], rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("method", ["response", "feature", "relation"])
def test_training_from_cache_follows_online_trajectory(ws: dict, method: str) -> None:
    """Four optimizer steps from the same init on the same batches: the loss trajectory from
    a full-vocabulary cache (top-k = vocab, so the top-k loss is the dense loss) equals the
    online teacher's within the encoding's tolerance."""
    from wattkd.data.loader import epoch_permutation
    from wattkd.distill.modes import make_mode
    from wattkd.distill.objective import DistillObjective, StepInputs
    from wattkd.models import build_student, teacher_dims

    root, base = ws["root"], ws["cfg"]
    cfg = base
    if method == "response":
        cfg = validate(experiment(root, "cache_full"))
        if not (cfg.cache_dir / "manifest.json").exists():
            build_cache(cfg, f"topk:{VOCAB}", progress=False)
    m = cfg.method(method)
    teacher = teacher_of(cfg)
    order = epoch_permutation([p["rows"] for p in
                               json.loads((cfg.shards_dir / "train" / "manifest.json")
                                          .read_text())["parts"]], seed=0, epoch=0)
    runs = {}
    for kind in ("online", "cache"):
        student = build_student(cfg.student, teacher=teacher, vocab_size=VOCAB, seed=1,
                                frozen_dtype=torch.float32)
        mode = make_mode(m, student, teacher_dims(None, model=teacher))
        torch.manual_seed(0)
        obj = DistillObjective(student, mode, m, vocab=VOCAB, chunk_tokens=128)
        provider = (OnlineTeacher(teacher, mode.request) if kind == "online" else
                    CachedTeacher(cfg, mode.request, rank=0, world_size=1, device="cpu"))
        opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=3e-3)
        losses = []
        for step in range(4):
            batch = batch_of(cfg, [int(r) for r in order[step * 8:(step + 1) * 8]])
            loss, _ = obj(StepInputs.from_batch(batch, torch.device("cpu")),
                          provider.signals(batch))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
        runs[kind] = losses
    a, b = np.array(runs["online"]), np.array(runs["cache"])
    assert np.all(np.abs(a - b) <= 2e-3 * np.abs(a)), runs
    assert a[-1] != a[0]  # it trained


# ------------------------------------------------------------------------------- refusals
def test_mismatched_cache_is_refused(ws: dict, tmp_path: Path) -> None:
    from wattkd.data.shards import build_shards

    cfg, root = ws["cfg"], ws["root"]
    shards = cfg.shards_dir / "train"
    check_cache(cfg, shards)  # the right pairing passes

    other_teacher = validate(experiment(root, teacher={
        "build": {**TEACHER, "hidden_size": 48}}))
    with pytest.raises(CacheError, match="another teacher"):
        check_cache(other_teacher, shards)

    other = validate(experiment(tmp_path, data={"seed": 7}))
    build_shards(other.data, other.shards_dir, progress=False)
    with pytest.raises(CacheError, match="other shards"):
        check_cache(cfg, other.shards_dir / "train")

    # a cache recorded with another tokenizer (its manifest says so)
    fake = tmp_path / "fake"
    fake.mkdir()
    m = read_cache_manifest(cfg.cache_dir)
    m["identity"]["tokenizer_sha256"] = "0" * 64
    (fake / "manifest.json").write_text(json.dumps(m))
    for p in m["parts"]:
        os.symlink(cfg.cache_dir / p["file"], fake / p["file"])
    faked = validate(experiment(root, str(fake)))
    with pytest.raises(CacheError, match="another tokenizer"):
        check_cache(faked, shards)

    with pytest.raises(CacheError, match=r"\(topk:16\) lacks hidden states of layers \[1\]"):
        CachedTeacher(ws["raw"], SignalRequest(hidden_layers=(1,)), rank=0, world_size=1)
    with pytest.raises(CacheError, match=r"hidden states of layers \[0\]"):
        check_cache(cfg, shards, request=SignalRequest(hidden_layers=(0, 1)))

    m["version"] = 99
    (fake / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match="version 99 is not supported"):
        check_cache(faked, shards)

    # a batch whose tokens are not the cached row's
    provider = CachedTeacher(cfg, SignalRequest(logits=True), rank=0, world_size=1)
    batch = batch_of(cfg, [1, 2])
    batch["row"] = torch.tensor([2, 1])
    with pytest.raises(CacheError, match="misaligned"):
        provider.signals(batch)


def test_existing_different_cache_not_overwritten(ws: dict) -> None:
    cfg = ws["cfg"]
    before = file_sha256(cfg.cache_dir / "manifest.json")
    with pytest.raises(CacheError, match="holds another teacher cache"):
        build_cache(cfg, "topk:8", progress=False)
    assert build_cache(cfg, SIGNALS, progress=False) == cfg.cache_dir  # same: no-op
    assert file_sha256(cfg.cache_dir / "manifest.json") == before


# ------------------------------------------------------------------------------- resume
KILLER = r"""
import json, os, signal, sys
import wattkd.teacher_cache.writer as w
from wattkd.config import validate
cfg = validate(json.loads(sys.argv[1]))
orig, calls = w._encode, [0]
def encode(*a, **k):
    calls[0] += 1
    if calls[0] == int(sys.argv[3]):   # mid-part: earlier parts complete, this one half done
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(*a, **k)
w._encode = encode
w.build_cache(cfg, sys.argv[2], progress=False)
"""


def test_killed_build_resumes_to_identical_cache(ws: dict) -> None:
    cfg, root = ws["cfg"], ws["root"]
    spec = experiment(root, "cache_killed")
    killed = validate(spec)
    # 20-row parts in batches of 8: 3 encode calls per part; call 8 is inside part 2
    proc = subprocess.run([sys.executable, "-c", KILLER, json.dumps(spec), SIGNALS, "8"],
                          check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] /
                                                               "src")})
    assert proc.returncode == -9, proc.stderr[-2000:]
    state = json.loads((killed.cache_dir / "build-state.json").read_text())
    assert sorted(state["parts"]) == ["0", "1"]
    assert list(killed.cache_dir.glob(".part-00002.parquet.tmp-*"))  # the half-written part
    with pytest.raises(CacheError, match="unfinished"):
        check_cache(killed, killed.shards_dir / "train")

    build_cache(killed, SIGNALS, progress=False)
    assert not list(killed.cache_dir.glob(".part-*tmp*"))
    a, b = read_cache_manifest(cfg.cache_dir), read_cache_manifest(killed.cache_dir)
    assert [p["sha256"] for p in a["parts"]] == [p["sha256"] for p in b["parts"]]
    for key in ("identity", "columns", "rows", "tokens", "signals", "bytes"):
        assert a[key] == b[key], key
    sessions = b["energy"]["sessions"]
    # the killed session's window is closed by the energy ledger at its last progress record
    # (issue #16: before, its energy was lost and the total was a lower bound)
    assert [s["status"] for s in sessions] == ["recovered", "metered"]
    assert sessions[0]["energy_j"]["cpu"] is not None and "recovered" in sessions[0]["flags"]
    assert sessions[1]["parts"] == [2, 3]
    assert b["energy"]["complete"] is True
    assert a["energy"]["complete"] is True and a["energy"]["estimated"] is True
    check_cache(killed, killed.shards_dir / "train", verify="sha256")


# -------------------------------------------------------------------------- bookkeeping
def test_manifest_reports_bytes_and_energy(ws: dict) -> None:
    m = read_cache_manifest(ws["cfg"].cache_dir)
    files = sum((ws["cfg"].cache_dir / p["file"]).stat().st_size for p in m["parts"])
    assert m["bytes"]["total"] == files
    assert m["bytes"]["per_token"] == pytest.approx(files / m["tokens"])
    by = m["bytes"]["per_token_by_signal"]
    assert set(by) == {"topk", "hidden", "pooled", "meta"}
    assert sum(by.values()) < m["bytes"]["per_token"]
    raw = read_cache_manifest(ws["raw"].cache_dir)
    assert raw["bytes"]["per_token_by_signal"]["topk"] > 2 * by["topk"]
    e = m["energy"]
    assert e["component"] == "cpu" and e["source"] == "estimated-cpu-time" and e["estimated"]
    assert e["energy_j"] > 0 and e["j_per_token"] == pytest.approx(e["energy_j"] / m["tokens"])
    assert m["identity"]["teacher_dtype"] == "float32"
    assert m["signals"]["hidden"]["dtype"] == "float16"


def test_record_cache_use_and_amortisation(ws: dict, tmp_path: Path) -> None:
    cache = ws["raw"].cache_dir
    assert amortisation(cache)["share_j"] is None  # no users yet
    a = record_cache_use(cache, tmp_path / "response" / "rep0")
    record_cache_use(cache, tmp_path / "response" / "rep0")  # a resumed run: counted once
    record_cache_use(cache, tmp_path / "feature" / "rep0")
    assert a["sha256"] == file_sha256(cache / "manifest.json")
    assert a["estimated"] is True and a["energy_j"] > 0 and a["source"] == "estimated-cpu-time"
    am = amortisation(cache)
    assert len(am["users"]) == 2 and len(cache_users(cache)) == 2
    assert am["share_j"] == pytest.approx(a["energy_j"] / 2)


# -------------------------------------------------------------------------------- signals
def test_signals_grammar_and_config_defaults(ws: dict) -> None:
    from wattkd.teacher_cache.spec import SpecError, default_spec, parse_signals

    s = parse_signals("topk:32, hidden:4:2:bf16:stride=8 ,pooled:last", default_k=64)
    assert (s.topk, s.hidden_layers, s.hidden_dtype, s.hidden_stride, s.pooled) == \
        (32, (2, 4), "bfloat16", 8, ("last",))
    assert s.canonical() == "topk:32,hidden:2:4:bf16:stride=8,pooled:last"
    assert parse_signals("topk", default_k=64).topk == 64
    for bad, msg in [("topk:0", "positive integer"), ("hidden", "at least one layer"),
                     ("hidden:x", "not a layer index"), ("pooled:max", "pooling 'max'"),
                     ("logits", "unknown signal"), ("topk,topk:3", "given twice"), ("", "empty")]:
        with pytest.raises(SpecError, match=msg):
            parse_signals(bad, default_k=64)
    d = default_spec(ws["cfg"])  # response -> topk, feature layer_map -> 1, 2, relation -> last
    assert (d.topk, d.hidden_layers, d.pooled, d.encoding) == (16, (1, 2), ("last",), "packed")


def test_hidden_token_subset_is_written_and_read_by_feature_training(ws: dict) -> None:
    """A strided cache (distill.cache_hidden_stride / hidden:...:stride=S) holds positions
    0, S, 2S, ...: the cached teacher returns exactly those positions of the full cache, and
    feature KD aligns the student's hidden states at the same positions."""
    from wattkd.distill.methods.feature import FeatureMode
    from wattkd.distill.objective import StepInputs

    data = experiment(ws["root"], "cache_stride")
    data["distill"]["cache_hidden_stride"] = 4
    data["distill"]["cache_hidden_layers"] = [1]
    cfg = validate(data)
    build_cache(cfg, None, progress=False)
    m = read_cache_manifest(cfg.cache_dir)
    assert m["signals"]["hidden"] == {"layers": [1], "dtype": "float16", "stride": 4,
                                      "positions": 8}
    assert m["columns"]["hidden_L1"]["shape"] == [8, 32]
    batch = batch_of(cfg, [5, 41, 17])
    strided = CachedTeacher(cfg, SignalRequest(hidden_layers=(1,)), rank=0, world_size=1,
                            device="cpu").signals(batch)
    full = CachedTeacher(ws["cfg"], SignalRequest(hidden_layers=(1,)), rank=0, world_size=1,
                         device="cpu").signals(batch)
    assert strided.hidden_stride == 4 and full.hidden_stride == 1
    assert torch.equal(strided.hidden[1], full.hidden[1][:, ::4])
    method = cfg.method("feature").model_copy(update={"layer_map": [(1, 1)],
                                                      "token_subsample": 1.0})
    mode = FeatureMode(method, 32, 32)
    student_h = [torch.randn(3, 32, 32) for _ in range(3)]
    inputs = StepInputs.from_batch(batch, torch.device("cpu"))
    got, _ = mode(inputs, student_h[-1], student_h, strided)
    # the same loss computed by hand on positions 0, 4, ..., 28 (all of them count here)
    proj = mode.projectors[0](student_h[1][:, ::4].reshape(-1, 32)).float()
    ref = mode.terms[0][0].fn(proj, strided.hidden[1].reshape(-1, 32).float(),
                              **mode.terms[0][2]) * mode.terms[0][1]
    assert torch.allclose(got, ref)


def test_small_row_groups_threaded_reads_and_prefetch(ws: dict, monkeypatch) -> None:
    """One row per row group: a batch reads many groups of one part in parallel threads, and
    prefetch reads ahead in another; the decoded signals equal those of the fixture cache."""
    from wattkd.teacher_cache import plan

    monkeypatch.setattr(plan, "ROW_GROUP_BYTES", 1)
    cfg = validate(experiment(ws["root"], "cache_rg1"))
    build_cache(cfg, SIGNALS, progress=False)
    assert read_cache_manifest(cfg.cache_dir)["parts"][0]["row_group_rows"] == 1
    req = SignalRequest(logits=True, hidden_layers=(2,), pooled="mean")
    small = CachedTeacher(cfg, req, rank=0, world_size=1, device="cpu")
    ref = CachedTeacher(ws["cfg"], req, rank=0, world_size=1, device="cpu")
    rng = np.random.default_rng(0)
    stream = [batch_of(cfg, rng.choice(64, 12, replace=False).tolist()) for _ in range(5)]
    seen = 0
    for batch in small.prefetch(iter(stream), depth=2):
        a, b = small.signals(batch), ref.signals(batch)
        assert torch.equal(a.topk.ids, b.topk.ids) and torch.equal(a.topk.logprobs,
                                                                   b.topk.logprobs)
        assert torch.equal(a.hidden[2], b.hidden[2])
        assert torch.equal(a.pooled["mean"], b.pooled["mean"])
        seen += 1
    assert seen == 5 and not small._ahead


def test_cli_teacher_cache_command(ws: dict, tmp_path: Path) -> None:
    """`wattkd teacher cache CONFIG --signals ...` reaches build_cache (here: already built)."""
    import yaml
    from typer.testing import CliRunner

    from wattkd.cli import app

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment(ws["root"])))
    res = CliRunner().invoke(app, ["teacher", "cache", str(path), "--signals", SIGNALS])
    assert res.exit_code == 0, res.output
    assert str(ws["cfg"].cache_dir) in res.output


def test_training_checks_the_cache_once_and_before_any_model_loads(ws: dict,
                                                                   monkeypatch) -> None:
    """`wattkd train` from the cache reads and checks its manifest once (not again when the
    provider opens it), and a cache that lacks the method's signal is refused before the
    teacher or the student is built."""
    import wattkd.train as train_mod
    from wattkd.jobs import student_job
    from wattkd.teacher_cache import reader

    calls: list[object] = []
    real = reader.check_cache

    def counting(*a, **k):
        calls.append(k.get("request"))
        return real(*a, **k)

    monkeypatch.setattr(reader, "check_cache", counting)
    monkeypatch.setattr(train_mod, "check_cache", counting)
    cfg = validate(experiment(ws["root"], distill={"teacher_signals": "cache"},
                              output_dir=str(ws["root"] / "once"),
                              train={"max_steps": 1, "micro_batch_size": 8, "device": "cpu",
                                     "tensorboard": False}))
    train_mod.train(student_job(cfg, "feature"), progress=False)
    assert len(calls) == 1 and calls[0] is not None, calls  # once, with the method's request

    # the raw cache holds top-k only: the feature method's hidden states are missing
    raw = validate(experiment(ws["root"], "cache_raw", distill={"teacher_signals": "cache"},
                              output_dir=str(ws["root"] / "lacking"),
                              train={"max_steps": 1, "micro_batch_size": 8, "device": "cpu",
                                     "tensorboard": False}))

    def no_models(*a, **k):
        raise AssertionError("a model was built before the cache was refused")

    monkeypatch.setattr(train_mod, "build_student", no_models)
    monkeypatch.setattr(train_mod, "load_teacher", no_models)
    with pytest.raises(CacheError, match="lacks hidden states"):
        train_mod.train(student_job(raw, "feature"), progress=False)
