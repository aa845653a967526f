"""Teacher and student models: load, build from a config, init from teacher layers, LoRA.

Everything is a plain Hugging Face `AutoModelForCausalLM`, so what wattkd trains is what
`from_pretrained` loads back. Vocabulary mismatches are refused before any training starts.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from wattkd.config import LoraConfig, StudentConfig, TeacherConfig
from wattkd.errors import ConfigError, ModelFault

log = logging.getLogger(__name__)

# Per-layer lists in configs that must follow a layer selection (Gemma 3, Qwen 2, ...).
_PER_LAYER_CONFIG_KEYS = ("layer_types",)
_LAYER_KEY = re.compile(r"^(?P<prefix>.*\.layers\.)(?P<idx>\d+)(?P<rest>\..*)$")


class ModelError(ModelFault, ValueError):
    """A model cannot be used as configured (missing layer, vocab mismatch, ...)."""


def resolve_device(spec: str = "auto") -> torch.device:
    """train.device as a torch device; a device this machine does not have is refused (a
    `cuda` that quietly became the CPU would train, and meter, the wrong hardware)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"train.device: {spec!r} is not a device; expected auto, cpu, cuda "
                          "or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"train.device is {spec!r} but there is no CUDA device here "
                              f"({_no_cuda_reason()}); set train.device: auto (a GPU when "
                              "there is one) or cpu, or run on a machine with a GPU")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"train.device is {spec!r} but this machine has {count} CUDA "
                              f"device(s) (cuda:0..cuda:{count - 1})")
    return device


def _no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch {torch.__version__} is built without CUDA"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return f"torch {torch.__version__} sees none; CUDA_VISIBLE_DEVICES={visible!r}"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no GPU or driver"


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """`auto` = bf16 on a CUDA device that supports it, fp32 elsewhere."""
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]


def build_from_config(kwargs: dict[str, Any], vocab_size: int, seed: int) -> PreTrainedModel:
    """Random-init causal LM from HF config kwargs (`model_type` required), seeded."""
    kwargs = dict(kwargs)
    model_type = kwargs.pop("model_type", None)
    if model_type is None:
        raise ModelError("a model built from config needs `model_type` (e.g. llama, gemma3_text)")
    kwargs.setdefault("vocab_size", vocab_size)
    try:
        config = AutoConfig.for_model(model_type, **kwargs)
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelError(f"cannot build a {model_type!r} config from {kwargs}: {exc}") from None
    with _seeded(seed):
        model = AutoModelForCausalLM.from_config(config)
    return model


def load_pretrained(path: str, *, dtype: torch.dtype, revision: str | None = None,
                    device_map: str | None = None,
                    trust_remote_code: bool = False) -> PreTrainedModel:
    """Load an HF causal LM folder or hub id (adapter folders are merged onto their base)."""
    p = Path(path)
    if p.exists() and not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
        raise ModelError(f"{p} is not a Hugging Face model folder (no config.json)")
    if p.is_dir():
        check_weight_files(p, str(p))
    if (p / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM  # lazy: slow import, LoRA only

        model = AutoPeftModelForCausalLM.from_pretrained(str(p), dtype=dtype,
                                                         trust_remote_code=trust_remote_code)
        return model.merge_and_unload()
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    if device_map:
        kwargs["device_map"] = device_map
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def load_teacher(cfg: TeacherConfig, *, device: torch.device, vocab_size: int, seed: int,
                 path_override: str | None = None,
                 compute_device: torch.device | None = None) -> PreTrainedModel:
    """Frozen teacher in its own dtype; `path_override` points at a teacher trained here.
    `compute_device`: where it will run when loaded elsewhere first (to be sharded): its
    `auto` dtype is that device's."""
    dtype = resolve_dtype(cfg.dtype, compute_device or device)
    if path_override is not None or cfg.model is not None:
        model = load_pretrained(path_override or cfg.model, dtype=dtype, revision=cfg.revision,
                                device_map=cfg.device_map,
                                trust_remote_code=cfg.trust_remote_code)
    else:
        model = build_from_config(cfg.build or {}, vocab_size, seed).to(dtype)
    if cfg.device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def student_frozen_dtype(cfg: StudentConfig, bf16: bool) -> torch.dtype:
    """Storage dtype of a LoRA student's frozen decoder Linear weights (`student.dtype`)."""
    if cfg.lora is None or cfg.dtype == "float32" or (cfg.dtype == "auto" and not bf16):
        return torch.float32
    if not bf16:
        raise ModelError("student.dtype: bfloat16 needs bf16 training (train.precision: bf16, "
                         "or auto on a bf16 GPU): without autocast an fp32 input cannot meet a "
                         "bf16 weight; use student.dtype: float32")
    return torch.bfloat16


def build_student(cfg: StudentConfig, *, teacher: PreTrainedModel | None, vocab_size: int,
                  seed: int, frozen_dtype: torch.dtype) -> PreTrainedModel:
    """Student in fp32 master weights (autocast supplies bf16 compute); LoRA applied last,
    then the frozen decoder Linear weights stored in `frozen_dtype`."""
    if cfg.model is not None:
        model = load_pretrained(cfg.model, dtype=torch.float32, revision=cfg.revision,
                                trust_remote_code=cfg.trust_remote_code)
    elif cfg.build is not None:
        model = build_from_config(cfg.build, vocab_size, seed)
    else:
        if teacher is None:
            raise ModelError("student.from_teacher_layers needs a teacher")
        model = init_from_teacher_layers(teacher, cfg.from_teacher_layers or [])
    model = model.float()
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora)
        store_frozen_linears(model, frozen_dtype)
    return model


def _frozen_linears(model: nn.Module) -> Iterator[nn.Linear]:
    """The decoder layers' Linear modules with no trainable parameter (a LoRA base)."""
    for module in decoder_layers(model).modules():
        if isinstance(module, nn.Linear) and not any(p.requires_grad
                                                     for p in module.parameters()):
            yield module


def frozen_linear_dtype(model: nn.Module) -> str | None:
    """Dtype the frozen decoder Linear weights are stored in (run.json), None if none is."""
    first = next(_frozen_linears(model), None)
    return None if first is None else str(first.weight.dtype).removeprefix("torch.")


def store_frozen_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Frozen Linear weights of the decoder layers in `dtype`; returns how many parameters.

    Under bf16 autocast every Linear rounds its fp32 weight to bf16 before the matmul, so a
    frozen weight stored already rounded gives the same results with 4 fewer bytes per
    parameter at peak: the fp32 weight and autocast's bf16 copy kept for the backward become
    one bf16 weight (measured in benchmarks/RESULTS.md). Embeddings, norms and the LM head
    keep fp32: their ops are not autocast. Trainable weights (adapters) stay fp32 masters."""
    count = 0
    for module in list(_frozen_linears(model)):
        module.to(dtype)
        count += sum(p.numel() for p in module.parameters())
    return count


def teacher_dims(cfg: TeacherConfig, path_override: str | None = None,
                 model: nn.Module | None = None) -> tuple[int, int]:
    """(layers, hidden size) of the teacher, from the model if loaded, else from its config
    alone (cached signals: the weights are never loaded)."""
    if model is not None:
        return num_layers(model), hidden_size(model)
    if path_override is not None or cfg.model is not None:
        config = AutoConfig.from_pretrained(path_override or cfg.model, revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
    else:
        kwargs = dict(cfg.build or {})
        config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    config = getattr(config, "text_config", config)
    return int(config.num_hidden_layers), int(config.hidden_size)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder block list of an HF causal LM (model.model.layers and friends)."""
    base = unwrap(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    for attr in ("layers", "h", "blocks"):
        layers = getattr(decoder, attr, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ModelError(f"cannot find the decoder layers of {type(base).__name__}")


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def hidden_size(model: nn.Module) -> int:
    return int(unwrap(model).config.hidden_size)


def init_from_teacher_layers(teacher: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """DistilBERT-style student: embeddings, chosen decoder layers, final norm and LM head."""
    n = num_layers(teacher)
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ModelError(f"student.from_teacher_layers {bad} out of range: the teacher has "
                         f"{n} layers (0..{n - 1})")
    if len(set(layers)) != len(layers) or layers != sorted(layers):
        raise ModelError(f"student.from_teacher_layers must be increasing and unique, got {layers}")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    for key in _PER_LAYER_CONFIG_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) == n:
            setattr(config, key, [value[i] for i in layers])
    student = AutoModelForCausalLM.from_config(config)
    source = teacher.state_dict()
    remap = {old: new for new, old in enumerate(layers)}
    target: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        m = _LAYER_KEY.match(key)
        if m is None:
            target[key] = tensor
        elif int(m["idx"]) in remap:
            target[f"{m['prefix']}{remap[int(m['idx'])]}{m['rest']}"] = tensor
    missing, unexpected = student.load_state_dict(target, strict=False)
    missing = [k for k in missing if not _is_tied_head(student, k)]
    if missing or unexpected:
        raise ModelError(f"copying teacher layers failed: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    student.tie_weights()
    return student


def _is_tied_head(model: PreTrainedModel, key: str) -> bool:
    return key.endswith("lm_head.weight") and bool(getattr(model.config, "tie_word_embeddings",
                                                           False))


def apply_lora(model: PreTrainedModel, cfg: LoraConfig) -> nn.Module:
    from peft import LoraConfig as PeftLoraConfig  # lazy: slow import, LoRA only
    from peft import get_peft_model  # lazy: slow import, LoRA only

    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


def unwrap(model: nn.Module) -> PreTrainedModel:
    """The HF model under peft / DDP / compile wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            break
    return model  # type: ignore[return-value]


def output_vocab(model: nn.Module) -> int:
    return int(unwrap(model).get_output_embeddings().weight.shape[0])


def check_vocab(teacher: nn.Module | None, student: nn.Module, tokenizer_size: int) -> int:
    """Return the vocabulary the logit losses compare over, or refuse a mismatch.

    Heads may be padded past the tokenizer (Qwen pads to a multiple of 128): such padding rows are
    never real tokens, so logits are compared over the first `tokenizer_size` entries.
    """
    s_vocab = output_vocab(student)
    if s_vocab < tokenizer_size:
        raise ModelError(f"student head has {s_vocab} outputs but the tokenizer has "
                         f"{tokenizer_size} tokens")
    if teacher is None:
        return tokenizer_size
    t_vocab = output_vocab(teacher)
    if t_vocab < tokenizer_size:
        raise ModelError(f"teacher head has {t_vocab} outputs but the tokenizer has "
                         f"{tokenizer_size} tokens")
    if t_vocab != s_vocab:
        log.info("teacher vocab %d and student vocab %d differ only in padding past the "
                 "tokenizer's %d tokens; comparing logits over %d", t_vocab, s_vocab,
                 tokenizer_size, tokenizer_size)
    return tokenizer_size


def check_tokenizer_match(folder: str | None, tokenizer: Any, role: str = "teacher") -> None:
    """A model folder (teacher or student) with its own tokenizer must map tokens to the same
    ids as the data tokenizer: otherwise every id in the shards means another token to it."""
    if folder is None or not (Path(folder).expanduser() / "tokenizer.json").exists():
        return

    theirs = AutoTokenizer.from_pretrained(str(Path(folder).expanduser()))
    mine, their_ids = tokenizer.get_vocab(), theirs.get_vocab()
    if their_ids != mine:
        differ = [t for t, i in their_ids.items() if mine.get(t) != i]
        first = min(differ, key=their_ids.__getitem__, default=None)
        example = "" if first is None else \
            f" (e.g. {first!r} is id {their_ids[first]} there, {mine.get(first)} in the shards)"
        raise ModelError(f"tokenizer mismatch: the {role} folder {folder} has a tokenizer of "
                         f"{len(theirs)} tokens that maps tokens to other ids than the one "
                         f"the shards were built with ({len(tokenizer)} tokens){example}; "
                         f"rebuild the shards with the {role}'s tokenizer (data.tokenizer) or "
                         f"use a {role} trained with that vocabulary")


def check_weight_files(folder: Path, key: str) -> None:
    """Every *.safetensors file in `folder` is as long as its header says: a copy or download
    cut short is named here, not as a SafetensorError from deep inside the load."""
    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n)) if 8 <= size and 0 < n <= size - 8 else None
        except (OSError, ValueError, UnicodeDecodeError):
            header = None
        if not isinstance(header, dict):
            raise ModelError(f"{key}: {f} is not a readable safetensors file (its header is "
                             f"cut or damaged, {size:,} bytes); copy or download the model "
                             "again")
        ends = [int(v["data_offsets"][1]) for k, v in header.items()
                if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
        expected = 8 + n + max(ends, default=0)
        if size != expected:
            state = "cut short" if size < expected else "longer than its header says"
            raise ModelError(f"{key}: {f} is {state}: {size:,} bytes, its header describes "
                             f"{expected:,}; the copy or download was interrupted or the file "
                             "was altered: copy or download the model again")


def parameter_count(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


class _seeded:
    """Fork the torch RNG so model init is reproducible and leaves global state untouched."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        self._fork.__exit__(*exc)
