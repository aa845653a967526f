"""Shard builder: byte-identical output, exact packing, weights, quotas, held-out, masks."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wattkd.config import DataConfig, SourceConfig
from wattkd.data.manifest import read_manifest
from wattkd.data.shards import ShardBuildError, build_shards
from wattkd.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module", autouse=True)
def wattkd_cache(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "wattkd-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WATTKD_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def tok(wattkd_cache):
    return load_tokenizer("bundled:bpe-4096")


def read_set(folder):
    """(ids [rows, L], mask [rows, L] or None) of a shard set, in stored order."""
    m = read_manifest(folder)
    tables = [pq.read_table(folder / p["file"]) for p in m["parts"]]
    if not tables:
        return np.zeros((0, m["seq_len"]), np.int32), None
    t = pa.concat_tables(tables)
    ids = np.asarray(t["input_ids"].combine_chunks().flatten()).reshape(-1, m["seq_len"])
    mask = None
    if "loss_mask" in t.column_names:
        mask = np.asarray(t["loss_mask"].combine_chunks().flatten()).reshape(ids.shape)
    return ids, mask


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def texts(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["the", "king", "of", "lords", "said", "unto", "them", "behold", "a", "light", "in", "darkness", "and"]
    return [f"doc {i}: " + " ".join(rng.choice(words, rng.integers(3, 40))) for i in range(n)]


def test_two_builds_byte_identical_and_independent_of_workers(tmp_path):
    local = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts(300)])
    cfg = DataConfig(sources=[SourceConfig(path="bundled:austen", weight=2),
                              SourceConfig(path=local, weight=1)],
                     seq_len=64, rows_per_part=256, heldout_fraction=0.1, total_tokens=60_000)
    a = build_shards(cfg, tmp_path / "a", progress=False)
    build_shards(cfg, tmp_path / "b", progress=False)
    build_shards(cfg.model_copy(update={"num_workers": 2}), tmp_path / "c", progress=False)
    fa = files(tmp_path / "a")
    assert len([f for f in fa if f.endswith(".parquet")]) >= 4
    assert fa == files(tmp_path / "b") == files(tmp_path / "c")
    assert a["train"]["rows"] == 60_000 // 64 and a["heldout"]["rows"] > 0
    assert a["tokens_per_s"] > 0 and not a["skipped"]
    # Schema as documented: list<int32>, no loss_mask for plain text.
    schema = pq.read_schema(tmp_path / "a" / "train" / "part-00000.parquet")
    assert schema.names == ["input_ids"] and schema.field(0).type == pa.list_(pa.int32())
    assert pq.ParquetFile(tmp_path / "a" / "train" / "part-00000.parquet").metadata \
        .row_group(0).column(0).compression == "ZSTD"


def test_output_does_not_depend_on_tokenization_batches(tmp_path, monkeypatch):
    import wattkd.data.shards as shards_mod

    local = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts(3000, seed=3)])
    # total_tokens sets the mixing slack (100 tokens): several short documents per take, so
    # batch ends fall inside takes.
    # A fixed name: the held-out split hashes the source name (here not the tmp path).
    cfg = DataConfig(sources=[SourceConfig(path=local, name="local", weight=2),
                              SourceConfig(path="bundled:austen", weight=1, max_tokens=30_000)],
                     seq_len=32, heldout_fraction=0.15, total_tokens=200_000)
    build_shards(cfg, tmp_path / "a", progress=False)
    monkeypatch.setattr(shards_mod, "FIRST_BATCH_CHARS", 700)  # a few documents a batch
    monkeypatch.setattr(shards_mod, "BATCH_CHARS", 1500)
    build_shards(cfg, tmp_path / "b", progress=False)
    assert files(tmp_path / "a") == files(tmp_path / "b")


def test_packing_preserves_every_token_with_eos_between_documents(tmp_path, tok):
    docs = texts(120, seed=1)
    cfg = DataConfig(sources=[SourceConfig(path=write_jsonl(tmp_path / "d.jsonl",
                                                            [{"text": t} for t in docs]))],
                     seq_len=16, heldout_fraction=0, rows_per_part=50)
    summary = build_shards(cfg, tmp_path / "s", progress=False)
    stream = [i for t in docs for i in tok(t, add_special_tokens=False)["input_ids"] + [2]]
    ids, mask = read_set(tmp_path / "s" / "train")
    full = len(stream) // 16 * 16
    assert mask is None
    assert ids.reshape(-1).tolist() == stream[:full]
    m = read_manifest(tmp_path / "s" / "train")
    assert m["dropped_tokens"] == len(stream) - full
    assert m["total_tokens"] == full == m["sources"][0]["tokens"] == summary["train"]["tokens"] \
        == summary["total_tokens"]
    assert m["sources"][0]["documents"] == 120
    assert [p["rows"] for p in m["parts"]] == [50] * (full // 16 // 50) + \
        ([full // 16 % 50] if full // 16 % 50 else [])
    heldout = read_manifest(tmp_path / "s" / "heldout")
    assert heldout["rows"] == 0 and heldout["parts"] == []


def test_mixing_weights_hold_within_one_percent(tmp_path):
    cfg = DataConfig(sources=[SourceConfig(path="bundled:kjv", weight=3),
                              SourceConfig(path="bundled:shakespeare", weight=1),
                              SourceConfig(path="bundled:austen", weight=1)],
                     seq_len=128, heldout_fraction=0, total_tokens=150_000)
    build_shards(cfg, tmp_path / "s", progress=False)
    m = read_manifest(tmp_path / "s" / "train")
    assert m["total_tokens"] == 150_000 // 128 * 128
    shares = [s["tokens"] / m["total_tokens"] for s in m["sources"]]
    assert shares == pytest.approx([0.6, 0.2, 0.2], abs=0.01)


def test_quota_caps_a_source_exactly_and_the_others_fill_the_budget(tmp_path, tok):
    cfg = DataConfig(sources=[SourceConfig(path="bundled:kjv", max_tokens=10_000),
                              SourceConfig(path="bundled:milton", weight=1)],
                     seq_len=100, heldout_fraction=0, total_tokens=50_000)
    build_shards(cfg, tmp_path / "s", progress=False)
    m = read_manifest(tmp_path / "s" / "train")
    by_name = {s["name"]: s["tokens"] for s in m["sources"]}
    assert by_name == {"bundled:kjv": 10_000, "bundled:milton": 40_000}
    ids, _ = read_set(tmp_path / "s" / "train")
    assert ids.shape == (500, 100)
    # Budget cut: the last document is truncated to fit and still ends in EOS.
    assert ids[-1, -1] == tok.eos_token_id


def test_heldout_is_a_deterministic_disjoint_document_split(tmp_path):
    docs = [f"unique document number {i} " + "word " * (i % 17) for i in range(400)]
    src = SourceConfig(path=write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in docs]))

    def split_docs(folder):
        ids, _ = read_set(folder)
        out, cur = [], []
        for t in ids.reshape(-1).tolist():
            if t == 2:
                out.append(tuple(cur))
                cur = []
            else:
                cur.append(t)
        return set(out[1:])  # the first may be cut by the previous row boundary

    sets = {}
    for seed in (0, 1):
        cfg = DataConfig(sources=[src], seq_len=8, heldout_fraction=0.2, seed=seed)
        summary = build_shards(cfg, tmp_path / f"s{seed}", progress=False)
        held_docs = summary["sources"][src.path]["heldout_documents"]
        assert 40 <= held_docs <= 120
        assert held_docs + summary["sources"][src.path]["train_documents"] == 400
        train, held = split_docs(tmp_path / f"s{seed}" / "train"), \
            split_docs(tmp_path / f"s{seed}" / "heldout")
        assert not train & held
        sets[seed] = held
    assert sets[0] != sets[1]  # the seed picks the split


def test_instruction_data_masks_prompt_tokens_only(tmp_path, tok):
    recs = [{"q": f"Question {i}: who said {i}?", "a": f"Answer {i} is here."} for i in range(30)]
    cfg = DataConfig(sources=[
        SourceConfig(path=write_jsonl(tmp_path / "i.jsonl", recs), name="chat",
                     prompt_field="q", response_field="a", chat_template=True),
    ], seq_len=32, heldout_fraction=0)
    build_shards(cfg, tmp_path / "s", progress=False)
    exp_ids, exp_mask = [], []
    for r in recs:
        user = [{"role": "user", "content": r["q"]}]
        head = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": r["a"]}],
                                       tokenize=False)
        p = tok(head, add_special_tokens=False)["input_ids"]
        a = tok(full[len(head):], add_special_tokens=False)["input_ids"] + [2]
        exp_ids += p + a
        exp_mask += [0] * len(p) + [1] * len(a)
    ids, mask = read_set(tmp_path / "s" / "train")
    n = ids.size
    assert ids.reshape(-1).tolist() == exp_ids[:n]
    assert mask.reshape(-1).tolist() == exp_mask[:n]
    assert 0.2 < mask.mean() < 0.8
    schema = pq.read_schema(tmp_path / "s" / "train" / "part-00000.parquet")
    assert schema.field("loss_mask").type == pa.list_(pa.uint8())
    assert read_manifest(tmp_path / "s" / "train")["columns"] == ["input_ids", "loss_mask"]


def test_identical_build_is_skipped_and_a_different_one_refused(tmp_path):
    cfg = DataConfig(sources=[SourceConfig(path="bundled:austen")], seq_len=64,
                     total_tokens=20_000, heldout_fraction=0.05)
    out = tmp_path / "s"
    build_shards(cfg, out, progress=False)
    before = files(out)
    again = build_shards(cfg.model_copy(update={"num_workers": 2}), out, progress=False)
    assert again["skipped"] and files(out) == before
    other = cfg.model_copy(update={"seq_len": 32})
    with pytest.raises(ShardBuildError, match="different config.*overwrite=True"):
        build_shards(other, out, progress=False)
    assert files(out) == before
    rebuilt = build_shards(other, out, progress=False, overwrite=True)
    assert not rebuilt["skipped"] and read_manifest(out / "train")["seq_len"] == 32
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(ShardBuildError, match="not a complete shard build"):
        build_shards(cfg, tmp_path / "junk", progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_bad_builds_fail_before_work_with_clear_errors(tmp_path, tok):
    austen = SourceConfig(path="bundled:austen")
    with pytest.raises(ShardBuildError, match="names must be unique.*bundled:austen"):
        build_shards(DataConfig(sources=[austen, austen]), tmp_path / "a", progress=False)
    with pytest.raises(ShardBuildError, match="total_tokens \\(100\\) is less than one row"):
        build_shards(DataConfig(sources=[austen], total_tokens=100), tmp_path / "b",
                     progress=False)
    with pytest.raises(ShardBuildError, match="held-out split is empty.*heldout_fraction"):
        build_shards(DataConfig(sources=[austen], total_tokens=2048, seq_len=1024,
                                heldout_fraction=0.01), tmp_path / "c", progress=False)
    from wattkd.data.sources import SourceError

    with pytest.raises(SourceError, match="source 'x': .*does not exist"):
        build_shards(DataConfig(sources=[SourceConfig(path=str(tmp_path / "no.jsonl"),
                                                      name="x")]), tmp_path / "d",
                     progress=False)
    tok.save_pretrained(tmp_path / "noeos")
    cfg_file = tmp_path / "noeos" / "tokenizer_config.json"
    conf = json.loads(cfg_file.read_text())
    conf["eos_token"] = None
    cfg_file.write_text(json.dumps(conf))
    with pytest.raises(ShardBuildError, match="has no EOS token"):
        build_shards(DataConfig(sources=[austen], tokenizer=str(tmp_path / "noeos")),
                     tmp_path / "e", progress=False)
    assert not any(p.name in "abcde" for p in tmp_path.iterdir())


def test_worker_pool_runs_from_stdin_and_a_dead_worker_raises(tmp_path, wattkd_cache, tok):
    """Workers must not re-import the caller's __main__ (`python -` has none to import), and
    a worker that dies must fail the build rather than hang it."""
    import os
    import subprocess
    import sys

    from wattkd.data.encode import Tokenizers

    script = ("from wattkd.config import DataConfig, SourceConfig\n"
              "from wattkd.data.shards import build_shards\n"
              "s = build_shards(DataConfig(sources=[SourceConfig(path='bundled:milton')], "
              "seq_len=64, total_tokens=20000, heldout_fraction=0, num_workers=2), "
              f"{str(tmp_path / 'o')!r}, progress=False)\n"
              "print('rows', s['train']['rows'])\n")
    out = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, check=False,
                         timeout=300, env={**os.environ, "WATTKD_CACHE": str(wattkd_cache)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rows 312" in out.stdout and "forked" not in out.stderr

    pool = Tokenizers(tok.backend_tokenizer.to_str(), 2, 2)
    try:
        assert pool.submit(("text", ["In the beginning"])).result().ids[-1] == 2
        death = pool._pool.submit(os._exit, 1)  # a worker dies, as if killed for memory
        assert death.exception(timeout=60) is not None  # raised, not hung
        with pytest.raises(RuntimeError, match="tokenizer worker process died"):
            pool.submit(("text", ["again"])).result()
    finally:
        pool.close()
