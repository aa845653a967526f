"""Read documents from one `SourceConfig`: hub datasets, local json/jsonl/parquet/text, bundled.

A document is either a `str` (plain text; every token is trained on) or an `Instruction`
(prompt text and response text, already formatted; only response tokens are trained on).

Kinds and what a document is:
  bundled   `bundled` (all sub-corpora, interleaved) or `bundled:<kjv|shakespeare|milton|austen>`
  json      .json (a JSON array of records, or JSON lines) / .jsonl / .ndjson, optionally .gz:
            one document per record
  parquet   .parquet: one document per row (only the needed columns are read)
  text      .txt / .text / .md, optionally .gz: one document per blank-line-separated block
            (the convention of BERT-style pretraining text; a whole file as one document would
            make the held-out split by documents useless for a few large files)
  hub       `datasets.load_dataset(path, subset, split=, revision=, streaming=True)`; a local
            folder written by `Dataset.save_to_disk` is read with `load_from_disk`; a local
            folder of data files goes through `load_dataset(folder)` too, which is how the hub
            code path is tested offline.
`path` may be a file, a folder (its files of the kind's extensions, recursively) or a glob;
matches are sorted so the order never depends on the file system. `auto` infers the kind:
`bundled...` -> bundled; by file extension; a `save_to_disk` folder -> hub; a folder of one
kind of data file -> that kind; a non-existing `owner/name` -> hub.

Instruction records (`prompt_field` + `response_field`): without `chat_template` the document
is `prompt + "\n"` (masked) followed by `response` (trained); with `chat_template: true` the
tokenizer's chat template renders [user: prompt] with the generation prompt as the masked
part, and the rest of [user: prompt, assistant: response] as the trained part.
Records whose field is null or empty are skipped (and counted); a missing field is an error.
"""

from __future__ import annotations

import codecs
import contextlib
import glob as globlib
import gzip
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from wattkd import corpus
from wattkd.config import SourceConfig
from wattkd.errors import DataError
from wattkd.hashing import file_sha256

log = logging.getLogger(__name__)

__all__ = [
    "Document",
    "Instruction",
    "SourceError",
    "check_source",
    "iter_documents",
    "resolve_files",
    "resolve_kind",
    "source_fingerprint",
    "source_name",
]

EXTENSIONS = {
    "json": (".json", ".jsonl", ".ndjson"),
    "parquet": (".parquet",),
    "text": (".txt", ".text", ".md"),
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Instruction:
    """One instruction example: `prompt` tokens get loss mask 0, `response` tokens 1."""

    prompt: str
    response: str


Document = str | Instruction


class SourceError(DataError, ValueError):
    """A data source that cannot be read as configured; the message names the source."""


def source_name(src: SourceConfig) -> str:
    return src.name or src.path


def _kind_of_file(path: str) -> str | None:
    p = path.lower()
    p = p.removesuffix(".gz")
    for kind, exts in EXTENSIONS.items():
        if p.endswith(exts):
            return kind
    return None


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file()
                              or (path / "dataset_dict.json").is_file())


def _data_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*")
                  if p.is_file() and _kind_of_file(p.name)
                  and not any(x.startswith(".") for x in p.relative_to(folder).parts))


def resolve_kind(src: SourceConfig) -> str:
    """The concrete kind of a source (`auto` resolved), or SourceError saying why not."""
    name = source_name(src)
    if src.kind != "auto":
        return src.kind
    path = src.path
    if path == "bundled" or path.startswith("bundled:"):
        return "bundled"
    if GLOB_CHARS.search(path):
        matches = _glob(path)
        kinds = {_kind_of_file(m) for m in matches}
        if not matches:
            raise SourceError(f"source {name!r}: glob {path!r} matches no file")
        if len(kinds) != 1 or None in kinds:
            raise SourceError(f"source {name!r}: glob {path!r} matches files of several or "
                              "unknown kinds; narrow the glob or set `kind`")
        return kinds.pop()  # type: ignore[return-value]
    p = Path(path).expanduser()
    if p.is_file():
        kind = _kind_of_file(p.name)
        if kind is None:
            raise SourceError(f"source {name!r}: cannot tell the kind of {path!r} from its "
                              f"extension; set kind to one of json, parquet, text")
        return kind
    if p.is_dir():
        if _is_saved_dataset(p):
            return "hub"
        kinds = {_kind_of_file(f) for f in _data_files(p)}
        return kinds.pop() if len(kinds) == 1 else "hub"  # type: ignore[return-value]
    if HUB_ID.match(path) and not path.startswith((".", "/", "~")):
        return "hub"
    raise SourceError(f"source {name!r}: path {path!r} does not exist (and is not a hub id "
                      "like 'owner/name')")


def _glob(pattern: str) -> list[str]:
    return sorted(m for m in globlib.glob(os.path.expanduser(pattern), recursive=True)
                  if os.path.isfile(m))


def resolve_files(src: SourceConfig, kind: str) -> list[str]:
    """Files of a json/parquet/text source, sorted; SourceError when there are none."""
    name = source_name(src)
    p = Path(src.path).expanduser()
    if GLOB_CHARS.search(src.path):
        files = _glob(src.path)
        what = f"glob {src.path!r} matches no file"
    elif p.is_dir():
        files = [f for f in _data_files(p) if _kind_of_file(f) == kind]
        what = f"folder {src.path!r} holds no {kind} file ({', '.join(EXTENSIONS[kind])})"
    elif p.is_file():
        files = [str(p)]
        what = ""
    else:
        files, what = [], f"path {src.path!r} does not exist"
    if not files:
        raise SourceError(f"source {name!r}: {what}")
    return files


def _open_binary(path: str) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")  # type: ignore[return-value]


def _open_text(path: str) -> io.TextIOBase:
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8")


@contextlib.contextmanager
def _utf8(path: str, name: str) -> Iterator[None]:
    """Reading `path` as UTF-8: a byte that is not UTF-8 becomes a SourceError naming the
    file, the byte, its offset and line (Python's own error names neither file nor line)."""
    try:
        yield
    except UnicodeDecodeError:
        offset, line, byte = _first_bad_byte(path)
        raise SourceError(f"source {name!r}: {path} is not UTF-8 text: byte 0x{byte:02x} at "
                          f"offset {offset:,} (line {line}) cannot be decoded; convert the "
                          "file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or remove the "
                          "byte") from None


def _first_bad_byte(path: str) -> tuple[int, int, int]:
    """(byte offset, 1-based line, byte value) of the first invalid UTF-8 byte (of the
    decompressed stream for .gz files)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with _open_binary(path) as fh:
        while chunk := fh.read(1 << 20):
            pending = decoder.getstate()[0]  # an unfinished character from the last chunk
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                data = pending + chunk
                return (offset - len(pending) + exc.start,
                        line + data.count(b"\n", 0, exc.start), data[exc.start])
            offset += len(chunk)
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:  # the file ends inside a character
            tail = exc.object
            return offset - len(tail) + exc.start, line, tail[exc.start]
    return offset, line, 0


# ----------------------------------------------------------------------------- records
def _json_records(files: list[str], name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for f in files:
        with _utf8(f, name), _open_text(f) as fh:
            head = fh.read(1 << 12).lstrip()
            fh.seek(0)
            if f.lower().removesuffix(".gz").endswith(".json") and head.startswith("["):
                try:
                    data = json.load(fh)
                except json.JSONDecodeError as exc:
                    raise SourceError(f"source {name!r}: {f} is not valid JSON: {exc}") from None
                for i, rec in enumerate(data):
                    yield f"{f} record {i}", rec
                continue
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SourceError(f"source {name!r}: {f} line {n} is not valid JSON: "
                                      f"{exc}") from None
                yield f"{f} line {n}", rec


def _parquet_records(files: list[str], name: str, fields: list[str]
                     ) -> Iterator[tuple[str, dict[str, Any]]]:
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
            raise SourceError(f"source {name!r}: {f} is not a readable Parquet file: "
                              f"{exc}") from None
        have = pf.schema_arrow.names
        missing = [c for c in fields if c not in have]
        if missing:
            raise SourceError(f"source {name!r}: {f} has no column {missing[0]!r} "
                              f"(columns: {', '.join(have)})")
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=fields):
            cols = [batch.column(c).to_pylist() for c in fields]
            for values in zip(*cols, strict=True):
                yield f"{f} row {row}", dict(zip(fields, values, strict=True))
                row += 1


def _hub_records(src: SourceConfig, name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets  # lazy: slow import, only hub data needs it

    p = Path(src.path).expanduser()
    try:
        if _is_saved_dataset(p):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if src.split not in ds:
                    raise SourceError(f"source {name!r}: split {src.split!r} not in "
                                      f"{src.path} (splits: {', '.join(ds)})")
                ds = ds[src.split]
        else:
            ds = datasets.load_dataset(src.path, src.subset, split=src.split,
                                       revision=src.revision, streaming=True)
    except SourceError:
        raise
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        hint = " (offline mode is on: only local folders and cached datasets work)" \
            if offline and offline not in ("0", "false") else ""
        raise SourceError(f"source {name!r}: could not load dataset {src.path!r} (subset "
                          f"{src.subset!r}, split {src.split!r}, revision {src.revision!r})"
                          f"{hint}: {type(exc).__name__}: {exc}") from exc
    for i, rec in enumerate(ds):
        yield f"{src.path} [{src.split}] record {i}", rec


def _text_documents(files: list[str], name: str) -> Iterator[str]:
    for f in files:
        with _utf8(f, name), _open_text(f) as fh:
            block: list[str] = []
            for line in fh:
                if line.strip():
                    block.append(line)
                elif block:
                    yield "".join(block).strip("\n")
                    block = []
            if block:
                yield "".join(block).strip("\n")


# --------------------------------------------------------------------------- documents
def _field(rec: Any, field: str, where: str, name: str) -> str | None:
    if not isinstance(rec, dict):
        raise SourceError(f"source {name!r}: {where} is a {type(rec).__name__}, expected an "
                          "object with named fields")
    if field not in rec:
        raise SourceError(f"source {name!r}: {where} has no field {field!r} (fields: "
                          f"{', '.join(map(str, rec)) or 'none'})")
    value = rec[field]
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise SourceError(f"source {name!r}: {where} field {field!r} is a "
                          f"{type(value).__name__}, expected a string")
    return value


class _ChatFormatter:
    """Split a rendered chat into the prompt part (masked) and the response part."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            tname = getattr(tokenizer, "name_or_path", None)
            raise SourceError(f"source {name!r}: chat_template is true but tokenizer "
                              f"{tname!r} has no chat template")
        self.tok = tokenizer
        self.name = name

    def __call__(self, prompt: str, response: str) -> Instruction:
        user = [{"role": "user", "content": prompt}]
        head = self.tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = self.tok.apply_chat_template(
            [*user, {"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(head):
            raise SourceError(f"source {self.name!r}: the tokenizer's chat template does not "
                              "render the prompt (with generation prompt) as a prefix of the "
                              "full conversation, so prompt tokens cannot be masked")
        return Instruction(head, full[len(head):])


def iter_documents(src: SourceConfig, tokenizer: Any = None) -> Iterator[Document]:
    """Yield the documents of `src` in a fixed order (`tokenizer` only for chat templates)."""
    name = source_name(src)
    kind = resolve_kind(src)
    instruct = src.prompt_field is not None
    if src.chat_template and not instruct:
        raise SourceError(f"source {name!r}: chat_template needs prompt_field and "
                          "response_field")
    if kind == "bundled":
        if instruct:
            raise SourceError(f"source {name!r}: the bundled corpus is plain text; drop "
                              "prompt_field/response_field")

        yield from corpus.documents(_bundled_name(src))
        return
    if kind == "text":
        if instruct:
            raise SourceError(f"source {name!r}: text files hold plain documents; "
                              "prompt_field/response_field need json, parquet or hub data")
        yield from _text_documents(resolve_files(src, kind), name)
        return
    fields = [src.prompt_field, src.response_field] if instruct else [src.text_field]
    records: Iterable[tuple[str, dict[str, Any]]]
    if kind == "json":
        records = _json_records(resolve_files(src, kind), name)
    elif kind == "parquet":
        records = _parquet_records(resolve_files(src, kind), name, fields)  # type: ignore[arg-type]
    else:
        records = _hub_records(src, name)
    chat = _ChatFormatter(tokenizer, name) if src.chat_template else None
    skipped = 0
    for where, rec in records:
        if not instruct:
            text = _field(rec, src.text_field, where, name)
            if text is None:
                skipped += 1
                continue
            yield text
            continue
        prompt = _field(rec, src.prompt_field, where, name)  # type: ignore[arg-type]
        response = _field(rec, src.response_field, where, name)  # type: ignore[arg-type]
        if prompt is None or response is None:
            skipped += 1
            continue
        yield chat(prompt, response) if chat else Instruction(prompt + "\n", response)
    if skipped:
        log.info("source %r: skipped %d records with an empty or null field", name, skipped)


def _bundled_name(src: SourceConfig) -> str:
    path = src.path
    sub = "all" if path == "bundled" else path.removeprefix("bundled:")
    if not (path == "bundled" or path.startswith("bundled:")) or sub not in corpus.names():
        raise SourceError(f"source {source_name(src)!r}: bundled path must be 'bundled' or "
                          f"'bundled:<name>' with name in {', '.join(corpus.names()[1:])}; "
                          f"got {path!r}")
    return sub


def check_source(src: SourceConfig, tokenizer: Any = None) -> None:
    """Fail early: open the source and read its first document (fields, template, files)."""
    it = iter_documents(src, tokenizer)
    try:
        first = next(it, None)
    finally:
        close = getattr(it, "close", None)
        if close:
            close()
    if first is None:
        raise SourceError(f"source {source_name(src)!r}: no documents in {src.path!r}")


def source_fingerprint(src: SourceConfig) -> dict[str, Any]:
    """What identifies the source's content, for the shard config hash.

    Local files: name, size and sha256 of each (content, not mtime, so a copied data set gives
    the same hash). Remote hub datasets: id, subset, split and revision (pin a revision for
    a reproducible hash; without one the hub may change the data under the same hash).
    """
    kind = resolve_kind(src)
    if kind == "bundled":
        return {"kind": kind, "corpus": corpus.fingerprint(_bundled_name(src))}
    if kind in EXTENSIONS:
        files = [(os.path.basename(f), f) for f in resolve_files(src, kind)]
    else:
        p = Path(src.path).expanduser()
        if not p.is_dir():
            if src.revision is None:
                log.warning("source %r: hub dataset %r has no pinned revision; the shard "
                            "config hash cannot notice upstream changes", source_name(src),
                            src.path)
            return {"kind": kind, "hub": src.path, "subset": src.subset, "split": src.split,
                    "revision": src.revision}
        files = [(f.relative_to(p).as_posix(), str(f)) for f in sorted(p.rglob("*"))
                 if f.is_file() and not any(x.startswith(".") for x in f.relative_to(p).parts)]
    return {"kind": kind, "split": src.split, "subset": src.subset,
            "files": [[rel, os.path.getsize(f), file_sha256(f)] for rel, f in files]}
