"""Build token shards: read sources, tokenize, mix by weight/quota, pack with EOS, write Parquet.

Output (`out_dir/train/` and `out_dir/heldout/`, each a shard set; see `manifest.py`):
rows of exactly `seq_len` tokens, `input_ids: list<int32>`, plus `loss_mask: list<uint8>`
only when some source is instruction data (a reader treats a missing mask as all ones).

Algorithm, in stream order:
1. Each source yields documents in a fixed order (`sources.py`). Documents are tokenized in
   batches (32K characters at first, doubling to 1M, or to 256K with worker processes) by
   the Rust tokenizer with no special tokens added, and EOS is appended to each document
   (EOS is trained on; prompt tokens of instruction data are not). num_workers=1 tokenizes
   in a background thread (the tokenizer uses its own threads); num_workers > 1 uses a pool
   of worker processes with one single-threaded tokenizer each (`encode.py`). Results are
   consumed in submission order and no decision below looks at batch boundaries, so the
   output never depends on the worker count.
2. Held-out split by document: document i of source s is held out when
   splitmix64(seed, hash(s), i) / 2^64 < heldout_fraction. It depends only on the seed, the
   source name and the document's position, not on batching or mixing.
3. Mixing (train documents only): let p_s = weight_s / sum(weight). The mixer repeatedly
   picks the active source with the smallest tokens_s / p_s (the one most behind its share)
   and takes whole documents from it until it would pass the next source's level (plus a
   small slack), so tokens_s / p_s stays level across sources to within about one document.
   A source leaves the mix when it runs out or reaches `max_tokens` (its last document is
   cut to fit the quota exactly, ending in EOS); the rest keep their relative shares. The
   build stops at `total_tokens` (rounded down to a multiple of seq_len; the last document
   is cut to fit) or when every source is done. Shares therefore hold to within
   (longest document + slack) / total_tokens, with slack = min(65536, total_tokens / 2000).
   Without `total_tokens`, every document is used and the weights only set the interleaving.
   Held-out documents met on the way (up to the last train document taken) go to the
   held-out set; they do not count against quotas or the budget (held-out size is about
   heldout_fraction of the documents read).
4. Packing: the mixed token stream is cut into rows of seq_len; the final partial row is
   dropped (recorded as `dropped_tokens`). Rows are written `rows_per_part` per Parquet file,
   zstd level 3, no dictionary, no statistics, one row group: same input => same bytes.
5. Everything is written into a temp folder beside `out_dir` and renamed onto it at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import Progress, TimeElapsedColumn

from wattkd.atomic import atomic_dir
from wattkd.config import DataConfig, SourceConfig
from wattkd.data.encode import TokBatch, Tokenizers
from wattkd.data.manifest import (
    FORMAT,
    VERSION,
    ManifestError,
    part_name,
    read_manifest,
    verify_parts,
    write_manifest,
)
from wattkd.data.sources import (
    Instruction,
    check_source,
    iter_documents,
    resolve_kind,
    source_fingerprint,
    source_name,
)
from wattkd.data.tokenizer import load_tokenizer, tokenizer_sha256
from wattkd.errors import DataError
from wattkd.hashing import file_sha256
from wattkd.progress import NoBar, TokenRate, progress_bar

log = logging.getLogger(__name__)

__all__ = ["BUILDER_VERSION", "ShardBuildError", "build_shards", "config_hash"]

BUILDER_VERSION = 1
# Tokenization batches start small (a small budget should not tokenize megabytes it never
# uses) and double up to the cap (fewer, larger encode_batch calls: each has a fixed cost).
# In worker processes (single-threaded tokenizers) smaller batches balance the workers better
# at the end of the input; IPC per batch is small either way.
FIRST_BATCH_CHARS = 1 << 15
BATCH_CHARS = 1 << 20
POOL_BATCH_CHARS = 1 << 18
BATCH_DOCS = 1024
SPLITS = ("train", "heldout")


class ShardBuildError(DataError, ValueError):
    """A shard build that cannot proceed (bad config, existing different output, no data)."""


# ------------------------------------------------------------------------ held-out split
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return x ^ (x >> np.uint64(31))


def heldout_flags(seed: int, source: str, start: int, n: int, fraction: float) -> np.ndarray:
    """Which of documents start..start+n-1 of `source` are held out (deterministic)."""
    if fraction <= 0:
        return np.zeros(n, dtype=bool)
    salt = int.from_bytes(hashlib.sha256(f"{seed}\0{source}".encode()).digest()[:8], "little")
    idx = np.arange(start, start + n, dtype=np.uint64)
    u = _splitmix64(idx ^ np.uint64(salt)) >> np.uint64(11)
    return u.astype(np.float64) * (1.0 / (1 << 53)) < fraction


# -------------------------------------------------------------------------- source streams
@dataclass
class Chunk:
    """Consecutive tokens of one source, ready for packing."""

    ids: np.ndarray
    mask: np.ndarray | None
    docs: int


class SourceStream:
    """Tokenized documents of one source, in order, with held-out docs routed aside."""

    def __init__(self, index: int, src: SourceConfig, tokenizer: Any, pool: Tokenizers,
                 eos: int, seed: int, fraction: float) -> None:
        self.index = index
        self.name = source_name(src)
        self.src = src
        self.instruct = src.prompt_field is not None
        self._docs = iter_documents(src, tokenizer)
        self._pool = pool
        self._inflight: deque[Any] = deque()
        self._depth = 2 * pool.workers
        self._eos = eos
        self._seed = seed
        self._fraction = fraction
        self._exhausted_input = False
        self._batch_chars = FIRST_BATCH_CHARS
        self._max_batch_chars = BATCH_CHARS if pool.workers == 1 else POOL_BATCH_CHARS
        self._batch: TokBatch | None = None
        self._held = self._lens = self._tcum = self._next_train = np.zeros(0, np.int64)
        self._pos = 0
        self._doc_index = 0
        self.done = False
        self.documents = 0
        self.heldout_documents = 0

    # -- batching
    def _next_job(self) -> tuple[Any, ...] | None:
        if self._exhausted_input:
            return None
        texts: list[str] = []
        prompts: list[str] = []
        chars = 0
        for doc in self._docs:
            if isinstance(doc, Instruction):
                prompts.append(doc.prompt)
                texts.append(doc.response)
                chars += len(doc.prompt) + len(doc.response)
            else:
                texts.append(doc)
                chars += len(doc)
            if chars >= self._batch_chars or len(texts) >= BATCH_DOCS:
                break
        else:
            self._exhausted_input = True
        if not texts:
            return None
        self._batch_chars = min(2 * self._batch_chars, self._max_batch_chars)
        return ("instr", prompts, texts) if self.instruct else ("text", texts)

    def _fill(self) -> None:
        while len(self._inflight) < self._depth:
            job = self._next_job()
            if job is None:
                return
            self._inflight.append(self._pool.submit(job))

    def _load_batch(self) -> bool:
        self._fill()
        if not self._inflight:
            return False
        batch = self._inflight.popleft().result()
        self._fill()
        n = len(batch.offs) - 1
        held = heldout_flags(self._seed, self.name, self._doc_index, n, self._fraction)
        lens = np.diff(batch.offs)
        # tcum[i] = train tokens in documents < i; next_train[i] = first train doc >= i (n if
        # none).
        self._tcum = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.where(held, 0, lens), out=self._tcum[1:])
        idx = np.where(held, n, np.arange(n))
        self._next_train = np.minimum.accumulate(idx[::-1])[::-1]
        self._batch, self._held, self._lens = batch, held, lens
        self._doc_index += n
        self._pos = 0
        return True

    def take(self, soft: float, hard: float, heldout: Callable[[Chunk], None]) -> Chunk | None:
        """Take train documents in order while their tokens fit in `soft` (and at least one),
        cutting the one that crosses `hard`; held-out documents passed over go to `heldout`.
        Decisions depend on the document sequence only, never on where batches end, so the
        output does not depend on batching or on the worker count.
        Returns None when no train token was taken; sets `done` once the source is dry."""
        ids_parts: list[np.ndarray] = []
        mask_parts: list[np.ndarray] = []
        got = docs = 0
        while got < hard:
            exhausted = self._batch is None or self._pos >= len(self._batch.offs) - 1
            if exhausted and not self._load_batch():
                self.done = True
                break
            ids, mask, n_docs, more = self._take_in_batch(soft - got, hard - got, docs == 0,
                                                          heldout)
            if len(ids):
                ids_parts.append(ids)
                if mask is not None:
                    mask_parts.append(mask)
            got += len(ids)
            docs += n_docs
            if not more:
                break
        self.documents += docs
        if not got:
            return None
        ids = ids_parts[0] if len(ids_parts) == 1 else np.concatenate(ids_parts)
        mask = None if not mask_parts else (mask_parts[0] if len(mask_parts) == 1
                                            else np.concatenate(mask_parts))
        return Chunk(ids, mask, docs)

    def _take_in_batch(self, soft: float, hard: float, need_one: bool,
                       heldout: Callable[[Chunk], None]
                       ) -> tuple[np.ndarray, np.ndarray | None, int, bool]:
        """One batch's share of `take`: (ids, mask, train docs, whether to go on)."""
        b, k, tcum = self._batch, self._pos, self._tcum
        assert b is not None
        n = len(b.offs) - 1
        base = tcum[k]
        # Consume documents k..j-1. j stops at the first train doc that does not fit in
        # `soft` (held-out docs before it are consumed), or right after the doc that reaches
        # `hard`. Stopping this way, the result of a take is the same whether the documents
        # come in one batch or several.
        j = max(int(np.searchsorted(tcum, base + soft, side="right")) - 1, k)
        if need_one:
            j = min(max(j, int(self._next_train[k]) + 1), n)
        cut = None
        if tcum[j] - base >= hard:  # the hard limit is reached: end at that doc
            j = int(np.searchsorted(tcum, base + hard, side="left"))
            cut = int(hard)
        lo, hi = b.offs[k], b.offs[j]
        held = self._held[k:j]
        n_held = int(held.sum())
        if n_held:
            tok_held = np.repeat(held, self._lens[k:j])
            self.heldout_documents += n_held
            heldout(Chunk(b.ids[lo:hi][tok_held],
                          None if b.mask is None else b.mask[lo:hi][tok_held], n_held))
            keep = ~tok_held
            ids = b.ids[lo:hi][keep]
            mask = None if b.mask is None else b.mask[lo:hi][keep]
        else:
            ids = b.ids[lo:hi]
            mask = None if b.mask is None else b.mask[lo:hi]
        if cut is not None and cut < len(ids):
            # Cut the crossing document; it still ends in EOS so documents stay separated.
            ids = ids[:cut].copy()
            ids[-1] = self._eos
            if mask is not None:
                mask = mask[:cut].copy()
                mask[-1] = 1
        self._pos = j
        return ids, mask, (j - k) - n_held, cut is None and j == n

    def close(self) -> None:
        close = getattr(self._docs, "close", None)
        if close:
            close()


# ------------------------------------------------------------------------------- writing
class PartWriter:
    """Accumulate full rows and write `part-NNNNN.parquet` files of `rows_per_part` rows."""

    def __init__(self, folder: Path, seq_len: int, rows_per_part: int, with_mask: bool) -> None:
        self.folder = folder
        self.seq_len = seq_len
        self.rows_per_part = rows_per_part
        self.with_mask = with_mask
        self.parts: list[dict[str, Any]] = []
        self.rows = 0
        self._ids: list[np.ndarray] = []
        self._mask: list[np.ndarray] = []
        self._pending = 0
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        """`ids`/`mask`: [k, seq_len] arrays of full rows."""
        self._ids.append(ids)
        self._mask.append(mask)
        self._pending += len(ids)
        while self._pending >= self.rows_per_part:
            self._write(self.rows_per_part)

    def finish(self) -> None:
        if self._pending:
            self._write(self._pending)

    def _write(self, nrows: int) -> None:
        ids = np.concatenate(self._ids)
        mask = np.concatenate(self._mask)
        head_ids, head_mask = ids[:nrows], mask[:nrows]
        self._ids, self._mask = [ids[nrows:]], [mask[nrows:]]
        self._pending -= nrows
        offsets = pa.array(np.arange(nrows + 1, dtype=np.int32) * self.seq_len, pa.int32())
        cols = {"input_ids": pa.ListArray.from_arrays(
            offsets, pa.array(head_ids.reshape(-1).astype(np.int32, copy=False), pa.int32()))}
        if self.with_mask:
            cols["loss_mask"] = pa.ListArray.from_arrays(
                offsets, pa.array(head_mask.reshape(-1).astype(np.uint8, copy=False),
                                  pa.uint8()))
        table = pa.table(cols)
        path = self.folder / part_name(len(self.parts))
        pq.write_table(table, path, row_group_size=nrows, compression="zstd",
                       compression_level=3, use_dictionary=False, write_statistics=False,
                       data_page_size=1 << 20, version="2.6", store_schema=True)
        self.parts.append({"file": path.name, "rows": nrows, "bytes": path.stat().st_size,
                           "sha256": file_sha256(path)})
        self.rows += nrows


class Packer:
    """Concatenate chunks into one stream, cut it into seq_len rows, count tokens per source."""

    def __init__(self, writer: PartWriter, n_sources: int, flush_rows: int = 256) -> None:
        self.writer = writer
        self.seq_len = writer.seq_len
        self.flush_tokens = flush_rows * self.seq_len
        self.tokens = np.zeros(n_sources, dtype=np.int64)  # written, per source
        self.documents = np.zeros(n_sources, dtype=np.int64)
        self._ids: list[np.ndarray] = []
        self._mask: list[np.ndarray] = []
        self._src: list[np.ndarray] = []
        self._pending = 0
        self.dropped = np.zeros(n_sources, dtype=np.int64)

    def add(self, source: int, chunk: Chunk) -> None:
        n = len(chunk.ids)
        self._ids.append(chunk.ids)
        self._mask.append(chunk.mask if chunk.mask is not None else np.ones(n, np.uint8))
        self._src.append(np.full(n, source, dtype=np.int16))
        self.documents[source] += chunk.docs
        self._pending += n
        if self._pending >= self.flush_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._ids:
            return
        ids, mask, src = (np.concatenate(x) for x in (self._ids, self._mask, self._src))
        full = (len(ids) // self.seq_len) * self.seq_len
        if full:
            self.writer.add(ids[:full].reshape(-1, self.seq_len),
                            mask[:full].reshape(-1, self.seq_len))
            self.tokens += np.bincount(src[:full], minlength=len(self.tokens))
        self._ids, self._mask, self._src = [ids[full:]], [mask[full:]], [src[full:]]
        self._pending = len(ids) - full

    def finish(self) -> None:
        self._flush()
        if self._src:
            self.dropped += np.bincount(self._src[0], minlength=len(self.tokens))
        self._ids, self._mask, self._src, self._pending = [], [], [], 0
        self.writer.finish()


# ------------------------------------------------------------------------------ the build
def _check_config(cfg: DataConfig) -> list[str]:
    if not cfg.sources:
        raise ShardBuildError("data.sources is empty: give at least one source")
    names = [source_name(s) for s in cfg.sources]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ShardBuildError(f"data.sources: names must be unique (set `name`); repeated: "
                              f"{dup}")
    if cfg.total_tokens is not None and cfg.total_tokens < cfg.seq_len:
        raise ShardBuildError(f"data.total_tokens ({cfg.total_tokens}) is less than one row "
                              f"(seq_len {cfg.seq_len})")
    return names


def config_hash(cfg: DataConfig, tokenizer_sha: str) -> str:
    """sha256 of everything that determines the output bytes (not num_workers, not paths)."""
    blob = {
        "format": FORMAT, "version": VERSION, "builder": BUILDER_VERSION,
        "data": cfg.model_dump(mode="json", exclude={"num_workers", "shards_dir"}),
        "tokenizer_sha256": tokenizer_sha,
        "sources": [source_fingerprint(s) for s in cfg.sources],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _existing(out_dir: Path, chash: str, overwrite: bool) -> dict[str, Any] | None:
    """Manifests of an identical complete build at out_dir, or None if we should build."""
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise ShardBuildError(f"shards dir {out_dir} exists and is not a folder")
    manifests: dict[str, Any] = {}
    try:
        for split in SPLITS:
            manifests[split] = read_manifest(out_dir / split)
            # --overwrite also replaces a build whose parts no longer match their sha256
            verify_parts(out_dir / split, manifests[split], "sha256" if overwrite else "size")
    except ManifestError as exc:
        if overwrite or not any(out_dir.iterdir()):
            return None
        raise ShardBuildError(f"shards dir {out_dir} exists but is not a complete shard build "
                              f"({exc}); remove it or pass overwrite=True") from None
    if all(m.get("config_hash") == chash for m in manifests.values()):
        return manifests
    if overwrite:
        return None
    raise ShardBuildError(f"shards dir {out_dir} holds shards built from a different config "
                          f"(config_hash {manifests['train'].get('config_hash', '?')[:12]}, "
                          f"this config {chash[:12]}); pass overwrite=True to replace them")


def _summary(out_dir: Path, manifests: dict[str, Any], seconds: float, skipped: bool,
             tokenized: int) -> dict[str, Any]:
    sources: dict[str, dict[str, int]] = {}
    for split, m in manifests.items():
        for s in m["sources"]:
            d = sources.setdefault(s["name"], {})
            d[f"{split}_tokens"] = s["tokens"]
            d[f"{split}_documents"] = s["documents"]
    return {
        "out_dir": str(out_dir), "skipped": skipped,
        "config_hash": manifests["train"]["config_hash"],
        "total_tokens": manifests["train"]["total_tokens"],
        **{split: {"rows": m["rows"], "tokens": m["total_tokens"], "parts": len(m["parts"]),
                   "dropped_tokens": m["dropped_tokens"]} for split, m in manifests.items()},
        "sources": sources, "seconds": round(seconds, 3),
        "tokens_per_s": round(tokenized / seconds, 1) if seconds > 0 and tokenized else None,
    }


def _progress(enabled: bool, total: int | None) -> Progress | NoBar:
    """Tokens so far (of the budget), rate, time elapsed (and left, when there is a budget)."""
    return progress_bar(enabled, "{task.completed:,} tokens" + (f" / {total:,}" if total else ""),
                        TokenRate(), TimeElapsedColumn())


def build_shards(cfg: DataConfig, out_dir: Path, progress: bool = True, *,
                 overwrite: bool = False, trust_remote_code: bool = False) -> dict[str, Any]:
    """Build `out_dir/train/` and `out_dir/heldout/` shard sets from `cfg`; return a summary.

    Returns early (summary["skipped"] = True) when `out_dir` already holds a complete build
    with the same config hash; refuses to replace a different one unless `overwrite`.
    Summary keys: out_dir, skipped, config_hash, total_tokens (train), train/heldout {rows,
    tokens, parts, dropped_tokens}, sources {name: {train_tokens, train_documents,
    heldout_tokens, heldout_documents}}, seconds, tokens_per_s (all tokens tokenized / s).
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    names = _check_config(cfg)
    tok = load_tokenizer(cfg.tokenizer, trust_remote_code=trust_remote_code)
    eos = tok.eos_token_id
    if eos is None:
        raise ShardBuildError(f"tokenizer {cfg.tokenizer!r} has no EOS token; documents are "
                              "joined with EOS, so set one (tokenizer.eos_token)")
    for src in cfg.sources:  # fail before any expensive work: paths, fields, templates
        check_source(src, tok)
    tok_sha = tokenizer_sha256(tok)
    chash = config_hash(cfg, tok_sha)
    existing = _existing(out_dir, chash, overwrite)
    if existing is not None:
        log.info("shards in %s are up to date (config %s); skipping", out_dir, chash[:12])
        return _summary(out_dir, existing, time.perf_counter() - t0, True, 0)

    with_mask = any(s.prompt_field is not None for s in cfg.sources)
    budget = None if cfg.total_tokens is None else cfg.total_tokens // cfg.seq_len * cfg.seq_len
    header = {
        "tokenizer": {"name": cfg.tokenizer, "sha256": tok_sha, "vocab_size": len(tok),
                      "eos_id": eos, "bos_id": tok.bos_token_id, "pad_id": tok.pad_token_id},
        "seq_len": cfg.seq_len, "seed": cfg.seed, "heldout_fraction": cfg.heldout_fraction,
        "columns": ["input_ids", "loss_mask"] if with_mask else ["input_ids"],
    }
    pool = Tokenizers(tok.backend_tokenizer.to_str(), eos, cfg.num_workers)
    streams: list[SourceStream] = []
    manifests: dict[str, Any] = {}
    try:
        with atomic_dir(out_dir) as tmp, _progress(progress, budget) as bar:
            task = bar.add_task("shards", total=budget)
            packers = {split: Packer(PartWriter(tmp / split, cfg.seq_len, cfg.rows_per_part,
                                                with_mask), len(cfg.sources))
                       for split in SPLITS}
            streams = [SourceStream(i, s, tok, pool, eos, cfg.seed, cfg.heldout_fraction)
                       for i, s in enumerate(cfg.sources)]
            _mix(cfg, streams, packers, budget,
                 lambda n: bar.update(task, completed=n))
            for p in packers.values():
                p.finish()
            for split, packer in packers.items():
                manifests[split] = _manifest(split, chash, header, cfg, names, streams, packer)
                write_manifest(tmp / split, manifests[split])
            held = manifests["heldout"]
            if cfg.heldout_fraction > 0 and held["rows"] == 0:
                n_docs = sum(s.heldout_documents for s in streams)
                raise ShardBuildError(
                    f"held-out split is empty: {n_docs} held-out documents gave "
                    f"{int(packers['heldout'].dropped.sum())} tokens, less than one row of "
                    f"seq_len {cfg.seq_len}; raise data.heldout_fraction or data.total_tokens, "
                    "or set data.heldout_fraction: 0")
            if manifests["train"]["rows"] == 0:
                raise ShardBuildError(f"no training rows: the sources gave fewer than seq_len "
                                      f"({cfg.seq_len}) tokens")
    finally:
        for s in streams:
            s.close()
        pool.close()
    seconds = time.perf_counter() - t0
    tokenized = sum(m["total_tokens"] + m["dropped_tokens"] for m in manifests.values())
    summary = _summary(out_dir, manifests, seconds, False, tokenized)
    log.info("built shards in %s: train %d rows, heldout %d rows, %.1f s (%s tok/s)",
             out_dir, summary["train"]["rows"], summary["heldout"]["rows"], seconds,
             summary["tokens_per_s"])
    return summary


def _mix(cfg: DataConfig, streams: list[SourceStream], packers: dict[str, Packer],
         budget: int | None, on_progress: Callable[[int], None]) -> None:
    """Interleave train documents by weighted credit (module docstring, step 3)."""
    share = np.array([s.weight for s in cfg.sources], dtype=np.float64)
    share /= share.sum()
    inf = float("inf")
    quota = [inf if s.max_tokens is None else float(s.max_tokens) for s in cfg.sources]
    limit = inf if budget is None else float(budget)
    slack = 65536.0 if budget is None else max(1.0, min(65536.0, budget / 2000))
    taken = np.zeros(len(streams), dtype=np.float64)
    total = 0.0
    active = list(range(len(streams)))
    while active and total < limit:
        level = taken[active] / share[active]
        pick = active[int(np.argmin(level))]  # the source most behind its share
        others = [taken[j] / share[j] for j in active if j != pick]
        soft = (min(others) - taken[pick] / share[pick]) * share[pick] + slack if others \
            else inf
        hard = min(quota[pick] - taken[pick], limit - total)
        stream = streams[pick]
        chunk = stream.take(soft, hard, lambda c, i=pick: packers["heldout"].add(i, c))
        if chunk is not None:
            packers["train"].add(pick, chunk)
            taken[pick] += len(chunk.ids)
            total += len(chunk.ids)
            on_progress(int(total))
        if stream.done or taken[pick] >= quota[pick]:
            active.remove(pick)


def _manifest(split: str, chash: str, header: dict[str, Any], cfg: DataConfig,
              names: list[str], streams: list[SourceStream], packer: Packer) -> dict[str, Any]:
    rows = packer.writer.rows
    return {
        "format": FORMAT, "version": VERSION, "split": split, "config_hash": chash,
        **header,
        "sources": [{"name": n, "kind": resolve_kind(s), "path": s.path, "weight": s.weight,
                     "max_tokens": s.max_tokens, "documents": int(packer.documents[i]),
                     "tokens": int(packer.tokens[i])}
                    for i, (n, s) in enumerate(zip(names, cfg.sources, strict=True))],
        "total_tokens": rows * cfg.seq_len, "rows": rows,
        "dropped_tokens": int(packer.dropped.sum()),
        "parts": packer.writer.parts,
    }
