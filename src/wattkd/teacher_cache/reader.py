"""Reading a teacher cache during training: random rows, checked against the batch.

`CachedTeacher.signals(batch)` takes the batch's global shard row indices (`batch["row"]`, which
ShardDataset yields) and returns the cached signals of exactly those rows, so the cached
provider follows the data loader's deterministic, rank-aware, resumable order by construction.
Every row's input_ids are compared with the crc32 recorded at build time: a cache row that
does not belong to the batch row is an error, never a silently wrong loss.

Reads are by row group (the build keeps them ~1 MB); decompressed row groups are kept in a
small LRU so neighbouring rows of a shuffle window are not decompressed twice. The compact
cells go to the training device as bytes and are unpacked there (a few small kernels on a
GPU). `prefetch(stream)` reads the next batches' rows in a background thread, so reading and
decompression overlap the training step.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from wattkd.config import ExperimentConfig
from wattkd.data.manifest import read_manifest
from wattkd.distill.signal_encoding import TOPK_COLUMNS
from wattkd.distill.signals import CacheContext, SignalRequest, TeacherSignals
from wattkd.hashing import file_sha256
from wattkd.jobs import teacher_path
from wattkd.models import resolve_device
from wattkd.teacher_cache.manifest import (
    CacheError,
    crc_column,
    read_cache_manifest,
    teacher_fingerprint,
)

log = logging.getLogger(__name__)

__all__ = ["CacheReader", "CachedTeacher", "check_cache"]

LRU_BYTES = 256 << 20
REBUILD = "rebuild the cache with `wattkd teacher cache CONFIG --overwrite`"


# --------------------------------------------------------------------------------- checking
def check_cache(cfg: ExperimentConfig, shards_path: Path, *,
                request: SignalRequest | None = None, verify: str = "size") -> dict[str, Any]:
    """Refuse a cache that does not belong to these shards, this tokenizer and this teacher,
    or that lacks a signal `request` needs; return its manifest. Cheap: no weights are read
    (the teacher is identified by its config and sampled weight bytes)."""

    root = cfg.cache_dir
    m = read_cache_manifest(root)
    shards_path = Path(shards_path)
    shard_sha = file_sha256(shards_path / "manifest.json")
    ident = m["identity"]
    shard_tok = read_manifest(shards_path)["tokenizer"]
    if ident["tokenizer_sha256"] != shard_tok["sha256"]:
        raise CacheError(f"teacher cache {root} was built with another tokenizer "
                         f"({m['tokenizer'].get('name')!r}, sha256 "
                         f"{ident['tokenizer_sha256'][:12]}…) than the shards "
                         f"{shards_path} ({shard_tok.get('name')!r}, "
                         f"{shard_tok['sha256'][:12]}…)")
    if ident["shards_sha256"] != shard_sha:
        raise CacheError(f"teacher cache {root} was built from other shards "
                         f"({m['shards']['path']}, manifest sha256 "
                         f"{ident['shards_sha256'][:12]}…) than {shards_path} "
                         f"({shard_sha[:12]}…); rebuild it with `wattkd teacher cache`")
    vocab = int(m["teacher"]["vocab"])
    now = teacher_fingerprint(cfg, teacher_path(cfg), vocab)
    if ident["teacher_fingerprint"] != now["fingerprint"]:
        raise CacheError(f"teacher cache {root} was built with another teacher "
                         f"({m['teacher']['id']}, fingerprint "
                         f"{ident['teacher_fingerprint'][:12]}…) than this config's "
                         f"({now['id']}, {now['fingerprint'][:12]}…); rebuild the cache")
    if request is not None:
        _check_request(m, request, root)
    _verify_parts(root, m, verify)
    return m


def _check_request(m: dict[str, Any], request: SignalRequest, root: Path) -> None:
    ctx = CacheContext(encoding=m["encoding"], columns=m["columns"], signals=m["signals"])
    missing = [what for kind, params in request.kinds() for what in kind.missing(params, ctx)]
    if missing:
        raise CacheError(f"teacher cache {root} ({m['signals'].get('spec')}) lacks "
                         f"{', '.join(missing)} that this method needs; rebuild it with "
                         "`wattkd teacher cache CONFIG --signals ...` including them")


def _verify_parts(root: Path, m: dict[str, Any], level: str) -> None:
    if level not in ("none", "size", "sha256"):
        raise ValueError(f"verify must be 'none', 'size' or 'sha256', got {level!r}")
    if level == "none":
        return
    for p in m["parts"]:
        path = root / p["file"]
        if not path.is_file():
            raise CacheError(f"{path}: cache part listed in the manifest is missing")
        if path.stat().st_size != p["bytes"]:
            raise CacheError(f"{path}: {path.stat().st_size} bytes, the manifest says "
                             f"{p['bytes']} (truncated or replaced?)")
        if level == "sha256" and file_sha256(path) != p["sha256"]:
            raise CacheError(f"{path}: sha256 differs from the manifest (corrupt part); {REBUILD}")


# ----------------------------------------------------------------------------------- reader
class CacheReader:
    """Random access to the rows of a cache (global shard row indices)."""

    def __init__(self, root: str | Path, manifest: dict[str, Any] | None = None,
                 threads: int = 4, verify: bool = True) -> None:
        self.root = Path(root)
        self.manifest = manifest or read_cache_manifest(self.root)
        self.columns: dict[str, dict[str, Any]] = self.manifest["columns"]
        self.encoding: str = self.manifest["encoding"]
        parts = self.manifest["parts"]
        self._starts = np.array([p["row_start"] for p in parts] + [self.manifest["rows"]],
                                dtype=np.int64)
        self._files = threading.local()  # pyarrow ParquetFile is not thread-safe: one per thread
        self._verified: set[int] = set()     # parts whose sha256 was checked on first open
        self._verify_lock = threading.Lock()
        self.verify = verify
        self._schema_names: frozenset[str] | None = None
        self._lru: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._lru_bytes = 0
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="cache-reader")
        self.id_order = self._id_order()

    def _id_order(self) -> np.ndarray | None:
        """Candidate rank -> token id of a packed cache (None: ids are stored as they are)."""
        info = self.columns.get(TOPK_COLUMNS[0], {}).get("id_order")
        if not info:
            return None
        path = self.root / info["file"]
        if not path.is_file() or file_sha256(path) != info["sha256"]:
            raise CacheError(f"{path}: the cache's candidate order is missing or altered "
                             "(its sha256 differs from the manifest); rebuild the cache")
        return np.frombuffer(path.read_bytes(), "<u4").astype(np.int64)

    @property
    def num_rows(self) -> int:
        return int(self.manifest["rows"])

    def _file(self, part: int) -> Any:
        files = self._files.__dict__.setdefault("open", {})
        f = files.get(part)
        if f is None:
            path = self.root / self.manifest["parts"][part]["file"]
            self._check_part(part, path)
            try:
                f = pq.ParquetFile(path)
            except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
                raise CacheError(f"{path}: cannot open cache part ({type(exc).__name__}: "
                                 f"{exc})") from None
            files[part] = f
        return f

    def _check_part(self, part: int, path: Path) -> None:
        """sha256 of the whole part against the manifest, once per part (one sequential read;
        cost measured in benchmarks/RESULTS.md): no altered byte reaches a loss."""
        if not self.verify:
            return
        with self._verify_lock:
            if part in self._verified:
                return
            info = self.manifest["parts"][part]
            try:
                digest = file_sha256(path)
            except FileNotFoundError:
                raise CacheError(f"{path}: cache part {part} listed in the manifest is missing; "
                                 f"{REBUILD}") from None
            if digest != info["sha256"]:
                raise CacheError(f"{path}: sha256 differs from the teacher-cache manifest "
                                 f"(part {part}, shard rows {info['row_start']}.."
                                 f"{info['row_start'] + info['rows'] - 1}; corrupt or altered "
                                 f"after the build); {REBUILD}")
            self._verified.add(part)

    def _group(self, key: tuple[int, int], columns: tuple[str, ...]) -> Any:
        """Read one row group (runs in the reader's threads; touches no shared state)."""
        part, group = key
        try:
            table = self._file(part).read_row_group(group, columns=list(columns))
        except CacheError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise CacheError(f"{self.root / self.manifest['parts'][part]['file']}: cannot read "
                             f"row group {group} ({type(exc).__name__}: {exc}); the part is "
                             "corrupt") from None
        return table

    def _remember(self, key: tuple[int, int], table: Any) -> None:
        old = self._lru.pop(key, None)
        if old is not None:
            self._lru_bytes -= old.nbytes
        self._lru[key] = table
        self._lru_bytes += table.nbytes
        while self._lru_bytes > LRU_BYTES and len(self._lru) > 1:
            _, t = self._lru.popitem(last=False)
            self._lru_bytes -= t.nbytes

    def cells(self, rows: np.ndarray, columns: tuple[str, ...]) -> dict[str, list[Any]]:
        """Raw cells of `columns` (plus row and input_crc32) for global rows, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise CacheError(f"row index out of range [0, {self.num_rows}) for cache "
                             f"{self.root}: {rows.tolist()}")
        parts = np.searchsorted(self._starts, rows, side="right") - 1
        crcs = tuple(crc_column(c) for c in columns if self._has_crc(c))
        want = ("row", "input_crc32", *columns, *crcs)
        keys: dict[tuple[int, int], list[int]] = {}
        offsets = []
        for i, (r, p) in enumerate(zip(rows.tolist(), parts.tolist())):
            g_rows = self.manifest["parts"][p]["row_group_rows"]
            local = r - int(self._starts[p])
            key = (p, local // g_rows)
            keys.setdefault(key, []).append(i)
            offsets.append(local % g_rows)
        loaded: dict[tuple[int, int], Any] = {}
        misses = []
        for key in keys:
            hit = self._lru.get(key)
            if hit is not None and all(c in hit.column_names for c in want):
                self._lru.move_to_end(key)
                loaded[key] = hit
            else:
                misses.append(key)
        for key, table in zip(misses, self._pool.map(lambda k: self._group(k, want), misses)):
            self._remember(key, table)
            loaded[key] = table
        out: dict[str, list[Any]] = {c: [None] * len(rows) for c in want}
        for key, idxs in keys.items():
            table = loaded[key]
            for c in want:
                col = table.column(c)
                for i in idxs:
                    out[c][i] = col[offsets[i]].as_py()
        for i, r in enumerate(rows.tolist()):
            if out["row"][i] != r:
                raise CacheError(f"cache {self.root}: row {r} read back as row {out['row'][i]}; "
                                 "the part's row groups do not match its manifest")
            for c in columns:
                if crc_column(c) in out and zlib.crc32(out[c][i]) != out[crc_column(c)][i]:
                    part = self.manifest["parts"][int(parts[i])]
                    raise CacheError(f"{self.root / part['file']}: row {r} (shard row), column "
                                     f"{c}: the cached bytes differ from their checksum "
                                     f"(corrupt); {REBUILD}")
        return out

    def _has_crc(self, column: str) -> bool:
        """Whether the parts carry the per-cell checksum of `column` (caches written before it
        existed do not; their part sha256 still covers every byte)."""
        if self._schema_names is None:
            self._schema_names = frozenset(self._file(0).schema_arrow.names)
        return crc_column(column) in self._schema_names

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._files = threading.local()
        self._lru.clear()


# --------------------------------------------------------------------------------- provider
class CachedTeacher:
    """Teacher signals from the cache, for the rows of each batch (see module docstring)."""

    def __init__(self, cfg: ExperimentConfig, request: SignalRequest, *, rank: int = 0,
                 world_size: int = 1, device: torch.device | str | None = None,
                 check_rows: bool = True, manifest: dict[str, Any] | None = None) -> None:
        """`manifest`: what `check_cache(cfg, shards, request=request)` returned, when the
        caller has checked it already (the trainer does, before any model loads)."""
        self.request = request
        self.rank, self.world_size = rank, world_size
        if manifest is None:
            manifest = check_cache(cfg, cfg.shards_dir / "train", request=request)
        self.reader = CacheReader(cfg.cache_dir, manifest)
        self.manifest = manifest
        self.device = torch.device(device) if device is not None else _default_device(cfg)
        self.check_rows = check_rows
        self._kinds = request.kinds()
        self._columns = tuple(c for kind, params in self._kinds
                              for c in kind.column_names(params))
        order = self.reader.id_order
        self._context = CacheContext(
            encoding=self.reader.encoding, columns=self.reader.columns,
            signals=manifest["signals"], device=self.device,
            id_order=None if order is None else torch.from_numpy(order).to(self.device))
        self._lock = threading.Lock()
        self._ahead: dict[int, Future[dict[str, list[Any]]]] = {}
        self._prefetcher: ThreadPoolExecutor | None = None
        log.info("teacher signals from cache %s (%s, %s encoding), rank %d/%d", cfg.cache_dir,
                 manifest["signals"]["spec"], manifest["encoding"], rank, world_size)

    # ------------------------------------------------------------------ reading
    def _read(self, batch: dict[str, torch.Tensor]) -> dict[str, list[Any]]:
        """Cells of the batch's rows, checked against its input_ids (CPU work only)."""
        rows = batch.get("row")
        if rows is None:
            raise CacheError("the cached teacher needs each batch's shard row indices "
                             "(batch['row'], yielded by ShardDataset); this batch has none")
        rows_np = rows.detach().cpu().numpy().astype(np.int64).reshape(-1)
        with self._lock:
            cells = self.reader.cells(rows_np, self._columns)
        if self.check_rows:
            _check_crc(batch["input_ids"], cells["input_crc32"], rows_np, self.reader.root)
        return cells

    def prefetch(self, stream: Iterator[dict[str, torch.Tensor]], depth: int = 2
                 ) -> Iterator[dict[str, torch.Tensor]]:
        """Wrap the training batch stream: the cache rows of the next `depth` batches are read
        and decompressed in a background thread while the current step runs (same batches,
        same order; `signals` then only decodes). Optional: `signals` reads on demand."""
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="cache-prefetch")
        pending: deque[tuple[dict[str, torch.Tensor], Future[dict[str, list[Any]]]]] = deque()
        for batch in stream:
            pending.append((batch, self._prefetcher.submit(self._read, batch)))
            if len(pending) > depth:
                b, fut = pending.popleft()
                self._ahead[id(b)] = fut
                yield b
        while pending:
            b, fut = pending.popleft()
            self._ahead[id(b)] = fut
            yield b

    # ------------------------------------------------------------------ signals
    def signals(self, batch: dict[str, torch.Tensor]) -> TeacherSignals:
        fut = self._ahead.pop(id(batch), None)
        cells = fut.result() if fut is not None else self._read(batch)
        sig = TeacherSignals()
        for kind, params in self._kinds:
            kind.put(sig, kind.decode(cells, params, self._context))
        return sig


def _check_crc(input_ids: torch.Tensor, crcs: list[int], rows: np.ndarray, root: Path) -> None:
    ids = input_ids.detach().cpu().numpy().astype("<i4")
    for i, r in enumerate(ids):
        if zlib.crc32(r.tobytes()) != crcs[i]:
            raise CacheError(f"teacher cache {root}: row {int(rows[i])} was cached for other "
                             "tokens than this batch holds (the batch's row index and input_ids "
                             "disagree with the cache); the cache and the data are misaligned")


def _default_device(cfg: ExperimentConfig) -> torch.device:
    dev = resolve_device(cfg.train.device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return dev
