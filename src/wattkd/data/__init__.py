"""Data stage: tokenizer, sources, shard builder and the shard reader.

Names are imported lazily so that `build_shards` (and its worker processes) do not import
torch, and `ShardDataset` users do not import datasets.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_tokenizer": "wattkd.data.tokenizer",
    "tokenizer_sha256": "wattkd.data.tokenizer",
    "build_shards": "wattkd.data.shards",
    "ShardBuildError": "wattkd.data.shards",
    "ShardDataset": "wattkd.data.loader",
    "collate": "wattkd.data.loader",
    "read_manifest": "wattkd.data.manifest",
    "manifest_sha256": "wattkd.data.manifest",
    "ManifestError": "wattkd.data.manifest",
    "iter_documents": "wattkd.data.sources",
    "SourceError": "wattkd.data.sources",
}

__all__ = ["ManifestError", "ShardBuildError", "ShardDataset", "SourceError", "build_shards",
           "collate", "iter_documents", "load_tokenizer", "manifest_sha256", "read_manifest",
           "tokenizer_sha256"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
