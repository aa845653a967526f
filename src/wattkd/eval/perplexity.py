"""Held-out perplexity on token shards: the cheapest quality signal, and one that still moves
for models far too small to score above chance on MMLU.

Every model reads the same tokens: the shard set in file order (no shuffle), cut at exactly
`max_tokens` predicted tokens. Perplexity = exp(mean NLL over predicted tokens), where a
predicted token is position t >= 1 of a row whose loss_mask is 1 (the prompt part of
instruction data is not scored, matching training).
"""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from wattkd.config import EvalConfig
from wattkd.data.loader import ShardDataset
from wattkd.data.manifest import manifest_sha256, read_manifest
from wattkd.errors import DataError
from wattkd.eval.harness import load_model
from wattkd.eval.protocol import PROTOCOL_FORMAT, protocol_hash, write_json_atomic

log = logging.getLogger(__name__)

PERPLEXITY_SCHEMA = "wattkd.perplexity/1"


class PerplexityError(DataError, ValueError):
    """Shards that cannot be scored by this model (empty, vocabulary mismatch)."""


def _output_vocab(model: Any) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model: Any, shards_path: Path, *, max_tokens: int, batch_size: int,
               device: str | torch.device | None = None) -> dict[str, Any]:
    """{"perplexity", "nll", "tokens", "sequences", "vocab", "per_sequence"} of `model` on the
    first `max_tokens` predicted tokens of a shard set (`vocab`: its output vocabulary, for
    report.metrics.worse_than_uniform) (`per_sequence`: each scored row's summed
    NLL and token count, in shard order, for paired comparisons between models).

    Leaves the model in the train/eval mode it came in (the training loop calls this every
    N steps). `device` None or "auto" means the model's own device.
    """
    if max_tokens <= 0 or batch_size <= 0:
        raise PerplexityError(f"max_tokens and batch_size must be > 0 (got {max_tokens}, "
                              f"{batch_size})")
    dev = _model_device(model) if device in (None, "auto") else torch.device(device)
    vocab = _output_vocab(model)
    ds = ShardDataset(shards_path, shuffle=False)
    was_training = model.training
    model.eval()
    nll_sum = 0.0  # python float: float64 accumulation
    counted = 0
    sequences = 0
    per_seq_nll: list[float] = []   # summed NLL of each scored row, in shard order
    per_seq_tokens: list[int] = []
    batch_ids: list[torch.Tensor] = []
    batch_mask: list[torch.Tensor] = []

    def flush() -> None:
        nonlocal nll_sum, counted
        ids = torch.stack(batch_ids).to(dev)
        mask = torch.stack(batch_mask).to(dev)
        logits = model(input_ids=ids, use_cache=False).logits
        for i in range(ids.shape[0]):  # one row at a time: fp32 logits of one row only
            keep = mask[i, 1:].bool()
            if not keep.any():
                continue
            nll = F.cross_entropy(logits[i, :-1][keep].float(), ids[i, 1:][keep],
                                  reduction="sum")
            nll_sum += float(nll)
            counted += int(keep.sum())
            per_seq_nll.append(round(float(nll), 6))
            per_seq_tokens.append(int(keep.sum()))
        batch_ids.clear()
        batch_mask.clear()

    try:
        budget = max_tokens
        for sample in ds:
            if budget <= 0:
                break
            ids = sample["input_ids"]
            mask = sample.get("loss_mask")
            mask = torch.ones_like(ids) if mask is None else mask.clone()
            mask[0] = 0  # position 0 has no prediction
            if vocab is not None and int(ids.max()) >= vocab:
                raise PerplexityError(
                    f"shards {shards_path} hold token id {int(ids.max())} but the model's "
                    f"vocabulary has {vocab} entries: shards and model use different tokenizers")
            # cut the last row so exactly max_tokens targets are scored
            positions = mask.nonzero().flatten()
            if len(positions) > budget:
                mask[positions[budget]:] = 0
            budget -= int(mask.sum())
            batch_ids.append(ids)
            batch_mask.append(mask)
            sequences += 1
            if len(batch_ids) == batch_size:
                flush()
        if batch_ids:
            flush()
    finally:
        model.train(was_training)
    if counted == 0:
        raise PerplexityError(f"shards {shards_path} have no scorable tokens")
    nll = nll_sum / counted
    if counted < max_tokens:
        log.warning("perplexity: shards %s hold only %d scorable tokens (< max_tokens %d)",
                    shards_path, counted, max_tokens)
    return {"perplexity": math.exp(nll) if nll < 700 else math.inf, "nll": nll,
            "tokens": counted, "sequences": sequences, "vocab": vocab,
            # paired statistics across models (report/stats.py): same rows, same order
            "per_sequence": {"nll_sum": per_seq_nll, "tokens": per_seq_tokens}}


def run_perplexity(model: str, shards_path: Path, cfg: EvalConfig, out_path: Path, *,
                   device: str = "auto", adapter: str | None = None,
                   batch_size: int | None = None) -> dict[str, Any]:
    """Load a model folder, score `cfg.perplexity_tokens` held-out tokens, write
    eval/perplexity.json (`out_path`: the file, or a run directory)."""
    shards = Path(shards_path)
    manifest = read_manifest(shards)  # clear error when the folder is not a shard set
    net, _tok = load_model(model, adapter=adapter, device=device)
    t0 = time.perf_counter()
    res = perplexity(net, shards, max_tokens=cfg.perplexity_tokens,
                     batch_size=batch_size or cfg.batch_size, device=device)
    protocol = {
        "format": PROTOCOL_FORMAT,
        "kind": "perplexity",
        "shards_manifest_sha256": manifest_sha256(shards),
        "seq_len": manifest.get("seq_len"),
        "tokenizer_sha256": (manifest.get("tokenizer") or {}).get("sha256"),
        "max_tokens": cfg.perplexity_tokens,
    }
    result = {
        "schema": PERPLEXITY_SCHEMA,
        "model": {"id": model, "adapter": adapter,
                  "dtype": str(next(net.parameters()).dtype).removeprefix("torch."),
                  "device": str(_model_device(net))},
        "shards": str(shards),
        "protocol": protocol,
        "protocol_hash": protocol_hash(protocol),
        **res,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t0, 3),
    }
    p = Path(out_path)
    target = p if p.suffix == ".json" else p / "eval" / "perplexity.json"
    write_json_atomic(target, result)
    log.info("perplexity %.4g over %d tokens -> %s", res["perplexity"], res["tokens"], target)
    return result


def in_loop_record(model: Any, shards_path: Path, *, step: int, max_tokens: int,
                   batch_size: int, meter: Any = None) -> dict[str, Any]:
    """One in-loop evaluation line for metrics.jsonl: held-out perplexity at `step`, with the
    energy metered so far (`meter.energy_j()`, None when nothing is metered)."""
    t0 = time.perf_counter()
    res = perplexity(model, shards_path, max_tokens=max_tokens, batch_size=batch_size)
    energy = meter.energy_j() if meter is not None and hasattr(meter, "energy_j") else None
    return {"step": step, "heldout_perplexity": res["perplexity"], "heldout_nll": res["nll"],
            "heldout_tokens": res["tokens"], "energy_j": energy,
            "eval_s": round(time.perf_counter() - t0, 3)}
