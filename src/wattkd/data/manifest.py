"""The shard-set manifest (format "wattkd-shards", version 1): read, write, verify.

A shard set is a folder with `manifest.json` and `part-NNNNN.parquet` files. The manifest
pins everything a reader or a later stage must agree on (tokenizer hash, seq_len, sources)
and each part's row count, byte size and sha256, so a truncated or altered part is caught
with its file name rather than showing up as a strange loss curve.

manifest.json (keys in this order; no timestamps, so the same build gives the same bytes):
    format          "wattkd-shards"
    version         1
    split           "train" | "heldout"
    config_hash     sha256 of the build inputs (data config, tokenizer, source contents)
    tokenizer       {name, sha256 (of tokenizer.json), vocab_size, eos_id, bos_id, pad_id}
    seq_len         tokens per row
    seed            the build seed (heldout selection)
    heldout_fraction
    columns         ["input_ids"] or ["input_ids", "loss_mask"]
    sources         [{name, kind, path, weight, max_tokens, documents, tokens}]
    total_tokens    rows * seq_len (sum of sources[].tokens)
    rows            number of rows
    dropped_tokens  tail shorter than seq_len left out at the end of the stream
    parts           [{file, rows, bytes, sha256}]
    content_sha256  "sha256:<hex>" of the other keys (wattkd.sealed), last; manifests written
                    before it existed are read as before (validated, not sealed)

Reading and writing go through the base shared with the teacher-cache manifest
(wattkd.manifest_file): a damaged manifest.json is a ManifestError naming the file.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from wattkd.errors import DataError
from wattkd.hashing import file_sha256
from wattkd.manifest_file import MANIFEST, ManifestFile, part_name

__all__ = [
    "FORMAT",
    "MANIFEST",
    "VERSION",
    "ManifestError",
    "manifest_sha256",
    "part_name",
    "read_manifest",
    "read_part_verified",
    "verify_parts",
    "write_manifest",
]

FORMAT = "wattkd-shards"
VERSION = 1
PART_RE = re.compile(r"^part-\d{5,}\.parquet$")
REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format": str, "version": int, "tokenizer": dict, "seq_len": int, "seed": int,
    "sources": list, "total_tokens": int, "rows": int, "columns": list, "parts": list,
}


class ManifestError(DataError, ValueError):
    """A shard set that is missing, of an unknown version, or does not match its manifest."""


def manifest_sha256(shard_dir: str | Path) -> str:
    """Hash of a shard set's manifest.json bytes: what a teacher cache records to stay aligned."""
    return _FILE.sha256(shard_dir)


def write_manifest(shard_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write manifest.json atomically and sealed (fixed key order, 2-space indent)."""
    return _FILE.write(shard_dir, manifest)


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """Load, check the seal of and validate manifest.json; refuses other formats and unknown
    versions."""
    return _FILE.read(shard_dir)


def _validate(m: Any, path: Path) -> None:
    if not isinstance(m, dict):
        raise ManifestError(f"{path}: top level must be an object")
    if m.get("format") != FORMAT:
        raise ManifestError(f"{path}: format is {m.get('format')!r}, expected {FORMAT!r}")
    if m.get("version") != VERSION:
        raise ManifestError(f"{path}: shard format version {m.get('version')!r} is not "
                            f"supported by this wattkd (it reads version {VERSION}); rebuild "
                            "the shards or upgrade wattkd")
    for key, typ in REQUIRED.items():
        if not isinstance(m.get(key), typ) or isinstance(m.get(key), bool):
            raise ManifestError(f"{path}: key {key!r} missing or not a {typ.__name__}")
    if not isinstance(m["tokenizer"].get("sha256"), str):
        raise ManifestError(f"{path}: tokenizer.sha256 missing or not a string")
    if m["columns"][:1] != ["input_ids"] or not set(m["columns"]) <= {"input_ids", "loss_mask"}:
        raise ManifestError(f"{path}: columns {m['columns']} must be ['input_ids'] or "
                            "['input_ids', 'loss_mask']")
    rows = 0
    for i, part in enumerate(m["parts"]):
        if not isinstance(part, dict) or not PART_RE.match(str(part.get("file", ""))):
            raise ManifestError(f"{path}: parts[{i}] must name a part-NNNNN.parquet file in "
                                f"the same folder, got {part!r}")
        for key in ("rows", "bytes"):
            if not isinstance(part.get(key), int) or part[key] < 0:
                raise ManifestError(f"{path}: parts[{i}].{key} must be a non-negative integer")
        if not re.fullmatch(r"[0-9a-f]{64}", str(part.get("sha256", ""))):
            raise ManifestError(f"{path}: parts[{i}].sha256 must be 64 hex digits")
        rows += part["rows"]
    if rows != m["rows"] or m["rows"] * m["seq_len"] != m["total_tokens"]:
        raise ManifestError(f"{path}: rows/total_tokens ({m['rows']}/{m['total_tokens']}) do "
                            f"not add up with the parts ({rows} rows) and seq_len {m['seq_len']}")


REBUILD = "rebuild the shards with `wattkd data build CONFIG --overwrite`"
_FILE = ManifestFile(
    error=ManifestError, validate=_validate, rebuild=REBUILD,
    missing=lambda folder: (f"{folder / MANIFEST}: no shard manifest here (expected a folder "
                            "written by `wattkd data build`, holding manifest.json and "
                            "part-*.parquet)"))


def read_part_verified(path: Path, sha256: str, what: str, chunk: int = 1 << 20) -> bytes:
    """The bytes of a part, hashed while they are read (one pass, no second read); refuses
    a part whose sha256 differs from the manifest's. `what` names the part in the error."""
    h = hashlib.sha256()
    buf = bytearray()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            buf += block
    if h.hexdigest() != sha256:
        raise ManifestError(f"{path}: sha256 differs from the manifest ({what}; the file is "
                            f"corrupt or was altered after the build); {REBUILD}")
    return bytes(buf)


def verify_parts(shard_dir: str | Path, manifest: dict[str, Any], level: str = "size") -> None:
    """Check the parts against the manifest: "none", "size" (exists, byte size) or "sha256".

    Row counts and row lengths are checked by the reader when it opens each part.
    """
    if level not in ("none", "size", "sha256"):
        raise ValueError(f"verify must be 'none', 'size' or 'sha256', got {level!r}")
    if level == "none":
        return
    root = Path(shard_dir)
    for part in manifest["parts"]:
        path = root / part["file"]
        if not path.is_file():
            raise ManifestError(f"{path}: shard part listed in the manifest is missing")
        size = path.stat().st_size
        if size != part["bytes"]:
            raise ManifestError(f"{path}: shard part is {size} bytes, manifest says "
                                f"{part['bytes']} (truncated or replaced?)")
        if level == "sha256" and file_sha256(path) != part["sha256"]:
            raise ManifestError(f"{path}: sha256 differs from the manifest (corrupt part); "
                                f"{REBUILD}")
