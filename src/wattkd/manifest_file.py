"""The base both folder manifests share (shard sets in data/manifest.py, teacher caches in
teacher_cache/manifest.py): one `manifest.json` per folder, written validated, sealed and
atomically; read back only after its seal (wattkd.sealed) and its format's validation pass.

A manifest is what a reader trusts about every other file of the folder, so a damaged one is a
named error (the format's error class, exit 3) saying how to rebuild it; one written before
seals existed is read as before (validated, not sealed).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wattkd.atomic import atomic_write_json
from wattkd.errors import DataError
from wattkd.hashing import file_sha256
from wattkd.sealed import SealError, check_seal, seal, unsealed

__all__ = ["MANIFEST", "ManifestFile", "part_name"]

MANIFEST = "manifest.json"


def part_name(index: int) -> str:
    """The file name of part `index` (shard and cache parts share the scheme)."""
    return f"part-{index:05d}.parquet"


@dataclass(frozen=True)
class ManifestFile:
    """One manifest format: its error class, its validation, what a missing one means and
    how a damaged one is rebuilt."""

    error: type[DataError]
    validate: Callable[[Any, Path], None]
    missing: Callable[[Path], str]   # the message for a folder without manifest.json
    rebuild: str                     # what to do about a damaged one

    def path(self, folder: str | Path) -> Path:
        return Path(folder) / MANIFEST

    def sha256(self, folder: str | Path) -> str:
        """Hash of the manifest's bytes: the folder's identity in other records."""
        return file_sha256(self.path(folder))

    def write(self, folder: str | Path, manifest: dict[str, Any]) -> Path:
        """Validate, seal and write manifest.json atomically (fixed key order, 2-space indent:
        the same manifest gives the same bytes)."""
        path = self.path(folder)
        self.validate(manifest, path)
        return atomic_write_json(path, seal(manifest))

    def read(self, folder: str | Path) -> dict[str, Any]:
        """The manifest (without its seal), after the seal and the format's checks."""
        path = self.path(folder)
        if not path.is_file():
            raise self.error(self.missing(Path(folder)))
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self.error(f"{path}: not valid JSON ({exc}); {self.rebuild}") from None
        if isinstance(manifest, dict):
            try:
                check_seal(manifest)
            except SealError as exc:
                raise self.error(f"{path}: {exc}; {self.rebuild}") from None
            manifest = unsealed(manifest)
        self.validate(manifest, path)
        return manifest
