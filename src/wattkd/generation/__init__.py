"""Token generation for inference EPT and on-policy rollouts: one call, several engines.

`generate(model, input_ids, attention_mask, params)` decodes a batch and returns a `Rollout`.
Engines: `eager` (a plain loop over HF's dynamic KV cache, any device: the CPU path and the
reference every faster engine must match token for token under greedy decoding) and, on CUDA,
the graph-captured static-cache engine (`graph`), whose forward is wattkd's own fused decode
model (decode_model.py) where it serves the architecture, else HF's. Sampling is seeded
through a torch.Generator so a resumed run draws the same tokens.
"""

from wattkd.generation.rollout import Rollout, generate
from wattkd.generation.sampling import SamplingParams, sample_next

__all__ = ["Rollout", "SamplingParams", "generate", "sample_next"]
