"""The EPT protocol: what decides an EPT figure, and the refusal to compare figures measured
differently (another workload, precision, device or engine).

Built on eval/protocol.py's canonical hash and dotted-key diff; kept here so the EPT rules
(engine settings included) live in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from wattkd.config import EptConfig
from wattkd.eval.protocol import (
    PROTOCOL_FORMAT,
    ProtocolMismatch,
    diff_protocols,
    protocol_hash,
    sha256_text,
)

# Protocol keys that may differ between two results compared at one batch size.
SWEEP_KEYS = ("batch_sizes",)


def ept_protocol(cfg: EptConfig, texts: list[str], source: str, *, dtype: str,
                 device_name: str, engine: dict[str, Any] | None = None) -> dict[str, Any]:
    """Workload, decoding, precision, the kind of device and the engine (wattkd.ept/2)."""
    p: dict[str, Any] = {
        "format": PROTOCOL_FORMAT,
        "kind": "ept",
        "prompt_source": source,
        "prompts_sha256": sha256_text("\n\x00".join(texts)),
        "num_prompts": cfg.num_prompts,
        "prompt_tokens": cfg.prompt_tokens,
        "max_new_tokens": cfg.max_new_tokens,
        "min_new_tokens": cfg.max_new_tokens,
        "decoding": "greedy",
        "batch_sizes": list(cfg.batch_sizes),
        "warmup_batches": cfg.warmup_batches,
        "dtype": dtype,
        "device_name": device_name,
    }
    if engine is not None:
        p["engine"] = dict(engine)
        p["prefill_split"] = cfg.measure_prefill
    return p


def _protocol(doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    p = doc.get("protocol")
    if not isinstance(p, Mapping):
        raise ProtocolMismatch(f"{name}: no EPT protocol recorded (expected ept.json with "
                               "'protocol'); cannot compare it")
    stored = doc.get("protocol_hash")
    if stored is not None and stored != protocol_hash(p):
        raise ProtocolMismatch(f"{name}: recorded protocol_hash {stored} does not match its "
                               f"protocol ({protocol_hash(p)}); the file was edited")
    return dict(p)


def compare_ept(a: Mapping[str, Any], b: Mapping[str, Any], *,
                names: tuple[str, str] = ("student", "teacher"),
                ignore: tuple[str, ...] = SWEEP_KEYS) -> None:
    """Raise ProtocolMismatch naming every differing key (e.g. `engine.cache`) unless two
    ept.json results were measured the same way; `ignore`d keys may differ."""
    pa, pb = _protocol(a, names[0]), _protocol(b, names[1])
    diffs = [d for d in diff_protocols(pa, pb) if d[0].split(".")[0] not in ignore]
    if not diffs:
        return
    lines = [f"  - {k}: {x} ({names[0]}) vs {y} ({names[1]})" for k, x, y in diffs]
    keys = ", ".join(k for k, _, _ in diffs)
    raise ProtocolMismatch(
        f"EPT of {names[0]} and {names[1]} were measured differently ({keys}); refusing to "
        "compare them. Differences:\n" + "\n".join(lines)
        + "\nMeasure both with the same eval.ept settings (engine, dtype, workload) on the "
        "same kind of device.")


def figure(run: Mapping[str, Any], key: str, component: str = "gpu") -> float | None:
    """Mean of one figure of a wattkd.ept/2 run (`ms_per_step`, or an energy figure such as
    `j_per_output_token` of `component`); None when absent."""
    fig = run.get("figures") or {}
    val = fig.get(key) if key in fig else ((fig.get("energy") or {}).get(component) or {}).get(key)
    return val.get("mean") if isinstance(val, Mapping) else None


def ept_ratios(student: Mapping[str, Any], teacher: Mapping[str, Any], *,
               key: str = "j_per_output_token", component: str = "gpu",
               names: tuple[str, str] = ("student", "teacher")) -> dict[int, float | None]:
    """Student/teacher ratio of one figure per batch size both measured (refused, naming the
    differing key, when the protocols differ)."""
    compare_ept(student, teacher, names=names)
    t_runs = {int(r["batch_size"]): r for r in teacher.get("runs") or []}
    out: dict[int, float | None] = {}
    for r in student.get("runs") or []:
        b = int(r["batch_size"])
        if b not in t_runs:
            continue
        s, t = figure(r, key, component), figure(t_runs[b], key, component)
        out[b] = s / t if s is not None and t not in (None, 0) else None
    return out
