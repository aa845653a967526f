"""Bundled public-domain text, so a demo runs on a laptop with no downloads.

Sub-corpora: `kjv` (King James Bible, one document per chapter or part of one), `shakespeare`
(16 plays and the sonnets, by scene), `milton` (Paradise Lost/Regained, the shorter poems,
Areopagitica), `austen` (Pride and Prejudice, by chapter part). Documents are ~0.5-4 KB.
`documents("all")` interleaves the sub-corpora evenly (each spread over the whole stream), so
any prefix of it is a mix of all four. Sources and licences: ATTRIBUTION.md beside this file.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterator
from functools import lru_cache
from importlib import resources

__all__ = ["SUBCORPORA", "documents", "fingerprint", "names"]

SUBCORPORA = ("kjv", "shakespeare", "milton", "austen")
DOC_SEP = "\n\f\n"


def names() -> tuple[str, ...]:
    """Valid values for `documents(name=...)`."""
    return ("all", *SUBCORPORA)


def _file(name: str) -> resources.abc.Traversable:
    return resources.files(__name__).joinpath(f"{name}.txt.gz")


@lru_cache(maxsize=len(SUBCORPORA))
def _load(name: str) -> tuple[str, ...]:
    data = gzip.decompress(_file(name).read_bytes()).decode("utf-8")
    return tuple(d for d in data.rstrip("\n").split(DOC_SEP) if d.strip())


def _check(name: str) -> None:
    if name not in names():
        raise ValueError(f"unknown bundled corpus {name!r}; expected one of: {', '.join(names())}")


def documents(name: str = "all") -> Iterator[str]:
    """Yield the documents of one sub-corpus, or of all of them evenly interleaved."""
    _check(name)
    if name != "all":
        yield from _load(name)
        return
    parts = [_load(n) for n in SUBCORPORA]
    # Document i of a corpus with n documents sits at position (i + 0.5) / n of the stream.
    order = sorted((((i + 0.5) / len(p), k, i) for k, p in enumerate(parts)
                    for i in range(len(p))))
    for _, k, i in order:
        yield parts[k][i]


def fingerprint(name: str = "all") -> str:
    """sha256 over the compressed files behind `name`: changes when the shipped text does."""
    _check(name)
    h = hashlib.sha256()
    for n in (SUBCORPORA if name == "all" else (name,)):
        h.update(n.encode() + b"\0" + _file(n).read_bytes())
    return h.hexdigest()
