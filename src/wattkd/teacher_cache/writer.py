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
import fcntl
import json
import logging
import os
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wattkd.atomic import atomic_write_json
from wattkd.config import ExperimentConfig
from wattkd.teacher_cache import encoding as enc
from wattkd.teacher_cache.compute import TeacherBatch, hidden_positions, teacher_batch
from wattkd.teacher_cache.manifest import (
    FORMAT,
    MANIFEST,
    STATE,
    VERSION,
    CacheError,
    file_sha256,
    part_name,
    read_cache_manifest,
    teacher_fingerprint,
    write_cache_manifest,
)
from wattkd.teacher_cache.spec import CacheSpec, resolve_spec

log = logging.getLogger(__name__)

__all__ = ["ROW_GROUP_BYTES", "ZSTD_LEVEL", "CachePlan", "build_cache", "plan_cache"]

ZSTD_LEVEL = 3                # measured: higher levels gain < 2% on top-k columns, cost time
ROW_GROUP_BYTES = 1 << 20     # target encoded bytes per row group: cheap random reads
MAX_ROW_GROUP_ROWS = 1024


class CachePlan:
    """Everything a build needs, checked before the teacher is loaded."""

    def __init__(self, cfg: ExperimentConfig, signals: str | None, encoding: str | None,
                 batch_size: int | None) -> None:
        from wattkd.data.manifest import read_manifest, sha256_file, verify_parts
        from wattkd.data.tokenizer import load_tokenizer, tokenizer_sha256
        from wattkd.models import check_tokenizer_match, resolve_device, resolve_dtype
        from wattkd.train import teacher_path

        self.cfg = cfg
        self.shards = cfg.shards_dir / "train"
        if not (self.shards / "manifest.json").is_file():
            raise CacheError(f"no shards at {self.shards}: run `wattkd data build` first")
        self.shard_manifest = read_manifest(self.shards)
        verify_parts(self.shards, self.shard_manifest, "size")
        self.shards_sha = sha256_file(self.shards / "manifest.json")
        self.spec: CacheSpec = resolve_spec(cfg, signals, encoding)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        tok_sha = tokenizer_sha256(self.tokenizer)
        if self.shard_manifest["tokenizer"]["sha256"] != tok_sha:
            raise CacheError(f"stale shards: {self.shards} were built with a different "
                             f"tokenizer than data.tokenizer={cfg.data.tokenizer!r}; rebuild "
                             "them (`wattkd data build --overwrite`)")
        self.vocab = len(self.tokenizer)
        self.teacher_path = teacher_path(cfg)
        if self.teacher_path and cfg.teacher.pretrain is not None and \
                not Path(self.teacher_path).exists():
            raise CacheError(f"teacher {self.teacher_path} not found: run `wattkd teacher "
                             "pretrain` first")
        check_tokenizer_match(self.teacher_path, self.tokenizer)
        self.teacher_config = _teacher_config(cfg, self.teacher_path, self.vocab)
        self._check_spec()
        self.device = resolve_device(cfg.train.device)
        self.dtype = resolve_dtype(cfg.teacher.dtype, self.device)
        self.dtype_name = str(self.dtype).replace("torch.", "")
        hidden_dtype = self.spec.hidden_dtype
        if self.spec.hidden_layers and hidden_dtype is None:
            hidden_dtype = "bfloat16" if self.dtype == torch.bfloat16 else "float16"
        self.hidden_dtype = hidden_dtype
        self.fingerprint = teacher_fingerprint(cfg, self.teacher_path, self.vocab)
        self.seq_len = int(self.shard_manifest["seq_len"])
        self.batch_size = batch_size or cfg.train.micro_batch_size
        if self.batch_size < 1:
            raise CacheError(f"batch_size must be >= 1, got {self.batch_size}")
        self.identity = {"shards_sha256": self.shards_sha, "tokenizer_sha256": tok_sha,
                         "teacher_fingerprint": self.fingerprint["fingerprint"],
                         "teacher_dtype": self.dtype_name,
                         "signals": self._canonical(), "encoding": self.spec.encoding}
        self.columns = self._columns()
        self.row_group_rows = max(1, min(MAX_ROW_GROUP_ROWS,
                                         ROW_GROUP_BYTES // max(self._row_bytes(), 1)))

    # ------------------------------------------------------------------ checks
    def _check_spec(self) -> None:
        tc, spec = self.teacher_config, self.spec
        n_layers = int(tc.num_hidden_layers)
        bad = [i for i in spec.hidden_layers if not 0 <= i <= n_layers]
        if bad:
            raise CacheError(f"hidden layers {bad} out of range: the teacher has {n_layers} "
                             f"layers, so its hidden-state indices are 0..{n_layers}")
        if spec.topk is not None and spec.topk > self.vocab:
            raise CacheError(f"topk k={spec.topk} exceeds the vocabulary ({self.vocab} tokens)")
        if spec.hidden_stride > int(self.shard_manifest["seq_len"]):
            raise CacheError(f"hidden stride {spec.hidden_stride} exceeds seq_len "
                             f"{self.shard_manifest['seq_len']}")

    def _canonical(self) -> str:
        s = self.spec
        if s.hidden_layers:
            s = CacheSpec(s.topk, s.hidden_layers, self.hidden_dtype, s.hidden_stride, s.pooled,
                          s.encoding)
        return s.canonical()

    # ------------------------------------------------------------------ layout
    @property
    def positions(self) -> int:
        return len(hidden_positions(self.seq_len, self.spec.hidden_stride))

    def _columns(self) -> dict[str, dict[str, Any]]:
        spec, seq = self.spec, self.seq_len
        cols: dict[str, dict[str, Any]] = {}
        if spec.topk is not None:
            cols.update(enc.topk_columns(spec.encoding, seq, spec.topk, self.vocab))
        hsz = int(self.teacher_config.hidden_size)
        codec = "le" if spec.encoding == "raw" else "planes"
        for i in spec.hidden_layers:
            cols[f"hidden_L{i}"] = {"values": self.hidden_dtype, "shape": [self.positions, hsz],
                                    "codec": codec, "bytes": 2,
                                    "stride": spec.hidden_stride}
        for how in spec.pooled:
            cols[f"pooled_{how}"] = {"values": "float32", "shape": [hsz], "codec": "le",
                                     "pooling": how}
        return cols

    def _row_bytes(self) -> int:
        total = 0
        for c in self.columns.values():
            count = int(np.prod(c["shape"]))
            width = c.get("bytes") or {"int32": 4, "float32": 4, "float16": 2}.get(c["values"], 4)
            total += count * width
        return total + 12

    # ------------------------------------------------------------------ description
    def describe(self) -> dict[str, Any]:
        tc = self.teacher_config
        spec = self.spec
        return {
            "shards": {"path": str(self.shards), "manifest_sha256": self.shards_sha,
                       "rows": self.shard_manifest["rows"], "seq_len": self.seq_len,
                       "parts": len(self.shard_manifest["parts"])},
            "tokenizer": {k: self.shard_manifest["tokenizer"].get(k)
                          for k in ("name", "sha256", "vocab_size")},
            "teacher": {**self.fingerprint, "dtype": self.dtype_name,
                        "num_layers": int(tc.num_hidden_layers),
                        "hidden_size": int(tc.hidden_size), "vocab": self.vocab,
                        "softcap": getattr(tc, "final_logit_softcapping", None)},
            "signals": {"spec": self.identity["signals"],
                        "topk": None if spec.topk is None else {"k": spec.topk},
                        "hidden": None if not spec.hidden_layers else {
                            "layers": list(spec.hidden_layers), "dtype": self.hidden_dtype,
                            "stride": spec.hidden_stride, "positions": self.positions},
                        "pooled": list(spec.pooled)},
            "encoding": spec.encoding,
            "columns": self.columns,
        }


def plan_cache(cfg: ExperimentConfig, signals: str | None = None, *,
               encoding: str | None = None, batch_size: int | None = None) -> CachePlan:
    """Validate a build (shards, tokenizer, teacher config, signals) without loading weights."""
    return CachePlan(cfg, signals, encoding, batch_size)


def _teacher_config(cfg: ExperimentConfig, path: str | None, vocab: int) -> Any:
    from transformers import AutoConfig

    t = cfg.teacher
    try:
        if path is None:
            kwargs = dict(t.build or {})
            model_type = kwargs.pop("model_type", None)
            if model_type is None:
                raise CacheError("teacher.build needs `model_type`")
            kwargs.setdefault("vocab_size", vocab)
            conf = AutoConfig.for_model(model_type, **kwargs)
        else:
            conf = AutoConfig.from_pretrained(path, revision=t.revision,
                                              trust_remote_code=t.trust_remote_code)
    except CacheError:
        raise
    except Exception as exc:
        raise CacheError(f"cannot read the teacher's config ({path or 'teacher.build'}): "
                         f"{type(exc).__name__}: {exc}") from exc
    return conf.get_text_config() if hasattr(conf, "get_text_config") else conf


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
    for name in (MANIFEST, STATE):
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
            if same:
                log.info("teacher cache %s is complete and up to date; nothing to do", root)
                return root
            if not overwrite:
                raise CacheError(f"{root} holds another teacher cache ("
                                 f"{_identity_diff(old['identity'], plan.identity)}); delete "
                                 "it, set distill.cache_dir elsewhere, or pass overwrite=True")
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
        _build(plan, root, state, done, progress)
    return root


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
    from wattkd.energy.ledger import make_meter
    from wattkd.models import load_teacher

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
        with meter, _progress(progress) as bar:
            task = bar.add_task("teacher cache", total=total_tokens, completed=done_tokens)
            with meter.phase("teacher_cache", tokens=0, signals=plan.identity["signals"],
                             encoding=plan.spec.encoding) as window:
                session.update(session=getattr(meter, "session", ""),
                               start_wall=round(time.time(), 4), record=None)
                state["sessions"].append(session)
                atomic_write_json(root / STATE, state)
                for i in todo:
                    rec = _write_part(plan, teacher, root, i, int(starts[i]),
                                      lambda n: bar.update(task, advance=n))
                    done[i] = rec
                    tokens = rec["rows"] * plan.seq_len
                    window.add_tokens(tokens)
                    session["parts"].append(i)
                    session["tokens"] += tokens
                    state["parts"][str(i)] = rec
                    atomic_write_json(root / STATE, state)
            session["record"] = window.record
            session["end_wall"] = round(time.time(), 4)
            atomic_write_json(root / STATE, state)
        del teacher
    seconds = time.perf_counter() - t0
    _finish(plan, root, state, done, seconds)


def _write_part(plan: CachePlan, teacher: Any, root: Path, index: int, row_start: int,
                advance: Any) -> dict[str, Any]:
    """Stream one part to a temp file, row group by row group, then rename it into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    info = plan.shard_manifest["parts"][index]
    ids = _read_shard_part(plan.shards / info["file"], info["rows"], plan.seq_len)
    final = root / part_name(index)
    tmp = final.with_name(f".{final.name}.tmp-{os.urandom(4).hex()}")
    schema = _schema(plan)
    compression = "none" if plan.spec.encoding == "raw" else "zstd"
    writer = pq.ParquetWriter(tmp, schema, compression=compression,
                              compression_level=None if compression == "none" else ZSTD_LEVEL,
                              use_dictionary=False, write_statistics=False)
    pending: dict[str, list[Any]] = {name: [] for name in schema.names}
    pool = ThreadPoolExecutor(1, thread_name_prefix="cache-writer")
    futures: list[Future[None]] = []
    g = plan.row_group_rows

    def flush(rows: int) -> None:
        chunk = {k: v[:rows] for k, v in pending.items()}
        for v in pending.values():
            del v[:rows]
        table = pa.table({k: pa.array(v, schema.field(k).type) for k, v in chunk.items()},
                         schema=schema)
        futures.append(pool.submit(writer.write_table, table, row_group_size=rows))

    try:
        for b0 in range(0, info["rows"], plan.batch_size):
            b1 = min(b0 + plan.batch_size, info["rows"])
            x = torch.from_numpy(ids[b0:b1].astype(np.int64)).to(plan.device)
            out = teacher_batch(teacher, x, plan.spec, plan.vocab,
                                plan.cfg.distill.logit_chunk_tokens,
                                getattr(torch, plan.hidden_dtype) if plan.hidden_dtype else None)
            for k, v in _encode(plan, out, ids[b0:b1], row_start + b0).items():
                pending[k].extend(v)
            while len(pending["row"]) >= g:
                flush(g)
            advance((b1 - b0) * plan.seq_len)
        if pending["row"]:
            flush(len(pending["row"]))
        for f in futures:
            f.result()
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


def _read_shard_part(path: Path, rows: int, seq_len: int) -> np.ndarray:
    import pyarrow.parquet as pq

    col = pq.read_table(path, columns=["input_ids"])["input_ids"].combine_chunks()
    ids = np.asarray(col.flatten(), dtype=np.int32)
    if ids.size != rows * seq_len:
        raise CacheError(f"{path}: holds {ids.size} tokens, the shard manifest says {rows} rows "
                         f"of {seq_len}")
    return ids.reshape(rows, seq_len)


def _schema(plan: CachePlan) -> Any:
    import pyarrow as pa

    fields = [pa.field("row", pa.int64()), pa.field("input_crc32", pa.uint32())]
    fields += [pa.field(name, pa.large_binary()) for name in plan.columns]
    return pa.schema(fields, metadata={"wattkd": json.dumps({"format": FORMAT,
                                                             "version": VERSION})})


def row_crc32(ids: np.ndarray) -> list[int]:
    """crc32 of each row's int32 little-endian token ids: ties a cache row to its shard row."""
    a = np.ascontiguousarray(ids, dtype="<i4")
    return [zlib.crc32(r.tobytes()) for r in a]


def _encode(plan: CachePlan, out: TeacherBatch, ids: np.ndarray, row0: int
            ) -> dict[str, list[Any]]:
    n = ids.shape[0]
    cells: dict[str, list[Any]] = {"row": list(range(row0, row0 + n)),
                                   "input_crc32": row_crc32(ids)}
    if out.topk_ids is not None:
        cells.update(enc.encode_topk(plan.spec.encoding, out.topk_ids, out.topk_logprobs,
                                     out.tail, plan.vocab))
    for i, h in out.hidden.items():
        cells[f"hidden_L{i}"] = enc.encode_hidden(plan.spec.encoding, h)
    for how, p in out.pooled.items():
        cells[f"pooled_{how}"] = enc.encode_f32(p)
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


def _signal_of(column: str) -> str:
    if column.startswith("topk_"):
        return "topk"
    if column.startswith("hidden_"):
        return "hidden"
    if column.startswith("pooled_"):
        return "pooled"
    return "meta"


def _finish(plan: CachePlan, root: Path, state: dict[str, Any],
            done: dict[int, dict[str, Any]], seconds: float) -> None:
    """All parts present: write manifest.json (the cache becomes usable), drop the state."""
    from wattkd import __version__
    from wattkd.teacher_cache.usage import summarize_energy

    parts = [done[i] for i in sorted(done)]
    rows = sum(p["rows"] for p in parts)
    tokens = rows * plan.seq_len
    total = sum(p["bytes"] for p in parts)
    by_signal: dict[str, int] = {}
    for p in parts:
        for col, b in p["column_bytes"].items():
            by_signal[_signal_of(col)] = by_signal.get(_signal_of(col), 0) + b
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
    write_cache_manifest(root, manifest)
    with contextlib.suppress(FileNotFoundError):
        (root / STATE).unlink()
    e = energy
    log.info("teacher cache %s: %d rows, %.1f bytes/token, energy %s", root, rows,
             manifest["bytes"]["per_token"],
             "unavailable" if e["energy_j"] is None else
             f"{e['energy_j']:.1f} J ({e['source']}{', estimated' if e['estimated'] else ''})")


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


class _NoBar:
    def __enter__(self) -> _NoBar:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def add_task(self, *a: Any, **k: Any) -> int:
        return 0

    def update(self, *a: Any, **k: Any) -> None:
        pass


def _progress(enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from rich.progress import (
        BarColumn,
        Progress,
        ProgressColumn,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class _Speed(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text("" if task.speed is None else f"{task.speed:,.0f} tok/s")

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                    TextColumn("{task.completed:,.0f}/{task.total:,.0f} tokens"), _Speed(),
                    TimeRemainingColumn(), transient=False)
