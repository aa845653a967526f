"""The benchmark pair of ../shared/DESIGN.md, shared by the GPU benchmarks.

Gemma 3 270M's architecture (vocab 262,144: logits dominate) and the 6-layer student copied
from its layers. Random init: speed does not depend on weight values.
"""

GEMMA_270M = {"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640,
              "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
              "num_key_value_heads": 1, "head_dim": 256, "max_position_embeddings": 32768,
              "sliding_window": 512, "query_pre_attn_scalar": 256, "rope_theta": 1e6,
              "tie_word_embeddings": True}
STUDENT_LAYERS = [0, 3, 6, 9, 12, 17]
