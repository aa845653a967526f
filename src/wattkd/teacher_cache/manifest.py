"""The teacher-cache manifest (format "wattkd-teacher-cache", version 1) and cache identity.

A cache folder holds `manifest.json` (written last, only when every part is complete),
`part-NNNNN.parquet` (part i holds the signals of shard part i, same rows, same order),
`id_order.bin` (packed top-k only: the candidate order, uint32 little-endian [vocab]),
`build-state.json` while a build is unfinished, plus the build's energy ledger
(`phases.jsonl`, `telemetry/`) and `users.jsonl` (runs that trained from the cache).

Part columns, one row per shard row: `row` int64 (global shard row), `input_crc32` uint32
(crc32 of the row's int32 token ids), then one large_binary cell per row for each of
`topk_ids`, `topk_logprobs`, `topk_tail`, `hidden_L{i}`, `pooled_{mean|last}` that the cache
holds (layouts in distill/signal_encoding.py and in the manifest's `columns`), then `crc_<column>` uint32 per
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
    content_sha256       "sha256:<hex>" of the other keys (wattkd.sealed), last; caches built
                         before it existed are read as before (validated, not sealed)

A cache is refused (CacheError, naming both sides) when its shards, tokenizer or teacher differ
from the config's, when it lacks a signal the run needs, or when a part is missing or altered;
a damaged or incomplete manifest.json is a CacheError naming the file and the key. Reading and
writing go through the base shared with the shard manifest (wattkd.manifest_file).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from wattkd.errors import DataError
from wattkd.manifest_file import MANIFEST, ManifestFile, part_name

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


def manifest_sha256(cache_dir: str | Path) -> str:
    """Hash of a cache's manifest.json bytes: the cache's identity in run records."""
    return _FILE.sha256(cache_dir)


def write_cache_manifest(cache_dir: str | Path, manifest: dict[str, Any]) -> Path:
    return _FILE.write(cache_dir, manifest)


def read_cache_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """Load, check the seal of and validate manifest.json; an unfinished build, a damaged
    manifest or an unknown version is refused."""
    return _FILE.read(cache_dir)


def _missing(root: Path) -> str:
    if (root / STATE).is_file():
        return (f"{root}: the teacher cache build is unfinished (build-state.json, no "
                "manifest.json); rerun `wattkd teacher cache` to complete it")
    return f"{root / MANIFEST}: no teacher cache here; build one with `wattkd teacher cache CONFIG`"


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
    for section, keys in _NESTED.items():
        lacking = [k for k in keys if k not in m[section]]
        if lacking:
            raise CacheError(f"{path}: {section} lacks {lacking}; {REBUILD}")
    for i, part in enumerate(m["parts"]):
        _validate_part(part, i, path)
    if sum(p["rows"] for p in m["parts"]) != m["rows"]:
        raise CacheError(f"{path}: parts' rows do not add up to rows={m['rows']}")


REBUILD = "rebuild the cache with `wattkd teacher cache CONFIG --overwrite`"
# keys of the manifest's sections that readers use (a manifest lacking one is refused by name)
_NESTED = {"shards": ("path", "manifest_sha256"), "teacher": ("id", "fingerprint", "vocab"),
           "signals": ("spec",)}
_PART_INTS = ("row_start", "rows", "row_group_rows", "bytes")


def _validate_part(part: Any, i: int, path: Path) -> None:
    if not isinstance(part, dict) or not isinstance(part.get("file"), str):
        raise CacheError(f"{path}: parts[{i}] must be an object naming its file; {REBUILD}")
    for key in _PART_INTS:
        value = part.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CacheError(f"{path}: parts[{i}].{key} missing or not a non-negative integer "
                             f"(got {value!r}); {REBUILD}")
    if part["row_group_rows"] == 0 and part["rows"] > 0:
        raise CacheError(f"{path}: parts[{i}].row_group_rows is 0; {REBUILD}")
    if not re.fullmatch(r"[0-9a-f]{64}", str(part.get("sha256", ""))):
        raise CacheError(f"{path}: parts[{i}].sha256 must be 64 hex digits; {REBUILD}")


_FILE = ManifestFile(error=CacheError, validate=_validate, missing=_missing, rebuild=REBUILD)


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
