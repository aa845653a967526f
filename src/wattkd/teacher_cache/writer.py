"""`wattkd teacher cache`: run the teacher once over the training shards and store its signals.

    build_cache(cfg, "topk,hidden:2:4,pooled")  ->  cfg.cache_dir (manifest.json + parts)

Part i of the cache holds the signals of shard part i, row for row. Each part is streamed to a
hidden temp file row group by row group (memory stays at one row group, whatever the part
size) and renamed into place when complete; `build-state.json` then records it with its
sha256. A killed build therefore leaves complete parts and at most one temp file: the next
run removes the temp file, checks the recorded parts against their sha256 and continues with
the first missing part. Batches never cross a part boundary, so a resumed build computes
exactly what an uninterrupted one computes. `manifest.json` is written last.

The whole build runs in the energy meter's `teacher_cache` phase window (one per session);
the manifest's `energy` block sums the sessions (see usage.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import shutil
import time
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from rich.progress import Progress, TaskProgressColumn

from wattkd import __version__
from wattkd.atomic import atomic_write_bytes, atomic_write_json
from wattkd.config import ExperimentConfig
from wattkd.data.loader import ShardDataset
from wattkd.distill import signal_encoding as enc
from wattkd.distill.signal_encoding import TOPK_COLUMNS
from wattkd.distill.signals import SignalRequest
from wattkd.energy.ledger import make_meter
from wattkd.hashing import file_sha256
from wattkd.models import load_teacher
from wattkd.preflight import human_bytes
from wattkd.progress import NoBar, TokenRate, progress_bar
from wattkd.teacher_cache.build_energy import summarize_energy
from wattkd.teacher_cache.compute import teacher_batch
from wattkd.teacher_cache.manifest import (
    FORMAT,
    MANIFEST,
    STATE,
    VERSION,
    CacheError,
    crc_column,
    part_name,
    read_cache_manifest,
    write_cache_manifest,
)
from wattkd.teacher_cache.plan import CachePlan, plan_cache

log = logging.getLogger(__name__)

__all__ = ["ZSTD_LEVEL", "CachePlan", "build_cache", "plan_cache"]

ZSTD_LEVEL = 3                # measured: level 9 gains ~2% on top-k columns, costs CPU time
MAX_IN_FLIGHT = 3             # encoded batches waiting for the writer thread
CALIBRATION_TOKENS = 1 << 15  # teacher tokens whose top-k sets fix the candidate order
ID_ORDER = "id_order.bin"


# ------------------------------------------------------------------------------- build state
def _read_state(root: Path) -> dict[str, Any] | None:
    path = root / STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path}: unreadable build state ({exc}); delete the cache folder "
                         "or pass overwrite=True") from None
    if state.get("format") != FORMAT + "-build-state" or state.get("version") != VERSION:
        raise CacheError(f"{path}: not a build state this wattkd can resume")
    return state


def _identity_diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(f"{k}: cache {a.get(k)!r} vs now {b.get(k)!r}" for k in keys)


def _clear(root: Path) -> None:
    """Remove a previous cache's files (only files a cache build writes)."""
    for f in list(root.glob("part-*.parquet")) + list(root.glob(".part-*.parquet.tmp-*")):
        f.unlink()
    for name in (MANIFEST, STATE, ID_ORDER):
        with contextlib.suppress(FileNotFoundError):
            (root / name).unlink()


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / ".build.lock", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(f"{root}: another `wattkd teacher cache` is building this cache "
                             "right now") from None
        yield
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ build
def build_cache(cfg: ExperimentConfig, signals: str | None = None, *, progress: bool = True,
                encoding: str | None = None, overwrite: bool = False,
                batch_size: int | None = None) -> Path:
    """Build (or finish, or confirm) the teacher cache of `cfg` in cfg.cache_dir; return it.

    A complete cache with the same identity is left as it is; an unfinished one with the same
    identity is resumed; one with another identity is refused unless `overwrite`.
    """
    plan = plan_cache(cfg, signals, encoding=encoding, batch_size=batch_size)
    root = cfg.cache_dir
    with _build_lock(root):
        if (root / MANIFEST).is_file():
            try:
                old = read_cache_manifest(root)
                same = old["identity"] == plan.identity
            except CacheError:
                same, old = False, {"identity": {}}
            if same and overwrite and _corrupt_parts(root, old):
                log.warning("teacher cache %s: parts %s differ from their sha256; rebuilding",
                            root, _corrupt_parts(root, old))
                _clear(root)
            elif same:
                log.info("teacher cache %s is complete and up to date; nothing to do", root)
                return root
            elif not overwrite:
                raise CacheError(f"{root} holds another teacher cache ("
                                 f"{_identity_diff(old['identity'], plan.identity)}); delete "
                                 "it, set distill.cache_dir elsewhere, or pass overwrite=True")
            else:
                _clear(root)
        state = _read_state(root)
        if state is not None and state["identity"] != plan.identity:
            if not overwrite:
                raise CacheError(f"{root} holds an unfinished build of another cache ("
                                 f"{_identity_diff(state['identity'], plan.identity)}); pass "
                                 "overwrite=True to discard it")
            _clear(root)
            state = None
        for tmp in root.glob(".part-*.parquet.tmp-*"):  # left by a killed build
            tmp.unlink()
        if state is None:
            state = {"format": FORMAT + "-build-state", "version": VERSION,
                     "identity": plan.identity, "parts": {}, "sessions": []}
        done = _verified_parts(root, state)
        check_cache_room(plan, root, done)
        _build(plan, root, state, done, progress)
    return root


def _corrupt_parts(root: Path, manifest: dict[str, Any]) -> list[str]:
    bad = []
    for p in manifest["parts"]:
        path = root / p["file"]
        if not path.is_file() or file_sha256(path) != p["sha256"]:
            bad.append(p["file"])
    return bad


def check_cache_room(plan: CachePlan, root: Path, done: dict[int, Any]) -> None:
    """Say how big the cache will be (bytes per token per signal x tokens) and refuse to start
    a build the disk cannot hold. The figure is the encoded size before zstd, an upper bound
    (top-k columns typically compress further; hidden states hardly: measured in RESULTS)."""

    parts = plan.shard_manifest["parts"]
    todo_rows = sum(p["rows"] for i, p in enumerate(parts) if i not in done)
    tokens = int(plan.shard_manifest["rows"]) * plan.seq_len
    per = plan.bytes_per_token_by_signal()
    total = sum(per.values()) * tokens
    need = sum(per.values()) * todo_rows * plan.seq_len
    where = root if root.exists() else next(p for p in root.absolute().parents if p.exists())
    free = shutil.disk_usage(where).free
    detail = ", ".join(f"{k} {v:,.1f} B/token" for k, v in per.items())
    log.info("teacher cache %s: estimated %s for %s tokens (%s; before zstd, an upper bound); "
             "%s still to write, %s free", root, human_bytes(total), f"{tokens:,}", detail,
             human_bytes(need), human_bytes(free))
    if need > free:
        raise OSError(errno.ENOSPC, f"teacher cache needs about {human_bytes(need)} more "
                      f"({detail} x {todo_rows * plan.seq_len:,} tokens), {human_bytes(free)} "
                      "free: point distill.cache_dir at a larger disk, or cache fewer signals "
                      "(fewer hidden layers, hidden:...:stride=S)", str(where))


def _verified_parts(root: Path, state: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Parts recorded complete whose file still has the recorded size and sha256."""
    done: dict[int, dict[str, Any]] = {}
    for key, rec in state["parts"].items():
        path = root / rec["file"]
        if path.is_file() and path.stat().st_size == rec["bytes"] \
                and file_sha256(path) == rec["sha256"]:
            done[int(key)] = rec
        else:
            log.warning("cache part %s is missing or altered; it will be rebuilt", path)
    state["parts"] = {str(k): v for k, v in sorted(done.items())}
    return done


def _build(plan: CachePlan, root: Path, state: dict[str, Any], done: dict[int, dict[str, Any]],
           progress: bool) -> None:

    cfg = plan.cfg
    parts = plan.shard_manifest["parts"]
    starts = np.concatenate([[0], np.cumsum([p["rows"] for p in parts])]).astype(int)
    todo = [i for i in range(len(parts)) if i not in done]
    total_tokens = int(plan.shard_manifest["rows"]) * plan.seq_len
    done_tokens = sum(done[i]["rows"] for i in done) * plan.seq_len
    t0 = time.perf_counter()
    if todo:
        log.info("teacher cache %s: %d of %d parts to build (%s), batch %d, %s on %s", root,
                 len(todo), len(parts), plan.identity["signals"], plan.batch_size,
                 plan.dtype_name, plan.device)
        teacher = load_teacher(cfg.teacher, device=plan.device, vocab_size=plan.vocab,
                               seed=cfg.train.seed, path_override=plan.teacher_path)
        meter = make_meter(cfg.telemetry, root)
        session: dict[str, Any] = {"host": os.uname().nodename.split(".")[0], "parts": [],
                                   "tokens": 0}
        window = None
        with meter, _progress(progress) as bar:
            task = bar.add_task("teacher cache", total=total_tokens, completed=done_tokens)
            try:
                with meter.phase("teacher_cache", tokens=0, signals=plan.identity["signals"],
                                 encoding=plan.spec.encoding) as window:
                    session.update(session=getattr(meter, "session", ""),
                                   start_wall=round(time.time(), 4), record=None)
                    state["sessions"].append(session)
                    atomic_write_json(root / STATE, state)
                    id_rank = _id_rank(plan, teacher, root, state)
                    for i in todo:
                        rec = _write_part(plan, teacher, root, i, int(starts[i]), id_rank,
                                          lambda n: bar.update(task, advance=n))
                        done[i] = rec
                        tokens = rec["rows"] * plan.seq_len
                        window.add_tokens(tokens)
                        session["parts"].append(i)
                        session["tokens"] += tokens
                        state["parts"][str(i)] = rec
                        atomic_write_json(root / STATE, state)
            finally:  # an error still closes the window: keep its energy for the next session
                if window is not None and session in state["sessions"]:
                    session["record"] = window.record
                    session["end_wall"] = round(time.time(), 4)
                    atomic_write_json(root / STATE, state)
        del teacher
    seconds = time.perf_counter() - t0
    _finish(plan, root, state, done, seconds)


def _id_rank(plan: CachePlan, teacher: Any, root: Path, state: dict[str, Any]
             ) -> torch.Tensor | None:
    """The packed encoding's candidate rank of every token id, on the teacher's device.

    Made once per cache from the teacher's top-k on the first rows of shard part 0 (about
    CALIBRATION_TOKENS tokens), written to id_order.bin before the first part, and reused by a
    resumed build, so every part is encoded with the same order.
    """
    if plan.spec.topk is None or plan.spec.encoding != "packed":
        return None
    path = root / ID_ORDER
    info = state.get("id_order")
    if info and path.is_file() and file_sha256(path) == info["sha256"]:
        order = np.frombuffer(path.read_bytes(), "<u4").astype(np.int64)
    else:
        part = plan.shard_manifest["parts"][0]
        rows = min(part["rows"], max(1, -(-CALIBRATION_TOKENS // plan.seq_len)))
        ids = _read_shard_part(plan, 0)[:rows]
        spec = SignalRequest(topk=plan.spec.topk, encoding=plan.spec.encoding)
        seen = []
        for b0 in range(0, rows, plan.batch_size):
            x = torch.from_numpy(ids[b0:b0 + plan.batch_size].astype(np.int64)).to(plan.device)
            out = teacher_batch(teacher, x, spec, plan.context)
            seen.append(out["topk"].ids.cpu())
        order = enc.candidate_order(torch.cat(seen), plan.vocab)
        atomic_write_bytes(path, order.astype("<u4").tobytes())
        state["id_order"] = {"file": ID_ORDER, "sha256": file_sha256(path),
                             "calibration_rows": rows, "calibration_tokens": rows * plan.seq_len}
        atomic_write_json(root / STATE, state)
    rank = torch.empty(plan.vocab, dtype=torch.long)
    rank[torch.from_numpy(order)] = torch.arange(plan.vocab)
    return rank.to(plan.device)


def _write_part(plan: CachePlan, teacher: Any, root: Path, index: int, row_start: int,
                id_rank: torch.Tensor | None, advance: Any) -> dict[str, Any]:
    """Stream one part to a temp file, row group by row group, then rename it into place."""

    info = plan.shard_manifest["parts"][index]
    ids = _read_shard_part(plan, index)
    final = root / part_name(index)
    tmp = final.with_name(f".{final.name}.tmp-{os.urandom(4).hex()}")
    schema = _schema(plan)
    compression = "none" if plan.spec.encoding == "raw" else "zstd"
    writer = pq.ParquetWriter(tmp, schema, compression=compression,
                              compression_level=None if compression == "none" else ZSTD_LEVEL,
                              use_dictionary=False, write_statistics=False)
    pending: dict[str, list[Any]] = {name: [] for name in schema.names}
    # One writer thread cuts staged arrays into cells and writes row groups, in order, while
    # the main thread runs the teacher on the next batch; at most MAX_IN_FLIGHT batches wait.
    pool = ThreadPoolExecutor(1, thread_name_prefix="cache-writer")
    futures: deque[Future[None]] = deque()
    g = plan.row_group_rows

    def consume(staged: dict[str, Any], final: bool) -> None:
        for k, v in staged.items():
            cells = v.cells() if isinstance(v, enc.Staged) else v
            pending[k].extend(cells)
            if k in plan.columns:  # every signal cell is covered by its own row checksum
                pending[crc_column(k)].extend(zlib.crc32(c) for c in cells)
        while len(pending["row"]) >= g or (final and pending["row"]):
            rows = min(g, len(pending["row"]))
            chunk = {k: v[:rows] for k, v in pending.items()}
            for v in pending.values():
                del v[:rows]
            table = pa.table({k: pa.array(v, schema.field(k).type) for k, v in chunk.items()},
                             schema=schema)
            writer.write_table(table, row_group_size=rows)

    try:
        for b0 in range(0, info["rows"], plan.batch_size):
            b1 = min(b0 + plan.batch_size, info["rows"])
            x = torch.from_numpy(ids[b0:b1].astype(np.int64)).to(plan.device)
            values = teacher_batch(teacher, x, plan.spec, plan.context)
            staged = _encode(plan, values, ids[b0:b1], row_start + b0, id_rank)
            while len(futures) >= MAX_IN_FLIGHT:
                futures.popleft().result()
            futures.append(pool.submit(consume, staged, b1 == info["rows"]))
            advance((b1 - b0) * plan.seq_len)
        while futures:
            futures.popleft().result()
        writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        meta = pq.ParquetFile(tmp).metadata
        col_bytes = _column_bytes(meta)
        sha = file_sha256(tmp)
        os.replace(tmp, final)
    except BaseException:
        for f in futures:
            f.cancel()
        pool.shutdown(wait=True)  # the writer thread must be done before the file is closed
        with contextlib.suppress(Exception):
            writer.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        pool.shutdown(wait=True)
    log.info("cache part %s: %d rows, %.1f bytes/token", final.name, info["rows"],
             final.stat().st_size / (info["rows"] * plan.seq_len))
    return {"file": final.name, "shard_file": info["file"], "row_start": row_start,
            "rows": info["rows"], "row_group_rows": g, "bytes": final.stat().st_size,
            "sha256": sha, "column_bytes": col_bytes}


def _read_shard_part(plan: CachePlan, index: int) -> np.ndarray:
    """Token ids of shard part `index`, checked like training reads them (sha256, rows,
    vocabulary), so a cache is never built from corrupt shards."""

    return ShardDataset(plan.shards, shuffle=False, verify="size"
                        ).part_ids(index)


def _schema(plan: CachePlan) -> Any:
    fields = [pa.field("row", pa.int64()), pa.field("input_crc32", pa.uint32())]
    fields += [pa.field(name, pa.large_binary()) for name in plan.columns]
    fields += [pa.field(crc_column(name), pa.uint32()) for name in plan.columns]
    return pa.schema(fields, metadata={"wattkd": json.dumps({"format": FORMAT,
                                                             "version": VERSION})})


def row_crc32(ids: np.ndarray) -> list[int]:
    """crc32 of each row's int32 little-endian token ids: ties a cache row to its shard row."""
    a = np.ascontiguousarray(ids, dtype="<i4")
    return [zlib.crc32(r.tobytes()) for r in a]


def _encode(plan: CachePlan, values: dict[str, Any], ids: np.ndarray, row0: int,
            id_rank: torch.Tensor | None = None) -> dict[str, Any]:
    """Device side of encoding one batch: host arrays (enc.Staged) per column."""
    n = ids.shape[0]
    cells: dict[str, Any] = {"row": list(range(row0, row0 + n)),
                             "input_crc32": row_crc32(ids)}
    ctx = dataclasses.replace(plan.context, id_rank=id_rank)
    for kind, params in plan.spec.kinds():
        cells.update(kind.stage(values[kind.name], params, ctx))
    return cells


def _column_bytes(meta: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            name = col.path_in_schema
            out[name] = out.get(name, 0) + int(col.total_compressed_size)
    return out


def _signal_of(column: str, columns: dict[str, dict[str, Any]]) -> str:
    """Signal a column belongs to (crc and row columns count as meta)."""
    return columns[column].get("signal", column.split("_", 1)[0]) if column in columns \
        else "meta"


def _finish(plan: CachePlan, root: Path, state: dict[str, Any],
            done: dict[int, dict[str, Any]], seconds: float) -> None:
    """All parts present: write manifest.json (the cache becomes usable), drop the state."""

    parts = [done[i] for i in sorted(done)]
    rows = sum(p["rows"] for p in parts)
    tokens = rows * plan.seq_len
    total = sum(p["bytes"] for p in parts)
    by_signal: dict[str, int] = {}
    for p in parts:
        for col, b in p["column_bytes"].items():
            kind = _signal_of(col, plan.columns)
            by_signal[kind] = by_signal.get(kind, 0) + b
    energy = summarize_energy(root, state["sessions"], tokens)
    built = sum(s.get("tokens", 0) for s in state["sessions"])
    manifest = {
        "format": FORMAT, "version": VERSION, "identity": plan.identity, **plan.describe(),
        "rows": rows, "tokens": tokens, "parts": parts,
        "bytes": {"total": total, "per_token": total / max(tokens, 1),
                  "per_token_by_signal": {k: v / max(tokens, 1)
                                          for k, v in sorted(by_signal.items())},
                  "note": "Parquet column chunks; file overhead (footers) is in the total"},
        "energy": energy,
        "build": {"batch_size": plan.batch_size, "device": str(plan.device),
                  "row_group_rows": plan.row_group_rows, "zstd_level": ZSTD_LEVEL,
                  "sessions": len(state["sessions"]), "last_session_seconds": round(seconds, 3),
                  "tokens_built": built,
                  "versions": {"wattkd": __version__, "torch": torch.__version__,
                               "transformers": _version("transformers"),
                               "pyarrow": _version("pyarrow")}},
    }
    if state.get("id_order"):
        manifest["columns"][TOPK_COLUMNS[0]]["id_order"] = state["id_order"]
    write_cache_manifest(root, manifest)
    with contextlib.suppress(FileNotFoundError):
        (root / STATE).unlink()
    e = energy
    log.info("teacher cache %s: %d rows, %.1f bytes/token, energy %s", root, rows,
             manifest["bytes"]["per_token"],
             "unavailable" if e["energy_j"] is None else
             f"{e['energy_j']:.1f} J ({e['source']}{', estimated' if e['estimated'] else ''})")


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None



def _progress(enabled: bool) -> Progress | NoBar:
    """Percent done, tokens done of total, rate, time left."""
    return progress_bar(enabled, TaskProgressColumn(), "{task.completed:,.0f}/{task.total:,.0f} tokens",
                        TokenRate())
