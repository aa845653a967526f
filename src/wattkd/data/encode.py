"""Batch tokenization for the shard builder, in a thread or in worker processes.

Kept apart from `shards.py` so a spawned worker imports only numpy and `tokenizers`
(~0.3 s instead of ~0.8 s with pydantic and pyarrow), which matters for small builds.
Documents get no special tokens from the tokenizer; EOS is appended to each one here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["TokBatch", "Tokenizers", "tokenize_job"]

_WORKER_TOK: Any = None


def _init_worker(tok_json: str) -> None:
    """Pool initializer: one single-threaded Rust tokenizer per worker process."""
    global _WORKER_TOK
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _WORKER_TOK = Tokenizer.from_str(tok_json)


@dataclass
class TokBatch:
    """Tokenized documents: flat `ids` (EOS after each document), `offs` (n+1 boundaries)."""

    ids: np.ndarray
    offs: np.ndarray
    mask: np.ndarray | None  # uint8 per token; None = all ones


def _encode(tok: Any, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, dtype=np.int32) for e in
            tok.encode_batch(texts, add_special_tokens=False)]


def tokenize_job(tok: Any, job: tuple[Any, ...], eos: int) -> TokBatch:
    kind = job[0]
    eos_arr = np.array([eos], dtype=np.int32)
    if kind == "text":
        docs = _encode(tok, job[1])
        pieces = [a for d in docs for a in (d, eos_arr)]
        lens = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
        mask = None
    else:
        prompts, responses = _encode(tok, job[1]), _encode(tok, job[2])
        pieces, masks, lens_l = [], [], []
        for p, r in zip(prompts, responses, strict=True):
            pieces += [p, r, eos_arr]
            masks += [np.zeros(len(p), np.uint8), np.ones(len(r) + 1, np.uint8)]
            lens_l.append(len(p) + len(r) + 1)
        lens = np.asarray(lens_l, dtype=np.int64)
        mask = np.concatenate(masks) if masks else np.zeros(0, np.uint8)
    offs = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offs[1:])
    ids = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    return TokBatch(ids, offs, mask)


def _worker_job(job: tuple[Any, ...], eos: int) -> TokBatch:
    return tokenize_job(_WORKER_TOK, job, eos)


class _Pending:
    def __init__(self, async_result: Any) -> None:
        self._r = async_result

    def result(self) -> TokBatch:
        return self._r.get()


class Tokenizers:
    """Where batches are tokenized: a background thread (num_workers=1; the Rust tokenizer
    releases the GIL and uses its own threads, so reading and packing overlap with it) or a
    pool of spawned processes with one single-threaded tokenizer each. `submit(job)` returns
    an object whose `result()` is the TokBatch; callers consume results in submission order.
    """

    def __init__(self, tok_json: str, eos: int, num_workers: int) -> None:
        self.eos = eos
        self.workers = num_workers
        self._pool: Any = None
        self._thread: Any = None
        if num_workers > 1:
            import multiprocessing as mp

            self._pool = mp.get_context("spawn").Pool(num_workers, initializer=_init_worker,
                                                      initargs=(tok_json,))
        else:
            from concurrent.futures import ThreadPoolExecutor

            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_str(tok_json)
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="wattkd-tokenize")

    def submit(self, job: tuple[Any, ...]) -> Any:
        if self._pool is not None:
            return _Pending(self._pool.apply_async(_worker_job, (job, self.eos)))
        return self._thread.submit(tokenize_job, self._tok, job, self.eos)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
        if self._thread is not None:
            self._thread.shutdown(wait=True, cancel_futures=True)
