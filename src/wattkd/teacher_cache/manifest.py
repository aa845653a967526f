"""The teacher-cache manifest (format "wattkd-teacher-cache", version 1) and cache identity.

A cache folder holds `manifest.json` (written last, only when every part is complete),
`part-NNNNN.parquet` (part i holds the signals of shard part i, same rows, same order),
`id_order.bin` (packed top-k only: the candidate order, uint32 little-endian [vocab]),
`build-state.json` while a build is unfinished, plus the build's energy ledger
(`phases.jsonl`, `telemetry/`) and `users.jsonl` (runs that trained from the cache).

Part columns, one row per shard row: `row` int64 (global shard row), `input_crc32` uint32
(crc32 of the row's int32 token ids), then one large_binary cell per row for each of
`topk_ids`, `topk_logprobs`, `topk_tail`, `hidden_L{i}`, `pooled_{mean|last}` that the cache
holds (layouts in encoding.py and in the manifest's `columns`), then `crc_<column>` uint32 per
signal column (crc32 of that cell: every cached byte of a row is covered; caches written
before these columns exist are still read, covered by the part sha256). Row groups of ~1 MB.
Readers check each part's sha256 when they first open it.

manifest.json:
    format, version      "wattkd-teacher-cache", 1
    identity             {shards_sha256, tokenizer_sha256, teacher_fingerprint, teacher_dtype,
                          signals, encoding}: what must match for a cache to be used or resumed
    shards               {path, manifest_sha256, rows, seq_len, parts}
    tokenizer            {name, sha256, vocab_size} (from the shard manifest)
    teacher              {id, fingerprint, fingerprint_kind, dtype, num_layers, hidden_size,
                          vocab (compared vocabulary), softcap}
    signals              {spec, topk: {k} | null, hidden: {layers, dtype, stride, positions} |
                          null, pooled: [..]}
    encoding             top-k encoding name; columns: per column {values, shape, codec, ...}
    rows, tokens         rows x seq_len
    parts                [{file, shard_file, row_start, rows, row_group_rows, bytes, sha256,
                           column_bytes}]
    bytes                {total, per_token, per_token_by_signal {topk, hidden, pooled, meta}}
    energy               {energy_j, source, estimated, components, sources, tokens,
                          j_per_token, sessions, complete, notes}
    build                {batch_size, seconds, tokens_per_s, device, versions}

A cache is refused (CacheError, naming both sides) when its shards, tokenizer or teacher differ
from the config's, when it lacks a signal the run needs, or when a part is missing or altered.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from wattkd.atomic import atomic_write_json
from wattkd.errors import DataError
from wattkd.hashing import file_sha256

__all__ = [
    "FORMAT",
    "IDENTITY_KEYS",
    "MANIFEST",
    "STATE",
    "VERSION",
    "CacheError",
    "crc_column",
    "manifest_sha256",
    "part_name",
    "read_cache_manifest",
    "teacher_fingerprint",
    "write_cache_manifest",
]

FORMAT = "wattkd-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
STATE = "build-state.json"
IDENTITY_KEYS = ("shards_sha256", "tokenizer_sha256", "teacher_fingerprint", "teacher_dtype",
                 "signals", "encoding")
_SAMPLES = 64          # chunks hashed per weight file
_SAMPLE_BYTES = 1 << 16


class CacheError(DataError, ValueError):
    """A teacher cache that is missing, incomplete, of an unknown version or does not match."""


def crc_column(column: str) -> str:
    """Name of the per-row crc32 column of a signal column (crc32 of the row's cell bytes)."""
    return f"crc_{column}"


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def manifest_sha256(cache_dir: str | Path) -> str:
    """Hash of a cache's manifest.json bytes: the cache's identity in run records."""
    return file_sha256(Path(cache_dir) / MANIFEST)


def write_cache_manifest(cache_dir: str | Path, manifest: dict[str, Any]) -> Path:
    _validate(manifest, Path(cache_dir) / MANIFEST)
    return atomic_write_json(Path(cache_dir) / MANIFEST, manifest)


def read_cache_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """Load and validate manifest.json; an unfinished build or unknown version is refused."""
    root = Path(cache_dir)
    path = root / MANIFEST
    if not path.is_file():
        if (root / STATE).is_file():
            raise CacheError(f"{root}: the teacher cache build is unfinished (build-state.json, "
                             "no manifest.json); rerun `wattkd teacher cache` to complete it")
        raise CacheError(f"{path}: no teacher cache here; build one with `wattkd teacher "
                         "cache CONFIG`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"{path}: not valid JSON ({exc})") from None
    _validate(manifest, path)
    return manifest


def _validate(m: Any, path: Path) -> None:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise CacheError(f"{path}: format is {got!r}, expected {FORMAT!r}")
    if m.get("version") != VERSION:
        raise CacheError(f"{path}: teacher-cache version {m.get('version')!r} is not supported "
                         f"by this wattkd (it reads version {VERSION}); rebuild the cache or "
                         "upgrade wattkd")
    for key, typ in (("identity", dict), ("shards", dict), ("teacher", dict), ("signals", dict),
                     ("columns", dict), ("parts", list), ("rows", int), ("tokens", int),
                     ("encoding", str)):
        if not isinstance(m.get(key), typ):
            raise CacheError(f"{path}: key {key!r} missing or not a {typ.__name__}")
    missing = [k for k in IDENTITY_KEYS if k not in m["identity"]]
    if missing:
        raise CacheError(f"{path}: identity lacks {missing}")
    if sum(int(p.get("rows", -1)) for p in m["parts"]) != m["rows"]:
        raise CacheError(f"{path}: parts' rows do not add up to rows={m['rows']}")


# ------------------------------------------------------------------------- teacher identity
def teacher_fingerprint(cfg: Any, teacher_path: str | None, vocab: int) -> dict[str, Any]:
    """Identify the teacher without loading it: {id, fingerprint, fingerprint_kind}.

    A folder: sha256 over config.json and, per weight file, its name, size and 64 chunks of
    64 KiB spread over it (first and last included): any retrained or fine-tuned weights
    change them, and a 140 GB teacher is identified in well under a second. A teacher built
    from config (random init): its build kwargs, vocab and init seed, which fix its weights.
    A hub id that is not a local folder: the id and revision (weights cannot be read here).
    """
    t = cfg.teacher
    if teacher_path is None:
        blob = json.dumps({"build": t.build, "vocab": vocab, "seed": cfg.train.seed},
                          sort_keys=True, default=str)
        return {"id": f"build:{(t.build or {}).get('model_type', '?')}",
                "fingerprint": hashlib.sha256(blob.encode()).hexdigest(),
                "fingerprint_kind": "build-config+seed"}
    p = Path(teacher_path)
    if not p.is_dir():
        blob = json.dumps({"id": teacher_path, "revision": t.revision}, sort_keys=True)
        return {"id": teacher_path, "fingerprint": hashlib.sha256(blob.encode()).hexdigest(),
                "fingerprint_kind": "hub-id+revision"}
    h = hashlib.sha256()
    cfg_file = p / "config.json"
    if cfg_file.is_file():
        conf = json.loads(cfg_file.read_text())
        for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
            conf.pop(volatile, None)
        h.update(json.dumps(conf, sort_keys=True).encode())
    weights = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in
                     (".safetensors", ".bin", ".pt", ".gguf"))
    if not weights:
        raise CacheError(f"teacher folder {p} has no weight files (*.safetensors, *.bin)")
    for f in weights:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for off in _sample_offsets(size):
                fh.seek(off)
                h.update(fh.read(_SAMPLE_BYTES))
    return {"id": str(teacher_path), "fingerprint": h.hexdigest(),
            "fingerprint_kind": "config+sampled-weights-sha256"}


def _sample_offsets(size: int) -> list[int]:
    if size <= _SAMPLES * _SAMPLE_BYTES:
        return list(range(0, size, _SAMPLE_BYTES))
    last = size - _SAMPLE_BYTES
    return sorted({round(i * last / (_SAMPLES - 1)) for i in range(_SAMPLES)})
