"""Caches written before the teacher-signal model was unified (issue 29) stay readable and
are rebuilt byte for byte: tests/fixtures/teacher_cache_v1 holds tiny shards, two caches
(packed with every built-in kind and qkv; raw, strided bf16 hidden) and the tensors the old
code decoded from them, all written by wattkd at 5181291 (its make.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from wattkd.config import validate
from wattkd.distill.losses import TopKTeacher
from wattkd.distill.signals import SignalRequest
from wattkd.teacher_cache import CachedTeacher, build_cache, read_cache_manifest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "teacher_cache_v1"
# what a build writes that is not a function of its inputs (timings, energy, where it ran)
VOLATILE = ("energy", "build", "shards")


def _config(root: Path, cache: str):
    base = json.loads((FIXTURE / "config.json").read_text())
    base["output_dir"] = str(root / "exp")
    base["data"]["shards_dir"] = str(root / "shards")
    base["distill"]["cache_dir"] = str(root / cache)
    return validate(base)


def _signals(cfg, request: SignalRequest, batch: dict[str, torch.Tensor]):
    manifest = read_cache_manifest(cfg.cache_dir)   # the fixture's shard path is not this one
    return CachedTeacher(cfg, request, device="cpu", manifest=manifest).signals(batch)


def test_an_old_cache_reads_as_the_old_code_read_it():
    want = torch.load(FIXTURE / "expected.pt", weights_only=True)
    batch = {"input_ids": want["input_ids"], "row": want["row"]}
    packed = _config(FIXTURE, "packed")
    sig = _signals(packed, SignalRequest(logits=True, hidden_layers=(1, 2), pooled="mean",
                                         extra=(("qkv", (0,)),)), batch)
    assert isinstance(sig.topk, TopKTeacher) and sig.topk.ids.dim() == 3  # the one top-k type
    got = {"packed.topk.ids": sig.topk.ids, "packed.topk.logprobs": sig.topk.logprobs,
           "packed.topk.tail": sig.topk.tail_logprob, "packed.hidden.1": sig.hidden[1],
           "packed.hidden.2": sig.hidden[2], "packed.pooled.mean": sig.pooled["mean"],
           **{f"packed.qkv.0.{p}": t for p, t in sig.extra["qkv"][0].items()}}
    got["packed.pooled.last"] = _signals(packed, SignalRequest(pooled="last"), batch).pooled["last"]
    sig = _signals(_config(FIXTURE, "raw"), SignalRequest(logits=True, hidden_layers=(2,)),
                   batch)
    got.update({"raw.topk.ids": sig.topk.ids, "raw.topk.logprobs": sig.topk.logprobs,
                "raw.topk.tail": sig.topk.tail_logprob, "raw.hidden.2": sig.hidden[2]})
    assert sorted(got) == sorted(k for k in want if k not in ("input_ids", "row"))
    for key, tensor in got.items():
        assert tensor.dtype == want[key].dtype and torch.equal(tensor, want[key]), key


def test_the_same_inputs_rebuild_the_same_cache_bytes(tmp_path):
    """Same shards, teacher and signals: every part file, id_order.bin and the manifest's
    content (all but build timings, energy and the shard folder's path) are identical."""
    shutil.copytree(FIXTURE / "shards", tmp_path / "shards")
    spec = json.loads((FIXTURE / "signals.json").read_text())
    for name, encoding in (("packed", "packed"), ("raw", "raw")):
        cfg = _config(tmp_path, name)
        build_cache(cfg, spec[name], progress=False, encoding=encoding)
        old, new = FIXTURE / name, tmp_path / name
        files = sorted(p.name for p in old.iterdir())
        for f in files:
            if f != "manifest.json":
                assert (new / f).read_bytes() == (old / f).read_bytes(), f"{name}/{f}"
        m_old, m_new = (json.loads((d / "manifest.json").read_text()) for d in (old, new))
        for key in m_old:
            if key not in VOLATILE:
                assert m_new[key] == m_old[key], f"{name}: manifest {key}"
        assert m_new["shards"]["manifest_sha256"] == m_old["shards"]["manifest_sha256"]


def test_a_cache_spec_is_a_signal_request():
    """One request type: `--signals` parses to the SignalRequest a method declares, with the
    storage fields filled in; a method's request and the cache's are compared directly."""
    from wattkd.teacher_cache.spec import parse_signals

    spec = parse_signals("topk:8,hidden:2:bf16,pooled:last,qkv:0", default_k=4)
    assert type(spec) is SignalRequest
    assert (spec.logits, spec.topk, spec.hidden_layers, spec.hidden_dtype, spec.pooled,
            spec.extra) == (True, 8, (2,), "bfloat16", ("last",), (("qkv", (0,)),))
    assert spec.canonical() == "topk:8,hidden:2:bf16,pooled:last,qkv:0"
    assert SignalRequest(pooled="mean").pooled == ("mean",)


def test_the_built_in_kinds_are_registered_kinds():
    """Top-k, hidden states and pooled embeddings are registered SignalKinds like qkv: a
    request lists them through the registry, and the registry alone parses, names and lays
    them out (the cache has no code of its own for them)."""
    from wattkd.distill.signals import SIGNALS, SignalKind
    from wattkd.teacher_cache.spec import parse_signals

    assert all(isinstance(SIGNALS[n], SignalKind) for n in ("topk", "hidden", "pooled", "qkv"))
    req = SignalRequest(logits=True, hidden_layers=(2,), pooled="last", extra=(("qkv", (0,)),))
    assert [k.name for k, _ in req.kinds()] == ["topk", "hidden", "pooled", "qkv"]
    spec = parse_signals("pooled:last,hidden:2:stride=2,topk:3", default_k=8)
    assert SignalRequest.of({k.name: p for k, p in spec.kinds()}) == spec
    assert SIGNALS["hidden"].column_names(SIGNALS["hidden"].requested(spec)) == ["hidden_L2"]
