"""ShardDataset: rank split, resume, epochs, workers, and refusal of damaged shard sets."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from wattkd.config import DataConfig, SourceConfig
from wattkd.data.loader import ShardDataset, epoch_permutation
from wattkd.data.manifest import ManifestError, read_manifest
from wattkd.data.shards import build_shards


@pytest.fixture(scope="module", autouse=True)
def wattkd_cache(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "wattkd-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WATTKD_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def shards(tmp_path_factory, wattkd_cache):
    """A 9-part train set of 523 rows (row count not divisible by 2, 3 or 4)."""
    out = tmp_path_factory.mktemp("loader") / "shards"
    cfg = DataConfig(sources=[SourceConfig(path="bundled:austen")], seq_len=32,
                     rows_per_part=60, total_tokens=523 * 32, heldout_fraction=0.05)
    build_shards(cfg, out, progress=False)
    return out / "train"


@pytest.fixture
def copy(shards, tmp_path):
    dst = tmp_path / "train"
    shutil.copytree(shards, dst)
    return dst


def key(sample):
    return tuple(sample["input_ids"].tolist())


def rows_in_order(path):
    ds = ShardDataset(path, shuffle=False)
    return [key(s) for s in ds]


def test_properties_and_sample_format(shards):
    ds = ShardDataset(shards)
    assert (ds.num_rows, ds.seq_len, ds.vocab_size, ds.eos_id) == (523, 32, 4096, 2)
    assert len(ds.manifest["parts"]) == 9 and len(ds) == 523
    s = next(iter(ds))
    assert s["input_ids"].dtype == torch.long and s["input_ids"].shape == (32,)
    assert torch.equal(s["loss_mask"], torch.ones(32, dtype=torch.long))  # no mask column
    batch = next(ShardDataset(shards).batches(5))
    assert batch["input_ids"].shape == (5, 32) and batch["loss_mask"].shape == (5, 32)
    sizes = [b["input_ids"].shape[0] for b in ShardDataset(shards).batches(100)]
    assert sizes == [100] * 5 + [23]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_cover_every_row_exactly_once(shards, world_size):
    stored = rows_in_order(shards)
    seen = []
    for rank in range(world_size):
        ds = ShardDataset(shards, rank=rank, world_size=world_size, seed=7)
        got = [key(s) for s in ds]
        assert len(got) == len(ds) == len(range(rank, 523, world_size))
        seen += got
    assert sorted(seen) == sorted(stored)
    # The order is shuffled, and the same for the same seed.
    one = [key(s) for s in ShardDataset(shards, seed=7)]
    assert one != stored and one == [key(s) for s in ShardDataset(shards, seed=7)]
    assert one != [key(s) for s in ShardDataset(shards, seed=8)]


def test_global_order_is_rank_interleaved(shards):
    full = [key(s) for s in ShardDataset(shards, seed=3)]
    r1 = [key(s) for s in ShardDataset(shards, seed=3, rank=1, world_size=3)]
    assert r1 == full[1::3]


def test_resume_yields_the_same_remaining_rows(shards):
    ref = [key(s) for _, s in zip(range(400), ShardDataset(shards, rank=1, world_size=2,
                                                           loop=True))]
    resumed = ShardDataset(shards, rank=1, world_size=2, loop=True, start=150)
    assert [key(s) for _, s in zip(range(250), resumed)] == ref[150:]
    tail = ShardDataset(shards, rank=1, world_size=2, start=250)
    assert len(tail) == 261 - 250 and [key(s) for s in tail] == ref[250:261]


def test_loop_runs_over_epochs_with_a_new_order(shards):
    ds = ShardDataset(shards, loop=True, seed=1)
    got = [key(s) for _, s in zip(range(2 * 523 + 5), ds)]
    e0, e1 = got[:523], got[523:1046]
    assert sorted(e0) == sorted(e1) == sorted(rows_in_order(shards))
    assert e0 != e1
    assert len(got) == 1051 and set(got[1046:]) <= set(e0)  # and on into epoch 2


def test_shuffle_false_is_stored_order_and_window_keeps_reads_local(shards):
    perm = epoch_permutation([60] * 8 + [43], seed=0, epoch=0, window_parts=2)
    assert sorted(perm.tolist()) == list(range(523))
    # Each window of 2 parts is contiguous in the permutation: rows come from <= 2 parts.
    starts = np.arange(0, 523, 60)
    parts = np.searchsorted(starts, perm, side="right") - 1
    assert all(len(set(parts[i:i + 120])) <= 2 for i in range(0, 480, 120))
    assert rows_in_order(shards)[0] == key(ShardDataset(shards).row(0))


def test_dataloader_workers_split_without_duplicates(shards):
    ds = ShardDataset(shards, rank=0, world_size=2, seed=5)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2)
    got = [tuple(r) for b in loader for r in b["input_ids"].tolist()]
    assert sorted(got) == sorted(key(s) for s in ds)


def test_truncated_part_is_refused_naming_the_file(copy):
    part = copy / "part-00003.parquet"
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    with pytest.raises(ManifestError, match="part-00003.parquet: shard part is .* bytes, "
                                            "manifest says .*truncated"):
        ShardDataset(copy)
    ds = ShardDataset(copy, verify="none", shuffle=False)  # not checked up front...
    with pytest.raises(ManifestError, match="part-00003.parquet: cannot read shard part"):
        list(ds)  # ...but reading it still fails with the file's name


def test_corrupt_part_is_refused_naming_the_file(copy):
    part = copy / "part-00001.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 3] ^= 0xFF
    part.write_bytes(bytes(data))
    ShardDataset(copy, verify="size")  # same size: only the hash can tell
    with pytest.raises(ManifestError, match="part-00001.parquet: sha256 differs"):
        ShardDataset(copy, verify="sha256")
    (copy / "part-00002.parquet").unlink()
    with pytest.raises(ManifestError, match="part-00002.parquet: shard part listed in the "
                                            "manifest is missing"):
        ShardDataset(copy, verify="size")


def test_unknown_manifest_version_and_format_are_refused(copy, tmp_path):
    m = read_manifest(copy)   # without its seal: an edited manifest is checked as an old one
    (copy / "manifest.json").write_text(json.dumps({**m, "version": 2}))
    with pytest.raises(ManifestError, match="shard format version 2 is not supported.*reads "
                                            "version 1"):
        ShardDataset(copy)
    (copy / "manifest.json").write_text(json.dumps({**m, "format": "other"}))
    with pytest.raises(ManifestError, match="format is 'other', expected 'wattkd-shards'"):
        ShardDataset(copy)
    (copy / "manifest.json").write_text(json.dumps({**m, "parts": [
        {**m["parts"][0], "file": "../evil.parquet"}]}))
    with pytest.raises(ManifestError, match="parts\\[0\\] must name a part-NNNNN.parquet"):
        ShardDataset(copy)
    with pytest.raises(ManifestError, match="no shard manifest here"):
        ShardDataset(tmp_path / "nothing")


def test_part_with_wrong_rows_is_refused(copy, shards):
    # A valid Parquet file from another position: right format, wrong row count.
    shutil.copy(shards / "part-00008.parquet", copy / "part-00000.parquet")
    ds = ShardDataset(copy, verify="none", shuffle=False)
    with pytest.raises(ManifestError, match="part-00000.parquet: has 43 rows.*manifest says "
                                            "60 rows of 32"):
        next(iter(ds))


def test_bad_arguments(shards):
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        ShardDataset(shards, rank=2, world_size=2)
    with pytest.raises(ValueError, match="start must be >= 0"):
        ShardDataset(shards, start=-1)
    with pytest.raises(ValueError, match="verify must be"):
        ShardDataset(shards, verify="md5")


def test_loss_mask_column_is_yielded(tmp_path):
    recs = [{"q": f"Prompt number {i}?", "a": f"Reply {i}."} for i in range(40)]
    (tmp_path / "i.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = DataConfig(sources=[SourceConfig(path=str(tmp_path / "i.jsonl"), prompt_field="q",
                                           response_field="a")],
                     seq_len=16, heldout_fraction=0)
    build_shards(cfg, tmp_path / "s", progress=False)
    ds = ShardDataset(tmp_path / "s" / "train", shuffle=False)
    assert ds.has_loss_mask
    from wattkd.data.tokenizer import load_tokenizer

    n_prompt = len(load_tokenizer("bundled:bpe-4096")("Prompt number 0?\n")["input_ids"])
    first = ds.row(0)
    assert first["loss_mask"].dtype == torch.long
    assert first["loss_mask"][:n_prompt].eq(0).all() and first["loss_mask"][n_prompt] == 1
    batch = next(ds.batches(4))
    assert batch["loss_mask"].shape == (4, 16) and 0 < batch["loss_mask"].float().mean() < 1
