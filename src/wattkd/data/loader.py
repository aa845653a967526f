"""ShardDataset: a deterministic, rank-aware, resumable reader of one shard set.

Order. N rows; global sample g is row perm(seed, epoch)[g % N] of epoch g // N. Rank r of
world_size W takes the g with g % W == r, so its k-th sample is g = r + k * W, and `start`
(samples this rank already consumed) resumes at k = start with the very same order.
perm(seed, epoch) keeps reads local: the part order is shuffled, then rows are shuffled
within windows of `window_parts` consecutive parts (of that shuffled order). With the
default 8 parts of 2,048 rows, a window mixes 16K rows, and at most one window of parts is
held in memory. Sets of up to `window_parts` parts are shuffled completely. `shuffle=False`
gives the stored order.

DataLoader workers: with `num_workers=w`, worker i of a rank yields that rank's samples with
k % w == i (the epoch's set of rows is the same; the DataLoader interleaves workers by batch).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from wattkd.data.manifest import (
    REBUILD,
    ManifestError,
    read_manifest,
    read_part_verified,
    verify_parts,
)

log = logging.getLogger(__name__)

__all__ = ["ShardDataset", "collate", "epoch_permutation"]


def epoch_permutation(part_rows: list[int], seed: int, epoch: int,
                      window_parts: int = 8) -> np.ndarray:
    """The row order of one epoch: part order shuffled, rows shuffled within part windows."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32, epoch, 0x5EED])
    starts = np.concatenate([[0], np.cumsum(part_rows)]).astype(np.int64)
    order = rng.permutation(len(part_rows))
    out = []
    for w in range(0, len(order), window_parts):
        rows = np.concatenate([np.arange(starts[p], starts[p + 1]) for p in order[w:w +
                                                                                 window_parts]])
        out.append(rng.permutation(rows))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples into a batch: {"input_ids": [B, L], "loss_mask": [B, L]}."""
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


class ShardDataset(IterableDataset):
    """Iterate `{"input_ids": LongTensor[seq_len], "loss_mask": LongTensor[seq_len]}`."""

    def __init__(self, path: str | Path, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, start: int = 0, loop: bool = False,
                 verify: str = "size", window_parts: int = 8) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < "
                             "world_size")
        if start < 0:
            raise ValueError(f"start must be >= 0 (samples already consumed), got {start}")
        if window_parts < 1:
            raise ValueError(f"window_parts must be >= 1, got {window_parts}")
        self.path = Path(path)
        self.manifest: dict[str, Any] = read_manifest(self.path)
        verify_parts(self.path, self.manifest, verify)
        self.verify = verify  # "none" skips the sha256 check on opening each part as well
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.start, self.loop = shuffle, start, loop
        self.window_parts = window_parts
        self._part_rows = [p["rows"] for p in self.manifest["parts"]]
        self._starts = np.concatenate([[0], np.cumsum(self._part_rows)]).astype(np.int64)
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
        self._perm: tuple[int, np.ndarray] | None = None

    # ------------------------------------------------------------------ properties
    @property
    def num_rows(self) -> int:
        """Rows in the shard set (all ranks)."""
        return int(self.manifest["rows"])

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["tokenizer"]["eos_id"])

    @property
    def has_loss_mask(self) -> bool:
        return "loss_mask" in self.manifest["columns"]

    def samples_per_epoch(self) -> int:
        """Samples this rank yields in one epoch: ceil((N - rank) / world_size)."""
        n = self.num_rows
        return max(0, -(-(n - self.rank) // self.world_size))

    def __len__(self) -> int:
        """loop=False: samples left to yield (after `start`); loop=True: samples per epoch."""
        per = self.samples_per_epoch()
        return per if self.loop else max(0, per - self.start)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled into DataLoader workers without the cached parts."""
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        state["_perm"] = None
        return state

    # -------------------------------------------------------------------- reading
    def _row_order(self, epoch: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self._part_rows, self.seed, epoch,
                                                   self.window_parts))
        return self._perm[1]

    def _part(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]

        info = self.manifest["parts"][index]
        file = self.path / info["file"]
        seq = self.seq_len
        where = f"part {index} of {len(self.manifest['parts'])} in {self.path}"
        try:
            if self.verify == "none":
                source: Any = file
            else:  # every open checks the part's sha256 while reading it (the reader reads
                # the whole part anyway): corrupt bytes never reach training
                source = pa.BufferReader(read_part_verified(file, info["sha256"], where))
            table = pq.read_table(source, columns=self.manifest["columns"])
            ids_col = table["input_ids"].combine_chunks()
            ids = np.asarray(ids_col.flatten(), dtype=np.int32)
            mask = None
            if self.has_loss_mask:
                mask = np.asarray(table["loss_mask"].combine_chunks().flatten(), np.uint8)
        except ManifestError:
            raise
        except FileNotFoundError:
            raise ManifestError(f"{file}: shard part listed in the manifest is missing "
                                f"({where}); {REBUILD}") from None
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
            raise ManifestError(f"{file}: cannot read shard part ({type(exc).__name__}: "
                                f"{exc}); it is corrupt or truncated; {REBUILD}") from None
        rows = info["rows"]
        if table.num_rows != rows or ids.size != rows * seq or \
                (mask is not None and mask.size != rows * seq):
            raise ManifestError(f"{file}: has {table.num_rows} rows / {ids.size} tokens, "
                                f"manifest says {rows} rows of {seq} tokens")
        ids = ids.reshape(rows, seq)
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            r, c = (int(x[0]) for x in np.nonzero(bad))
            raise ManifestError(f"{file}: row {r} (global row {int(self._starts[index]) + r}), "
                                f"position {c} holds token id {int(ids[r, c])}, outside the "
                                f"tokenizer's vocabulary of {self.vocab_size} ({where}); "
                                f"{REBUILD}")
        entry = (ids, None if mask is None else mask.reshape(rows, seq))
        self._cache[index] = entry
        while len(self._cache) > self.window_parts + 1:
            self._cache.popitem(last=False)
        return entry

    def part_ids(self, index: int) -> np.ndarray:
        """Token ids [rows, seq_len] of part `index`, verified (sha256, vocabulary)."""
        return self._part(index)[0]

    def row(self, index: int) -> dict[str, torch.Tensor]:
        """Row `index` of the stored order, as a sample."""
        if not 0 <= index < self.num_rows:
            raise IndexError(f"row {index} out of range [0, {self.num_rows})")
        p = int(np.searchsorted(self._starts, index, side="right")) - 1
        ids, mask = self._part(p)
        i = index - int(self._starts[p])
        ids_t = torch.from_numpy(ids[i].astype(np.int64))
        mask_t = torch.ones(self.seq_len, dtype=torch.long) if mask is None else \
            torch.from_numpy(mask[i].astype(np.int64))
        # "row": the global row index, so a teacher cache aligned with the shards finds it.
        return {"input_ids": ids_t, "loss_mask": mask_t, "row": torch.tensor(index)}

    def global_index(self, k: int) -> int:
        """The global sample number of this rank's k-th sample."""
        return self.rank + k * self.world_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n = self.num_rows
        if n == 0:
            return
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        k = self.start
        k += (wid - k) % nw  # first k >= start that this worker owns
        while True:
            g = self.global_index(k)
            epoch, pos = divmod(g, n)
            if epoch > 0 and not self.loop:
                return
            order = self._row_order(epoch)
            yield self.row(int(order[pos]) if order is not None else pos)
            k += nw

    def batches(self, batch_size: int, drop_last: bool = False
                ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield collated batches of `batch_size` samples in this rank's order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        buf: list[dict[str, torch.Tensor]] = []
        for sample in self:
            buf.append(sample)
            if len(buf) == batch_size:
                yield collate(buf)
                buf = []
        if buf and not drop_last:
            yield collate(buf)
