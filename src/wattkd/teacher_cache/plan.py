"""What a cache build will do, checked before any weights are loaded.

`plan_cache(cfg, signals)` validates the shards (present, sizes, tokenizer hash against
data.tokenizer), the signals against the teacher's config (layer indices, k <= vocabulary),
identifies the teacher (manifest.teacher_fingerprint) and fixes the cache layout: columns,
dtypes, row-group size. Its `identity` is what must match to reuse or resume a cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig

from wattkd.config import ExperimentConfig
from wattkd.distill.signals import SIGNALS, CacheContext, SignalRequest
from wattkd.hashing import file_sha256
from wattkd.jobs import teacher_path
from wattkd.models import check_tokenizer_match, resolve_device, resolve_dtype
from wattkd.preflight import check_stage_inputs, check_vocab_sizes, model_config
from wattkd.teacher_cache.manifest import CacheError, teacher_fingerprint
from wattkd.teacher_cache.spec import resolve_spec

__all__ = ["MAX_ROW_GROUP_ROWS", "ROW_GROUP_BYTES", "CachePlan", "plan_cache"]

ROW_GROUP_BYTES = 1 << 20     # target encoded bytes per row group: cheap random reads
MAX_ROW_GROUP_ROWS = 1024


class CachePlan:
    """Everything a build needs, checked before the teacher is loaded."""

    def __init__(self, cfg: ExperimentConfig, signals: str | None, encoding: str | None,
                 batch_size: int | None) -> None:

        self.cfg = cfg
        self.teacher_path = teacher_path(cfg)
        inputs = check_stage_inputs(cfg, self.teacher_path, uses_teacher=True)
        self.shards, self.shard_manifest = inputs.path, inputs.manifest
        self.shards_sha = file_sha256(self.shards / "manifest.json")
        spec = resolve_spec(cfg, signals, encoding)
        self.tokenizer, tok_sha = inputs.tokenizer, inputs.tokenizer_sha256
        self.vocab = len(self.tokenizer)
        if self.teacher_path is not None:  # a missing folder, or config.json vs weights
            model_config(self.teacher_path, "teacher.model", cfg.teacher.revision,
                         cfg.teacher.trust_remote_code)
        check_tokenizer_match(self.teacher_path, self.tokenizer)
        self.teacher_config = _teacher_config(cfg, self.teacher_path, self.vocab)
        check_vocab_sizes(cfg, self.teacher_config, self.teacher_path, self.vocab)
        self.device = resolve_device(cfg.train.device)
        self.dtype = resolve_dtype(cfg.teacher.dtype, self.device)
        self.dtype_name = str(self.dtype).replace("torch.", "")
        hidden_dtype = spec.hidden_dtype
        if hidden_dtype is None and any(k.uses_dtype16(p) for k, p in spec.kinds()):
            hidden_dtype = "bfloat16" if self.dtype == torch.bfloat16 else "float16"
        self.hidden_dtype = hidden_dtype
        # the 16-bit dtype is part of what is stored (and of the identity where it shows)
        self.spec: SignalRequest = dataclasses.replace(spec, hidden_dtype=hidden_dtype)
        self.fingerprint = teacher_fingerprint(cfg, self.teacher_path, self.vocab)
        self.seq_len = int(self.shard_manifest["seq_len"])
        self.context = CacheContext(encoding=self.spec.encoding, seq_len=self.seq_len,
                                    vocab=self.vocab, teacher_conf=self.teacher_config,
                                    dtype16=hidden_dtype,
                                    chunk_tokens=cfg.distill.logit_chunk_tokens)
        self._check_spec()
        self.batch_size = batch_size or cfg.train.micro_batch_size
        if self.batch_size < 1:
            raise CacheError(f"batch_size must be >= 1, got {self.batch_size}")
        self.identity = {"shards_sha256": self.shards_sha, "tokenizer_sha256": tok_sha,
                         "teacher_fingerprint": self.fingerprint["fingerprint"],
                         "teacher_dtype": self.dtype_name,
                         "signals": self.spec.canonical(), "encoding": self.spec.encoding}
        self.columns = self._columns()
        self.row_group_rows = max(1, min(MAX_ROW_GROUP_ROWS,
                                         ROW_GROUP_BYTES // max(self._row_bytes(), 1)))

    # ------------------------------------------------------------------ checks
    def _check_spec(self) -> None:
        for kind, params in self.spec.kinds():
            problem = kind.problem(params, self.context)
            if problem:
                raise CacheError(problem)

    # ------------------------------------------------------------------ layout
    def _columns(self) -> dict[str, dict[str, Any]]:
        cols: dict[str, dict[str, Any]] = {}
        for kind, params in self.spec.kinds():
            cols.update(kind.columns(params, self.context))
        return cols

    def bytes_per_token_by_signal(self) -> dict[str, float]:
        """Encoded bytes per token of each signal before zstd (the size estimate a build
        prints and checks against the disk): topk, hidden, pooled, meta (row, crcs)."""
        out: dict[str, float] = {}
        for name, c in self.columns.items():
            count = int(np.prod(c["shape"]))
            width = c.get("bytes") or {"int32": 4, "float32": 4, "float16": 2}.get(c["values"], 4)
            kind = name.split("_", 1)[0]
            out[kind] = out.get(kind, 0.0) + count * width / self.seq_len
        out["meta"] = (12 + 4 * len(self.columns)) / self.seq_len
        return out

    def _row_bytes(self) -> int:
        total = 0
        for c in self.columns.values():
            count = int(np.prod(c["shape"]))
            width = c.get("bytes") or {"int32": 4, "float32": 4, "float16": 2}.get(c["values"], 4)
            total += count * width
        return total + 12

    # ------------------------------------------------------------------ description
    def _signals_section(self) -> dict[str, Any]:
        """The manifest's `signals`: the built-in kinds' entries, registered kinds by name."""
        asked = {kind.name: params for kind, params in self.spec.kinds()}
        out: dict[str, Any] = {"spec": self.identity["signals"]}
        for kind in SIGNALS.values():
            if kind.builtin:
                out.update(kind.describe(asked.get(kind.name), self.context))
        extra = {k.name: k.canonical(p) for k, p in self.spec.kinds() if not k.builtin}
        return {**out, **({"extra": extra} if extra else {})}

    def describe(self) -> dict[str, Any]:
        tc = self.teacher_config
        spec = self.spec
        return {
            "shards": {"path": str(self.shards), "manifest_sha256": self.shards_sha,
                       "rows": self.shard_manifest["rows"], "seq_len": self.seq_len,
                       "parts": len(self.shard_manifest["parts"])},
            "tokenizer": {k: self.shard_manifest["tokenizer"].get(k)
                          for k in ("name", "sha256", "vocab_size")},
            "teacher": {**self.fingerprint, "dtype": self.dtype_name,
                        "num_layers": int(tc.num_hidden_layers),
                        "hidden_size": int(tc.hidden_size), "vocab": self.vocab,
                        "softcap": getattr(tc, "final_logit_softcapping", None)},
            "signals": self._signals_section(),
            "encoding": spec.encoding,
            "columns": self.columns,
        }


def plan_cache(cfg: ExperimentConfig, signals: str | None = None, *,
               encoding: str | None = None, batch_size: int | None = None) -> CachePlan:
    """Validate a build (shards, tokenizer, teacher config, signals) without loading weights."""
    return CachePlan(cfg, signals, encoding, batch_size)


def _teacher_config(cfg: ExperimentConfig, path: str | None, vocab: int) -> Any:
    t = cfg.teacher
    try:
        if path is None:
            kwargs = dict(t.build or {})
            model_type = kwargs.pop("model_type", None)
            if model_type is None:
                raise CacheError("teacher.build needs `model_type`")
            kwargs.setdefault("vocab_size", vocab)
            conf = AutoConfig.for_model(model_type, **kwargs)
        else:
            conf = AutoConfig.from_pretrained(path, revision=t.revision,
                                              trust_remote_code=t.trust_remote_code)
    except CacheError:
        raise
    except Exception as exc:
        raise CacheError(f"cannot read the teacher's config ({path or 'teacher.build'}): "
                         f"{type(exc).__name__}: {exc}") from exc
    return conf.get_text_config() if hasattr(conf, "get_text_config") else conf
