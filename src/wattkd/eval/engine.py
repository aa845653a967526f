"""The decoding engine EPT measures, and its settings as part of the EPT protocol.

EPT should measure the model, not the Python loop around it: HF `generate` with a dynamic
KV cache spends ~20 ms of host time per decoding step whatever the model size, and even its
static-cache compiled path ~3.4 ms (host-bound: flat in batch, benchmarks/RESULTS.md), so a
small model's EPT is mostly idle power. The default engine on CUDA is therefore wattkd's own
`graph` engine (wattkd.generation: static KV cache, the decode step compiled and `steps` steps
captured as one CUDA graph, one host sync per replay). HF's engines stay as rows to compare:
`static` (GenerationConfig(cache_implementation="static", compile_config=...)) and `dynamic`
(eager; the default on CPU, the demo). Every setting that changes the figure (engine, cache
kind, compile mode/backend, dtype, attention implementation, torch/transformers versions)
goes into `protocol.engine`, so a student measured with another engine is refused against
its teacher.
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
    name: str                       # graph-compiled | static-compiled | static-eager | dynamic-eager
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
    """`auto` = the graph engine on CUDA, HF's dynamic eager loop elsewhere; explicit settings
    win."""
    kind = cfg.engine if cfg.engine != "auto" else ("graph" if device_type == "cuda"
                                                      else "dynamic")
    if kind == "graph" and device_type != "cuda":
        raise EngineError(f"eval.ept.engine: graph needs CUDA (CUDA graphs); this run is on "
                          f"{device_type}: use auto or dynamic")
    cache = "dynamic" if kind == "dynamic" else "static"
    compile_ = cfg.compile if cfg.compile is not None else (cache == "static"
                                                          and device_type == "cuda")
    if compile_ and cache == "dynamic":
        raise EngineError("eval.ept.compile: true needs eval.ept.engine: static (transformers "
                          "compiles decoding only with a static KV cache)")
    name = f"{kind}-{'compiled' if compile_ else 'eager'}"
    if kind == "graph":   # compiled without inductor's own graphs: the engine captures them
        return Engine(name, cache, compile_, "default" if compile_ else None,
                      "inductor" if compile_ else None, device_type)
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
