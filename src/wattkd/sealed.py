"""JSON records that carry the sha256 of their own content ("sealed").

A checkpoint's state.json and the shard / teacher-cache manifest.json files hold the sha256 of
every other file, but nothing covered their own bytes: one flipped bit ("step": 20 -> 30) was
trusted. A sealed record adds `content_sha256: "sha256:<hex>"`, the sha256 of its other keys
in a canonical form (sorted keys, no spaces), so a reader checks the record before it trusts it.

Records written before seals existed have no such key and are read as before (their structure
is validated; their parts still carry sha256s). A damaged key name is not mistaken for such an
old record: a seal value under any other key is refused, so every single-bit flip is caught.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

__all__ = ["SEAL_KEY", "SealError", "check_seal", "seal", "unsealed"]

SEAL_KEY = "content_sha256"
_PREFIX = "sha256:"
_SEAL_RE = re.compile(r"sha256:[0-9a-f]{64}")


class SealError(ValueError):
    """A sealed record whose content no longer matches its seal."""


def _digest(record: dict[str, Any]) -> str:
    body = unsealed(record)
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return _PREFIX + hashlib.sha256(text.encode("utf-8")).hexdigest()


def unsealed(record: dict[str, Any]) -> dict[str, Any]:
    """The record without its seal (what readers use)."""
    return {k: v for k, v in record.items() if k != SEAL_KEY}


def seal(record: dict[str, Any]) -> dict[str, Any]:
    """The record with its seal as the last key (written by the format's writer)."""
    return {**unsealed(record), SEAL_KEY: _digest(record)}


def check_seal(record: dict[str, Any]) -> bool:
    """True when the record is sealed and intact, False when it predates seals (no seal
    anywhere); SealError saying what is wrong otherwise."""
    if SEAL_KEY in record:
        got = record[SEAL_KEY]
        if not isinstance(got, str) or not _SEAL_RE.fullmatch(got):
            raise SealError(f"its {SEAL_KEY} is malformed ({str(got)[:20]!r}...)")
        if got != _digest(record):
            raise SealError(f"its content differs from its {SEAL_KEY} (a byte was changed "
                            "or corrupted after it was written)")
        return True
    stray = [k for k, v in record.items() if isinstance(v, str) and _SEAL_RE.fullmatch(v)]
    if stray:
        raise SealError(f"key {stray[0]!r} holds its content seal (the key name "
                        f"{SEAL_KEY!r} is damaged)")
    return False
