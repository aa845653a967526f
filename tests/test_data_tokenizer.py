"""Tokenizers: the bundled byte-level BPE (trained, cached, deterministic) and HF folders."""

from __future__ import annotations

import json
import os

import pytest

from wattkd.data.tokenizer import (
    SPECIAL_TOKENS,
    bundled_tokenizer_dir,
    load_tokenizer,
    tokenizer_sha256,
)


@pytest.fixture(scope="module", autouse=True)
def wattkd_cache(tmp_path_factory):
    """One tokenizer cache for the session (shared by the data tests), never ~/.cache."""
    path = tmp_path_factory.getbasetemp() / "wattkd-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WATTKD_CACHE", str(path))
        yield path


def test_bundled_bpe_4096_tokens_chat_template_and_cache(wattkd_cache):
    tok = load_tokenizer("bundled:bpe-4096")
    assert len(tok) == 4096 and tok.is_fast
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == SPECIAL_TOKENS
    text = "In the beginning God created the heaven and the earth."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text) / 2  # real merges, lossless
    chat = tok.apply_chat_template([{"role": "user", "content": "Who?"},
                                    {"role": "assistant", "content": "Me."}], tokenize=False)
    assert chat == "<|user|>\nWho?<|end|>\n<|assistant|>\nMe.<|end|>\n"
    assert tok.convert_tokens_to_ids("<|assistant|>") in tok(chat)["input_ids"]
    folder = bundled_tokenizer_dir(4096)
    assert folder.parent == wattkd_cache / "tokenizers" and (folder / "tokenizer.json").is_file()
    mtime = (folder / "tokenizer.json").stat().st_mtime_ns
    again = load_tokenizer("bundled:bpe-4096")  # cached: not retrained
    assert (folder / "tokenizer.json").stat().st_mtime_ns == mtime
    assert tokenizer_sha256(again) == tokenizer_sha256(tok)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_bundled_training_is_deterministic(tmp_path, monkeypatch, wattkd_cache):
    session = load_tokenizer("bundled:bpe-4096")  # trained (or cached) in the session cache
    monkeypatch.setenv("WATTKD_CACHE", str(tmp_path))
    fresh = load_tokenizer("bundled:bpe-4096")  # trained again from scratch
    assert bundled_tokenizer_dir(4096).parent.parent == tmp_path
    assert session.backend_tokenizer.to_str() == fresh.backend_tokenizer.to_str()


def test_sha256_ignores_runtime_padding_and_matches_saved_folder(tmp_path):
    tok = load_tokenizer("bundled:bpe-4096")
    sha = tokenizer_sha256(tok)
    tok(["a", "a b c"], padding=True, truncation=True, max_length=2)  # toggles backend state
    assert tokenizer_sha256(tok) == sha
    tok.save_pretrained(tmp_path / "hf")
    from_path = load_tokenizer(str(tmp_path / "hf"))
    assert tokenizer_sha256(from_path) == sha and from_path.eos_token_id == 2
    data = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    data["model"]["merges"] = data["model"]["merges"][:-1]  # a different tokenizer
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(data))
    assert tokenizer_sha256(load_tokenizer(str(tmp_path / "hf"))) != sha


@pytest.mark.parametrize("spec, match", [
    ("bundled:bpe", "spelled 'bundled:bpe-<vocab>'"),
    ("bundled:wordpiece-4096", "spelled 'bundled:bpe-<vocab>'"),
    ("bundled:bpe-100", r"vocab must be in \[264, "),
    ("", "non-empty"),
])
def test_bad_bundled_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        load_tokenizer(spec)


def test_missing_tokenizer_names_spec(tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(ValueError, match="'no-such-org/no-such-tok' could not be loaded"):
        load_tokenizer("no-such-org/no-such-tok")
    with pytest.raises(ValueError, match="local folder"):
        load_tokenizer(str(tmp_path))
