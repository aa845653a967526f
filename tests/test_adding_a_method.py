"""ARCHITECTURE.md "Adding a piece" holds for a method with an attention-type signal: this
module alone adds TinyBERT-style attention-map KD (a signal kind, a loss, a method), and the
real config loader, trainer (online teacher and teacher cache) and cache builder take it with
no other edit (issue 29). Everything registered here is removed after the module."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from wattkd.config import validate
from wattkd.data.shards import build_shards
from wattkd.distill import registry as loss_registry
from wattkd.distill.methods import registry as method_registry
from wattkd.distill.methods.registry import method_params, register_method
from wattkd.distill.objective import StepInputs, terms_of
from wattkd.distill.registry import register_loss
from wattkd.distill.signals import (
    SIGNALS,
    ArraySignalKind,
    SignalRequest,
    TeacherSignals,
    capture_attention_maps,
    register_signal,
)
from wattkd.models import decoder_layers, unwrap
from wattkd.teacher_cache import build_cache
from wattkd.train import train

SIGNAL, LOSS, METHOD = "test_attn_maps", "test_attention_map_kl", "test_tinybert"
MODEL = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 64}


def _column(layer: int) -> str:
    return f"attnmap_L{layer}"


class AttentionMaps(ArraySignalKind):
    """Attention probabilities [B, heads, L, L] of chosen teacher decoder layers."""

    name = SIGNAL
    grammar = f"{SIGNAL}:L[:L...]"

    def parse(self, args: list[str], item: str) -> tuple[int, ...]:
        if not args or not all(a.isdigit() for a in args):
            raise ValueError("name a decoder layer")
        return tuple(sorted({int(a) for a in args}))

    def canonical(self, params: tuple[int, ...]) -> str:
        return ":".join([SIGNAL, *map(str, params)])

    def merge(self, values: list[tuple[int, ...]]) -> tuple[int, ...]:
        return tuple(sorted({i for v in values for i in v}))

    @contextlib.contextmanager
    def capture(self, model: nn.Module, params: tuple[int, ...]) -> Iterator[dict[str, Any]]:
        with capture_attention_maps(model, params) as maps:
            yield {"maps": maps}

    def online(self, captured: dict[str, Any], params: tuple[int, ...]) -> dict[int, Any]:
        return {i: captured["maps"][i] for i in params}

    def column_names(self, params: tuple[int, ...]) -> list[str]:
        return [_column(i) for i in params]

    def column_shape(self, column: str, seq_len: int, teacher_conf: Any) -> list[int]:
        return [int(teacher_conf.num_attention_heads), seq_len, seq_len]

    def to_columns(self, value: dict[int, Any], params: tuple[int, ...]) -> dict[str, Any]:
        return {_column(i): value[i] for i in params}

    def from_columns(self, arrays: dict[str, Any], params: tuple[int, ...]) -> dict[int, Any]:
        return {i: arrays[_column(i)] for i in params}


def attention_map_kl(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """KL(teacher || student) of attention rows [B, A, L, L], averaged over rows."""
    t, s = t.float(), s.float()
    return (t * (t.clamp_min(1e-30).log() - s.clamp_min(1e-30).log())).sum(-1).mean()


class TinyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher_layer: int
    student_layer: int = -1


class TinyBertAttention(nn.Module):
    """Student attention maps of one layer (its attention set to eager, said in the log) vs
    the teacher's from the signal."""

    needs_student_hidden = False

    def __init__(self, method: Any, student: nn.Module) -> None:
        super().__init__()
        p = method_params(method)
        self.teacher_layer = p.teacher_layer
        self.terms = terms_of(method, {"attention_map"})
        self.request = self.signals(method)
        logging.getLogger(__name__).info("student attention runs eager (attention maps)")
        unwrap(student).set_attn_implementation("eager")
        self._maps: list[torch.Tensor] = []
        layer = decoder_layers(student)[p.student_layer]
        layer.self_attn.register_forward_hook(lambda _m, _a, out: self._maps.append(out[1]))

    @staticmethod
    def signals(method: Any) -> SignalRequest:
        return SignalRequest(extra=((SIGNAL, (method_params(method).teacher_layer,)),))

    @classmethod
    def build(cls, method: Any, student: nn.Module, teacher_dims: Any) -> nn.Module:
        return cls(method, student)

    def forward(self, inputs: StepInputs, last: torch.Tensor, all_hidden: Any,
                signals: TeacherSignals) -> tuple[torch.Tensor, dict[str, float]]:
        student = self._maps.pop()
        self._maps.clear()
        teacher = signals.extra[SIGNAL][self.teacher_layer].to(student.device)
        total = last.new_zeros(()).float()
        parts = {}
        for spec, weight, params in self.terms:
            value = spec.fn(student, teacher, **params)
            total = total + weight * value
            parts[spec.name] = float(value.detach())
        return total, parts


@pytest.fixture(scope="module")
def registered() -> Iterator[None]:
    method_registry.known_methods()  # the package's own methods first
    register_signal(AttentionMaps)
    register_loss(LOSS, kind="attention_map")(attention_map_kl)  # type: ignore[arg-type]
    register_method(METHOD, loss_kinds={"attention_map"}, params=TinyParams,
                    guard=True)(TinyBertAttention)
    yield
    SIGNALS.pop(SIGNAL)
    loss_registry.LOSSES.pop(LOSS)
    method_registry.METHODS.pop(METHOD)


def _experiment(root: Path, signals: str) -> dict:
    return {
        "name": "tiny", "output_dir": str(root / signals),
        "data": {"tokenizer": "bundled:bpe-4096", "seq_len": 16, "total_tokens": 8192,
                 "shards_dir": str(root / "shards"), "heldout_fraction": 0.3},
        "teacher": {"build": {**MODEL, "initializer_range": 0.5}},
        "student": {"build": MODEL},
        "distill": {"methods": [{"name": "tiny", "method": METHOD,
                                 "params": {"teacher_layer": 1},
                                 "losses": [{"name": LOSS}, {"name": "ce", "weight": 0.1}]}],
                    "teacher_signals": signals, "cache_dir": str(root / "cache")},
        "train": {"max_steps": 2, "micro_batch_size": 4, "log_every": 1, "eval_every": 1,
                  "tensorboard": False, "device": "cpu", "warmup_steps": 0},
        "eval": {"suite": None},
        "telemetry": {"enabled": False, "idle_seconds": 0},
    }


def test_a_method_with_an_attention_signal_trains_online_and_from_the_cache(
        registered: None, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from wattkd.jobs import student_job

    losses = {}
    for signals in ("online", "cache"):
        cfg = validate(_experiment(tmp_path, signals))
        if signals == "online":
            build_shards(cfg.data, cfg.shards_dir, progress=False)
        else:
            build_cache(cfg, progress=False)   # the method's declaration decides the columns
            manifest = json.loads((cfg.cache_dir / "manifest.json").read_text())
            assert manifest["columns"][_column(1)]["shape"] == [4, 16, 16]
        with caplog.at_level(logging.INFO):
            result = train(student_job(cfg, "tiny"), progress=False)
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
        losses[signals] = [r[LOSS] for r in rows if r.get("kind") == "train"]
        assert result.status == "completed" and len(losses[signals]) == 2
        assert any(r.get("kind") == "eval" for r in rows)       # held-out eval ran
        assert all(math.isfinite(v) and v > 0 for v in losses[signals])
    assert "its attention runs eager for this forward" in caplog.text   # the teacher's switch
    assert losses["cache"] == pytest.approx(losses["online"], rel=1e-2)  # fp16 maps


def test_attention_capture_restores_the_teachers_attention() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(MODEL)
    conf = AutoConfig.for_model(kwargs.pop("model_type"), vocab_size=64, **kwargs)
    conf._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(conf).eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad(), capture_attention_maps(model, (0, 1)) as maps:
        model(input_ids=ids)
    assert model.config._attn_implementation == "sdpa"
    assert set(maps) == {0, 1} and maps[1].shape == (2, 4, 7, 7)
    torch.testing.assert_close(maps[1].sum(-1), torch.ones(2, 4, 7))
    assert torch.all(maps[0].triu(1) == 0)   # causal
