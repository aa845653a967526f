"""Tokenizers: any HF fast tokenizer by path or hub id, or a bundled byte-level BPE.

`bundled:bpe-<vocab>` trains a byte-level BPE on the bundled public-domain corpus with the
`tokenizers` library (fixed corpus order: the same vocab and merges every time, whatever
the thread count), and caches the HF folder under `$WATTKD_CACHE/tokenizers/<key>/` (default
`~/.cache/wattkd/tokenizers/<key>/`), written atomically. The key includes the corpus
fingerprint and the recipe version, so a changed corpus or recipe never reuses a stale file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from wattkd import corpus
from wattkd.atomic import atomic_dir

log = logging.getLogger(__name__)

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "bundled_tokenizer_dir",
    "cache_root",
    "load_tokenizer",
    "tokenizer_sha256",
]

BUNDLED = re.compile(r"^bundled:bpe-(\d+)$")
RECIPE_VERSION = 1
# Order fixes the ids: <|pad|>=0, <|bos|>=1, <|eos|>=2, then the chat markers.
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|end|>"]
# A minimal role-tagged template: `<|user|>\n...<|end|>\n<|assistant|>\n...<|end|>\n`.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1
MAX_VOCAB = 1 << 20


def cache_root() -> Path:
    """`$WATTKD_CACHE` if set, else `~/.cache/wattkd`."""
    env = os.environ.get("WATTKD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "wattkd"


def _bundled_key(vocab: int) -> str:
    h = hashlib.sha256(json.dumps({
        "recipe": RECIPE_VERSION, "vocab": vocab, "corpus": corpus.fingerprint("all"),
        "specials": SPECIAL_TOKENS, "template": CHAT_TEMPLATE,
        "tokenizers": ".".join(tokenizers.__version__.split(".")[:2]),
    }, sort_keys=True).encode()).hexdigest()
    return f"bpe-{vocab}-{h[:16]}"


def bundled_tokenizer_dir(vocab: int) -> Path:
    """The cache folder of `bundled:bpe-<vocab>` (it may not exist yet)."""
    return cache_root() / "tokenizers" / _bundled_key(vocab)


def _train_bundled(vocab: int, out: Path) -> None:
    """Train the byte-level BPE and save it as an HF tokenizer folder in `out`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus.documents("all"), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        unk_token=None, additional_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=1 << 30)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def _load_bundled(vocab: int) -> Any:
    if not MIN_VOCAB <= vocab <= MAX_VOCAB:
        raise ValueError(f"tokenizer bundled:bpe-{vocab}: vocab must be in "
                         f"[{MIN_VOCAB}, {MAX_VOCAB}] (256 bytes + {len(SPECIAL_TOKENS)} "
                         "special tokens + merges)")
    final = bundled_tokenizer_dir(vocab)
    if not (final / "tokenizer.json").is_file():
        t0 = time.perf_counter()
        # Training is deterministic (checked with 1 and 2 threads: same tokenizer.json).
        try:
            with atomic_dir(final) as tmp:
                _train_bundled(vocab, tmp)
                if (final / "tokenizer.json").is_file():  # another process won the race
                    raise _AlreadyBuilt
        except _AlreadyBuilt:
            pass
        log.info("trained bundled:bpe-%d in %.1f s -> %s", vocab, time.perf_counter() - t0,
                 final)
    tok = AutoTokenizer.from_pretrained(str(final))
    tok.name_or_path = f"bundled:bpe-{vocab}"
    return tok


class _AlreadyBuilt(Exception):
    pass


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> Any:
    """Return a fast HF tokenizer for `spec` (`bundled:bpe-<vocab>`, a folder or a hub id).

    Raises ValueError naming `spec` when it cannot be loaded or is not a fast tokenizer (the
    shard builder relies on the Rust tokenizer for speed and for `tokenizer_sha256`).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"tokenizer spec must be a non-empty string, got {spec!r}")
    if spec.startswith("bundled:"):
        m = BUNDLED.match(spec)
        if not m:
            raise ValueError(f"tokenizer {spec!r}: bundled tokenizers are spelled "
                             "'bundled:bpe-<vocab>', e.g. 'bundled:bpe-4096'")
        return _load_bundled(int(m.group(1)))

    try:
        tok = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except Exception as exc:
        where = "local folder" if Path(spec).exists() else "hub id (offline mode: " \
            f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')})"
        raise ValueError(f"tokenizer {spec!r} could not be loaded as a {where}: "
                         f"{type(exc).__name__}: {exc}") from exc
    if not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
        raise ValueError(f"tokenizer {spec!r} is not a fast (Rust `tokenizers`) tokenizer; "
                         "wattkd needs one (convert it, or save a tokenizer.json beside it)")
    return tok


def tokenizer_sha256(tok: Any) -> str:
    """sha256 of the tokenizer.json serialization, with runtime padding/truncation cleared.

    transformers toggles padding/truncation on the Rust object when it is called with such
    arguments; they do not change which ids a text maps to, so they are left out of the hash.
    """
    backend = getattr(tok, "backend_tokenizer", tok)
    data = json.loads(backend.to_str())
    data["padding"] = None
    data["truncation"] = None
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
