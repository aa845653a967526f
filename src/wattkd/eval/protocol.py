"""Protocol lock: a canonical hash of how a number was measured, and a refusal to compare
numbers measured differently.

OM_perf divides a student's score by its teacher's. That ratio means something only when
both came from the same tasks, task versions, prompts, few-shot count, chat-template setting,
limit, metric keys, data and harness version. Every eval/EPT/perplexity result embeds its
`protocol` dict and `protocol_hash`; `compare_protocols` refuses a pair that differs and
names each difference.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wattkd.atomic import atomic_write_json
from wattkd.errors import InputError

PROTOCOL_FORMAT = 1


class ProtocolMismatch(InputError, ValueError):
    """Two results were measured under different protocols and must not be compared."""


# ------------------------------------------------------------------------------- hashing
def _default(obj: Any) -> Any:
    """JSON fallback that never depends on memory addresses or machine paths."""
    if callable(obj):
        return function_fingerprint(obj)
    if isinstance(obj, Path):
        return obj.name
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=str)
    if isinstance(obj, bytes):
        return hashlib.sha256(obj).hexdigest()
    return str(obj)


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, callables by name + source hash: stable across machines."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=_default)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def protocol_hash(protocol: Mapping[str, Any]) -> str:
    return "sha256:" + sha256_text(canonical_json(protocol))


def function_fingerprint(fn: Any) -> str:
    """`name@sha256(source)[:16]`: a changed prompt function changes the protocol."""
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        src = name
    return f"{name}@{sha256_text(src)[:16]}"


# Config keys that say where things are on this machine, not how the task is measured.
_MACHINE_KEYS = {"config_source", "wattkd_mmlu_path", "wattkd_bigbench_dir", "wattkd_task_json"}


def task_config_digest(config: Mapping[str, Any]) -> str:
    """Hash of an lm-eval task config (its `dump_config()`), without machine-local paths."""
    cfg = dict(config)
    meta = cfg.pop("metadata", None) or {}
    if isinstance(meta, Mapping):
        cfg["metadata"] = {k: v for k, v in meta.items() if k not in _MACHINE_KEYS}
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, Mapping) and _MACHINE_KEYS & set(kwargs):  # a config suite's file
        cfg["dataset_kwargs"] = {k: v for k, v in kwargs.items() if k not in _MACHINE_KEYS}
    return sha256_text(canonical_json(cfg))


def docs_digest(docs: Iterable[Mapping[str, Any]]) -> tuple[str, int]:
    """(sha256 over the canonical JSON of every document, count): same data, same hash."""
    h = hashlib.sha256()
    n = 0
    for doc in docs:
        h.update(canonical_json(dict(doc)).encode("utf-8"))
        h.update(b"\n")
        n += 1
    return h.hexdigest(), n


# ----------------------------------------------------------------------------- comparison
def _split(obj: Mapping[str, Any], label: str) -> tuple[dict[str, Any], str | None]:
    """A result file (with `protocol`) or a bare protocol -> (protocol, stored hash)."""
    if "protocol" in obj and isinstance(obj["protocol"], Mapping):
        return dict(obj["protocol"]), obj.get("protocol_hash")
    if "format" in obj and "kind" in obj:
        return dict(obj), None
    raise ProtocolMismatch(f"{label}: no evaluation protocol recorded (expected a wattkd "
                           "result with 'protocol' and 'protocol_hash'); cannot compare it")


def _label(obj: Mapping[str, Any], fallback: str) -> str:
    model = obj.get("model")
    if isinstance(model, Mapping) and model.get("id"):
        return str(model["id"])
    return fallback


def _keyed(value: Any) -> Any:
    """Lists of {name: ...} dicts compare by name, so a diff says `tasks.mmlu.num_fewshot`."""
    if isinstance(value, list) and value and all(isinstance(v, Mapping) and "name" in v
                                                 for v in value):
        return {str(v["name"]): {k: x for k, x in v.items() if k != "name"} for v in value}
    return value


def diff_protocols(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[
        tuple[str, Any, Any]]:
    """Every (dotted key, value in a, value in b) that differs; `<absent>` marks a missing key."""
    out: list[tuple[str, Any, Any]] = []
    for key in sorted(set(a) | set(b), key=str):
        path = f"{prefix}{key}"
        if key not in a or key not in b:
            out.append((path, a.get(key, "<absent>"), b.get(key, "<absent>")))
            continue
        va, vb = _keyed(a[key]), _keyed(b[key])
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out.extend(diff_protocols(va, vb, path + "."))
        elif canonical_json(va) != canonical_json(vb):
            out.append((path, va, vb))
    return out


def _short(v: Any) -> str:
    s = v if isinstance(v, str) else canonical_json(v)
    return s if len(s) <= 80 else s[:77] + "..."


def compare_protocols(a: Mapping[str, Any], b: Mapping[str, Any], *,
                      names: tuple[str, str] | None = None) -> None:
    """Raise `ProtocolMismatch` naming every difference unless a and b share one protocol.

    `a`/`b` are result dicts (eval/<suite>.json, ept.json, eval/perplexity.json) or bare
    protocol dicts. A stored hash that does not match its protocol (a hand-edited file) is
    refused too.
    """
    na, nb = names or (_label(a, "a"), _label(b, "b"))
    if na == nb:
        na, nb = f"{na} (a)", f"{nb} (b)"
    pa, ha = _split(a, na)
    pb, hb = _split(b, nb)
    for label, p, h in ((na, pa, ha), (nb, pb, hb)):
        if h is not None and h != protocol_hash(p):
            raise ProtocolMismatch(f"{label}: recorded protocol_hash {h} does not match its "
                                   f"protocol ({protocol_hash(p)}); the file was edited")
    if protocol_hash(pa) == protocol_hash(pb):
        return
    lines = [f"  - {k}: {_short(x)} ({na}) vs {_short(y)} ({nb})"
             for k, x, y in diff_protocols(pa, pb)]
    raise ProtocolMismatch(
        f"results were measured under different protocols ({na}: {protocol_hash(pa)[:19]}, "
        f"{nb}: {protocol_hash(pb)[:19]}); refusing to compare them. Differences:\n"
        + "\n".join(lines)
        + "\nRe-run both with the same suite and settings (wattkd eval MODEL --suite NAME).")


# ------------------------------------------------------------------------------ writing
def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write JSON via wattkd.atomic (temp file + rename); numpy scalars become plain numbers."""
    plain = json.loads(json.dumps(data, default=_json_fallback, allow_nan=True))
    return atomic_write_json(path, _no_nan(plain))


def _no_nan(obj: Any) -> Any:
    """NaN/inf (lm-eval reports NaN stderr for n=1) become null: JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_no_nan(v) for v in obj]
    return obj


def _json_fallback(obj: Any) -> Any:
    try:
        if isinstance(obj, np.generic):
            return obj.item()
    except ImportError:  # pragma: no cover
        pass
    return _default(obj)


def finite_or_none(x: Any) -> float | None:
    """JSON has no NaN/inf: such values become null (and the writer refuses any left over)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None
