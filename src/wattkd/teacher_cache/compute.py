"""The teacher's side of a cache build: one forward, then top-k / hidden / pooled per batch.

Logits are formed exactly as the online path forms them (`fused.TeacherHidden.take`): the
final hidden state in the head's dtype through the head rows of the compared vocabulary,
upcast to fp32, soft-capped where the model does, normalised over that vocabulary. They are
formed in chunks of tokens, so a 262k vocabulary never needs [tokens x vocab] at once.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from wattkd.distill.losses import TopKTeacher
from wattkd.distill.signals import SIGNALS, SignalRequest, TeacherSignals, pool
from wattkd.distill.teacher import decoder_forward, logit_softcap
from wattkd.models import unwrap

__all__ = ["hidden_positions", "teacher_batch", "topk_logprobs"]


def hidden_positions(seq_len: int, stride: int) -> torch.Tensor:
    """Positions whose hidden states are stored: 0, stride, 2*stride, ..."""
    return torch.arange(0, seq_len, stride)


@torch.no_grad()
def topk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  softcap: float | None, k: int, chunk_tokens: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, H] final hidden states -> (ids [N,K], log-probs [N,K], tail log-mass [N]).

    The tail is a logsumexp over the entries outside the top-k (not log(1 - sum)), so it stays
    accurate when it is tiny; it is -inf when K equals the vocabulary.
    """
    n = hidden.shape[0]
    ids = torch.empty(n, k, dtype=torch.long, device=hidden.device)
    lps = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
    tail = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for s in range(0, n, chunk_tokens):
        e = min(s + chunk_tokens, n)
        h = hidden[s:e].to(weight.device, weight.dtype)
        z = F.linear(h, weight, bias).float()
        if softcap:
            z = torch.tanh(z / softcap) * softcap
        # log-probs are z - logsumexp(z): three passes over the chunk's logits (logsumexp, topk,
        # logsumexp of the rest) and no [chunk x vocab] log-softmax copy.
        lse = torch.logsumexp(z, dim=-1)
        val, idx = z.topk(k, dim=-1)
        z.scatter_(-1, idx, float("-inf"))
        ids[s:e] = idx.to(ids.device)
        lps[s:e] = (val - lse[:, None]).to(lps.device)
        tail[s:e] = (torch.logsumexp(z, dim=-1) - lse).to(tail.device)
        del z
    return ids, lps, tail


@torch.no_grad()
def teacher_batch(model: nn.Module, input_ids: torch.Tensor, spec: SignalRequest, vocab: int,
                  chunk_tokens: int, hidden_dtype: torch.dtype | None) -> TeacherSignals:
    """Run the teacher once on [B, L] ids and compute every signal `spec` asks for, as the
    cache stores them (still on the teacher's device): top-k ids int64 with fp32 log-probs,
    hidden states strided and in `hidden_dtype`, pooled fp32, registered kinds in 16 bits."""
    want_hidden = bool(spec.hidden_layers)
    with contextlib.ExitStack() as stack:
        captured = {name: stack.enter_context(SIGNALS[name].capture(model, params))
                    for name, params in spec.extra}
        last, all_hidden = decoder_forward(model, input_ids, want_hidden)
    out = TeacherSignals(hidden_stride=spec.hidden_stride)
    b, seq = input_ids.shape
    if spec.topk is not None:
        head = unwrap(model).get_output_embeddings()
        weight = head.weight[:vocab]
        bias = getattr(head, "bias", None)
        bias = None if bias is None else bias[:vocab]
        ids, lps, tail = topk_logprobs(last.reshape(b * seq, -1), weight, bias,
                                       logit_softcap(model), spec.topk, chunk_tokens)
        out.topk = TopKTeacher(ids.view(b, seq, -1), lps.view(b, seq, -1), tail.view(b, seq))
    if want_hidden:
        assert all_hidden is not None and hidden_dtype is not None
        pos = hidden_positions(seq, spec.hidden_stride)
        for i in spec.hidden_layers:
            h = all_hidden[i]
            h = h if spec.hidden_stride == 1 else h[:, pos.to(h.device)]
            out.hidden[i] = _narrow(h, hidden_dtype, i)
    for how in spec.pooled:
        out.pooled[how] = pool(last, how)
    for name, params in spec.extra:
        kind = SIGNALS[name]
        assert hidden_dtype is not None
        columns = kind.to_columns(kind.online(captured[name], params), params)
        out.extra[name] = kind.from_columns(
            {col: _narrow(t, hidden_dtype, col) for col, t in columns.items()}, params)
    return out


def _narrow(h: torch.Tensor, dtype: torch.dtype, layer: int | str) -> torch.Tensor:
    """Hidden states to the cache dtype; an fp16 overflow is an error, never a silent inf."""
    if dtype == torch.float16 and h.dtype != torch.float16:
        peak = float(h.detach().abs().max())
        if peak > torch.finfo(torch.float16).max:
            raise OverflowError(f"teacher hidden state {layer} reaches |x| = {peak:.4g}, beyond "
                                "float16's 65504: cache it as bf16 (--signals hidden:...:bf16)")
    return h.to(dtype)
