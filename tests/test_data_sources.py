"""Sources: every kind reads real local files in a fixed order; bad input names the source."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wattkd import corpus
from wattkd.config import SourceConfig
from wattkd.data.sources import (
    Instruction,
    SourceError,
    check_source,
    iter_documents,
    resolve_kind,
    source_fingerprint,
)


@pytest.fixture(scope="module", autouse=True)
def wattkd_cache(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "wattkd-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WATTKD_CACHE", str(path))
        yield path


def docs(**kw):
    return list(iter_documents(SourceConfig(**kw)))


def test_json_array_jsonl_gz_and_null_records(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    (tmp_path / "b.jsonl").write_text('{"text": "three"}\n\n{"text": null}\n{"text": ""}\n')
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write('{"body": "four", "text": "five"}\n')
    assert docs(path=str(tmp_path / "a.json")) == ["one", "two"]
    assert docs(path=str(tmp_path / "b.jsonl")) == ["three"]  # null/empty skipped
    assert docs(path=str(tmp_path / "c.jsonl.gz"), text_field="body") == ["four"]
    # A folder: its json files, sorted; a glob: the same, sorted whatever the pattern.
    assert docs(path=str(tmp_path)) == ["one", "two", "three", "five"]
    assert docs(path=str(tmp_path / "*.json*")) == ["one", "two", "three", "five"]


def test_parquet_reads_only_needed_columns(tmp_path):
    pq.write_table(pa.table({"text": ["p1", None, "p2"], "other": [1, 2, 3]}),
                   tmp_path / "part-1.parquet")
    pq.write_table(pa.table({"text": ["p3"], "other": [4]}), tmp_path / "part-0.parquet")
    assert resolve_kind(SourceConfig(path=str(tmp_path))) == "parquet"
    assert docs(path=str(tmp_path)) == ["p3", "p1", "p2"]
    with pytest.raises(SourceError, match=r"source 'pq'.*part-0.parquet has no column 'body' "
                                          r"\(columns: text, other\)"):
        docs(path=str(tmp_path), name="pq", text_field="body")


def test_text_blocks_are_documents(tmp_path):
    (tmp_path / "b.txt").write_text("first line\nsecond line\n\n\n  \nnext block\n")
    (tmp_path / "a.txt").write_text("file a\n")
    assert docs(path=str(tmp_path / "*.txt")) == ["file a", "first line\nsecond line",
                                                  "next block"]


def test_bundled_sources():
    assert docs(path="bundled:austen") == list(corpus.documents("austen"))
    assert docs(path="bundled")[:5] == list(corpus.documents("all"))[:5]
    with pytest.raises(SourceError, match="source 'bundled:bible'.*austen"):
        docs(path="bundled:bible")


def test_hub_code_path_offline_with_local_folders(tmp_path):
    """`kind: hub` goes through datasets: load_dataset(folder) and load_from_disk."""
    import datasets

    folder = tmp_path / "hubish"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["h1", "h2"]}), folder / "train.parquet")
    assert docs(path=str(folder), kind="hub", split="train") == ["h1", "h2"]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(
        {"content": ["s1", "s2"]})}).save_to_disk(str(saved))
    assert resolve_kind(SourceConfig(path=str(saved))) == "hub"
    assert docs(path=str(saved), split="validation", text_field="content") == ["s1", "s2"]
    with pytest.raises(SourceError, match="split 'train' not in .*splits: validation"):
        docs(path=str(saved), text_field="content")
    with pytest.raises(SourceError, match=r"source 'owner/missing': could not load dataset "
                                          r"'owner/missing'.*offline mode"):
        docs(path="owner/missing")


def test_instruction_records_plain_and_chat_template(tmp_path):
    from wattkd.data.tokenizer import load_tokenizer

    (tmp_path / "i.jsonl").write_text(json.dumps({"q": "Who?", "a": "Me."}) + "\n")
    plain = docs(path=str(tmp_path / "i.jsonl"), prompt_field="q", response_field="a")
    assert plain == [Instruction("Who?\n", "Me.")]
    tok = load_tokenizer("bundled:bpe-4096")
    src = SourceConfig(path=str(tmp_path / "i.jsonl"), prompt_field="q", response_field="a",
                       chat_template=True)
    assert list(iter_documents(src, tok)) == [
        Instruction("<|user|>\nWho?<|end|>\n<|assistant|>\n", "Me.<|end|>\n")]
    tok.chat_template = None
    with pytest.raises(SourceError, match="chat_template is true but tokenizer .* has no chat"):
        list(iter_documents(src, tok))


@pytest.mark.parametrize("kw, match", [
    ({"path": "{d}/nope.jsonl"}, "source '.*nope.jsonl': path .* does not exist"),
    ({"path": "{d}/*.parquet", "name": "g"}, "source 'g': glob .* matches no file"),
    ({"path": "{d}/x.jsonl", "name": "s", "text_field": "body"},
     "source 's': .*x.jsonl line 1 has no field 'body' \\(fields: text\\)"),
    ({"path": "{d}/x.jsonl", "name": "s", "prompt_field": "q", "response_field": "text"},
     "source 's': .*line 1 has no field 'q'"),
    ({"path": "{d}/n.jsonl", "name": "n"}, "source 'n': .*line 1 field 'text' is a int"),
    ({"path": "{d}/bad.jsonl", "name": "b"}, "source 'b': .*bad.jsonl line 2 is not valid JSON"),
    ({"path": "{d}/x.csv", "name": "c"}, "source 'c': cannot tell the kind"),
    ({"path": "{d}/x.jsonl", "name": "e", "chat_template": True}, "chat_template needs"),
    ({"path": "{d}/empty.jsonl", "name": "z"}, "source 'z': no documents"),
])
def test_bad_sources_raise_one_clear_error(tmp_path, kw, match):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n')
    (tmp_path / "n.jsonl").write_text('{"text": 5}\n')
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    (tmp_path / "x.csv").write_text("text\nok\n")
    (tmp_path / "empty.jsonl").write_text("")
    kw = {k: v.format(d=tmp_path) if isinstance(v, str) else v for k, v in kw.items()}
    with pytest.raises(SourceError, match=match):
        check_source(SourceConfig(**kw))
        docs(**kw)


def test_fingerprint_follows_content_not_location(tmp_path):
    for sub in ("one", "two"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "d.jsonl").write_text('{"text": "same"}\n')
    fp = [source_fingerprint(SourceConfig(path=str(tmp_path / s / "d.jsonl")))
          for s in ("one", "two")]
    assert fp[0] == fp[1]
    (tmp_path / "two" / "d.jsonl").write_text('{"text": "changed"}\n')
    assert source_fingerprint(SourceConfig(path=str(tmp_path / "two" / "d.jsonl"))) != fp[0]
