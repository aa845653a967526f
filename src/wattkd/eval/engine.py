"""The decoding engine EPT measures, and its settings as part of the EPT protocol.

EPT should measure the model, not the Python loop around it: HF `generate` with a dynamic
KV cache spends ~20 ms of host time per decoding step whatever the model size, so a small
model's EPT is mostly idle power. The default engine on CUDA is therefore the fastest path
transformers itself provides: a static KV cache with compiled decoding (torch.compile,
`reduce-overhead` = CUDA graphs), via `GenerationConfig(cache_implementation="static",
compile_config=...)`. The dynamic-cache eager path stays as `eval.ept.engine: dynamic`; on
CPU (the demo) it is the default. Every setting that changes the figure (cache kind,
compile mode/backend, dtype, attention implementation, torch/transformers versions) goes into
`protocol.engine`, so a student measured with another engine is refused against its teacher.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import transformers
from transformers import CompileConfig, GenerationConfig

from wattkd.config import EptConfig
from wattkd.errors import InputError


class EngineError(InputError, ValueError):
    """An engine setting that cannot run here."""


@dataclass(frozen=True)
class Engine:
    name: str                       # static-compiled | static-eager | dynamic-eager
    cache: str                      # static | dynamic
    compile: bool
    compile_mode: str | None
    compile_backend: str | None
    device_type: str                # cuda | cpu | ...

    def record(self, *, dtype: str, attn_implementation: str) -> dict[str, Any]:
        """The engine's part of the EPT protocol (everything that changes the figure)."""
        return {**asdict(self), "dtype": dtype, "attn_implementation": attn_implementation,
                "torch": torch.__version__, "transformers": transformers.__version__}


def resolve_engine(cfg: EptConfig, device_type: str) -> Engine:
    """`auto` = static + compiled on CUDA, dynamic eager elsewhere; explicit settings win."""
    cache = cfg.engine if cfg.engine != "auto" else ("static" if device_type == "cuda"
                                                       else "dynamic")
    compile_ = cfg.compile if cfg.compile is not None else (cache == "static"
                                                          and device_type == "cuda")
    if compile_ and cache == "dynamic":
        raise EngineError("eval.ept.compile: true needs eval.ept.engine: static (transformers "
                          "compiles decoding only with a static KV cache)")
    name = f"{cache}-{'compiled' if compile_ else 'eager'}"
    return Engine(name, cache, compile_, cfg.compile_mode if compile_ else None,
                  cfg.compile_backend if compile_ else None, device_type)


def set_attention(net: Any, attn_implementation: str | None) -> str:
    """Switch the model's attention implementation if one is configured; return the one used."""
    if attn_implementation:
        try:
            net.set_attn_implementation(attn_implementation)
        except (ValueError, ImportError, AttributeError) as exc:
            raise EngineError(f"eval.ept.attn_implementation {attn_implementation!r} is not "
                              f"available for this model: {exc}") from None
    return str(getattr(net.config, "_attn_implementation", None) or "default")


def generation_config(engine: Engine, *, new_tokens: int, pad_id: int,
                      eos_id: int | None) -> Any:
    """Greedy decoding of exactly `new_tokens` tokens (EOS suppressed until then) on `engine`."""
    kw: dict[str, Any] = {"do_sample": False, "max_new_tokens": new_tokens,
                          "min_new_tokens": new_tokens, "pad_token_id": pad_id,
                          "eos_token_id": eos_id, "num_beams": 1}
    if engine.cache == "static":
        kw["cache_implementation"] = "static"
        if engine.compile:
            cc = CompileConfig(mode=engine.compile_mode, backend=engine.compile_backend)
            if engine.device_type != "cuda":
                cc._compile_all_devices = True  # transformers compiles on CUDA only otherwise
            kw["compile_config"] = cc
        else:
            kw["disable_compile"] = True
    return GenerationConfig(**kw)
