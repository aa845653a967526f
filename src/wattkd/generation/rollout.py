"""`generate`: a batch of prompts -> a Rollout (the sequences and which tokens were generated)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from wattkd.generation.sampling import SamplingParams, sample_next

ENGINES = ("auto", "eager")


@dataclass
class Rollout:
    """sequences [B, P + N]: the (left-padded) prompts then N generated positions;
    attention_mask [B, P + N]: 1 on real tokens (prompt and generated, up to and including EOS);
    generated_mask [B, P + N]: 1 on generated tokens only (what on-policy losses score);
    prompt_len: P. `new_tokens` = generated_mask.sum() (tokens decoded that count)."""

    sequences: Tensor
    attention_mask: Tensor
    generated_mask: Tensor
    prompt_len: int

    @property
    def new_tokens(self) -> int:
        return int(self.generated_mask.sum())


@torch.no_grad()
def generate(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
             params: SamplingParams, *, generator: torch.Generator | None = None,
             engine: str = "auto") -> Rollout:
    """Decode `params.max_new_tokens` positions after each prompt of `input_ids` [B, P]
    (left-padded where `attention_mask` has zeros). `engine`: `eager` (any device) or `auto`
    (the fastest engine for the device)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown generation engine {engine!r}; known: {', '.join(ENGINES)}")
    return _eager(model, input_ids, attention_mask, params, generator)


def _eager(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
           params: SamplingParams, generator: torch.Generator | None) -> Rollout:
    """The reference loop: HF forward with its dynamic KV cache, one position at a time."""
    b, p = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    position_ids = (mask.cumsum(-1) - 1).clamp_(min=0)
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    out_tokens, out_live = [], []
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]
    pos = position_ids[:, -1:]
    for _ in range(params.max_new_tokens):
        nxt = sample_next(logits, params, generator)
        live = ~done
        nxt = torch.where(live, nxt, torch.full_like(nxt, params.pad_token_id))
        out_tokens.append(nxt)
        out_live.append(live)
        if not params.ignore_eos and params.eos_token_id is not None:
            done = done | (nxt == params.eos_token_id)
        if len(out_tokens) == params.max_new_tokens:
            break
        mask = torch.cat([mask, live.long()[:, None]], dim=-1)
        pos = pos + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    new = torch.stack(out_tokens, dim=1)
    live = torch.stack(out_live, dim=1).long()
    prompt_mask = (torch.ones_like(input_ids) if attention_mask is None
                   else attention_mask.long())
    return Rollout(sequences=torch.cat([input_ids, new], dim=1),
                   attention_mask=torch.cat([prompt_mask, live], dim=1),
                   generated_mask=torch.cat([torch.zeros_like(prompt_mask), live], dim=1),
                   prompt_len=p)
