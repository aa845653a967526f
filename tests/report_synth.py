"""Synthetic run directories for the report tests, in the real on-disk formats.

Phase records follow wattkd.energy.ledger (schema 1), eval results wattkd.eval.harness
(wattkd.eval/1), perplexity wattkd.eval.perplexity, EPT wattkd.eval.ept (built with its own
`ept_from_record`, so the report reads exactly what the benchmark writes), telemetry
wattkd.energy.monitor. Numbers are chosen so every metric can be computed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wattkd.eval.ept import ept_from_record
from wattkd.eval.protocol import protocol_hash

T0 = 1_700_000_000.0


def phase(name: str, *, gpu: float | None, cpu: float | None = None, gpu_unc: float | None = None,
          tokens: int = 0, duration: float = 100.0, start: float = T0, host: str = "node1",
          cpu_source: str | None = None, depth: int = 0, kind: str = "phase",
          idle_gpu_w: float | None = None, flags: list[str] | None = None,
          notes: list[str] | None = None, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """One phases.jsonl record (ledger schema 1)."""
    cpu_src = cpu_source or ("estimated-cpu-time" if cpu is not None else "unavailable")
    idle = {"gpu": idle_gpu_w, "cpu": None, "dram": None, "per_gpu": {}, "window_s": 2.0,
            "source": "synthetic"}
    dyn_gpu = None if gpu is None or idle_gpu_w is None else gpu - idle_gpu_w * duration
    return {
        "schema": 1, "kind": kind, "phase": name, "seq": 1, "depth": depth, "parent": None,
        "host": host, "session": "s1", "start_wall": start, "end_wall": start + duration,
        "duration_s": duration, "tokens": tokens, "status": "ok",
        "energy_j": {"gpu": gpu, "cpu": cpu, "dram": None},
        "source": {"gpu": "nvml-counter" if gpu is not None else "unavailable", "cpu": cpu_src,
                   "dram": "unavailable"},
        "estimated": cpu_src.startswith("estimated"),
        "uncertainty_j": {"gpu": gpu_unc, "cpu": None, "dram": None},
        "dynamic_energy_j": {"gpu": dyn_gpu, "cpu": None, "dram": None},
        "per_gpu": {}, "idle_power_w": idle,
        "integrated_power_j": {"gpu": None, "power_source": None, "samples": 0, "ratio": None,
                               "diff_j": None},
        "counter_period_s": 0.1, "counter_period_source": "default",
        "flags": list(flags or []) + (["estimated-cpu"] if cpu_src.startswith("estimated")
                                      else []),
        "notes": list(notes or []) if gpu is not None else
        list(notes or []) + ["gpu unavailable: NVML library not found"],
        "meta": meta or {}}


def eval_doc(scores: dict[str, tuple[float | None, float | None]], *, limit: int = 100,
             suite: str = "offline", model: str = "m") -> dict[str, Any]:
    """eval/<suite>.json as wattkd.eval.harness writes it (scores: task -> (value, stderr))."""
    protocol = {"format": 1, "kind": "lm-eval", "suite": suite,
                "harness": {"name": "lm-eval", "version": "0.4.13"}, "limit": limit,
                "apply_chat_template": False, "fewshot_as_multiturn": False,
                "system_instruction": None, "fewshot_seed": 1234,
                "tasks": [{"name": t, "metric": "acc,none", "num_fewshot": 0,
                           "versions": {t: 1.0}, "config_sha256": "c" * 64,
                           "data_sha256": "d" * 64, "docs": 100} for t in sorted(scores)]}
    return {"schema": "wattkd.eval/1", "suite": suite, "model": {"id": model},
            "protocol": protocol, "protocol_hash": protocol_hash(protocol),
            "scores": {t: {"metric": "acc,none", "value": v, "stderr": se, "samples": 100}
                       for t, (v, se) in scores.items()}}


def perplexity_doc(nll: float, ppl: float | None = None, *, max_tokens: int = 4096,
                   vocab: int | None = None) -> dict[str, Any]:
    import math

    protocol = {"format": 1, "kind": "perplexity", "shards_manifest_sha256": "a" * 64,
                "seq_len": 128, "tokenizer_sha256": "b" * 64, "max_tokens": max_tokens}
    return {"schema": "wattkd.perplexity/1", "model": {"id": "m"}, "protocol": protocol,
            "protocol_hash": protocol_hash(protocol), "nll": nll,
            "perplexity": math.exp(nll) if ppl is None else ppl, "tokens": max_tokens,
            "sequences": 32, **({"vocab": vocab} if vocab is not None else {})}


def ept_doc(batches: dict[int, dict[str, Any]], *, dtype: str = "bfloat16") -> dict[str, Any]:
    """ept.json; batches: batch -> {gpu, cpu, gpu_unc, idle_gpu_w, duration, tin, tout}."""
    protocol = {"format": 1, "kind": "ept", "prompt_source": "bundled:all@x",
                "prompts_sha256": "e" * 64, "num_prompts": 16, "prompt_tokens": 64,
                "max_new_tokens": 32, "min_new_tokens": 32, "decoding": "greedy",
                "batch_sizes": sorted(batches), "warmup_batches": 2, "dtype": dtype,
                "device_name": "NVIDIA H100"}
    runs = []
    for b, spec in sorted(batches.items()):
        rec = phase("ept", gpu=spec.get("gpu"), cpu=spec.get("cpu"), gpu_unc=spec.get("gpu_unc"),
                    duration=spec.get("duration", 10.0), idle_gpu_w=spec.get("idle_gpu_w"))
        tin, tout = spec.get("tin", 1024), spec.get("tout", 512)
        runs.append({"batch_size": b, "batches": 16 // b, "prompts": 16, "warmup_batches": 2,
                     "duration_s": rec["duration_s"], "input_tokens": tin, "output_tokens": tout,
                     "total_tokens": tin + tout, "tokens_per_s": None,
                     "output_tokens_per_s": None, "latency": {},
                     "energy": ept_from_record(rec, input_tokens=tin, output_tokens=tout),
                     "estimated": rec["estimated"], "flags": rec["flags"], "notes": [],
                     "phase_seq": 1})
    return {"schema": "wattkd.ept/1", "model": {"id": "m"}, "protocol": protocol,
            "protocol_hash": protocol_hash(protocol), "idle_power_w": None, "short_prompts": 0,
            "runs": runs}


def telemetry_lines(host: str = "node1", n: int = 30, gpus: int = 2, start: float = T0
                    ) -> list[dict[str, Any]]:
    uuids = [f"GPU-{i:04d}" for i in range(gpus)]
    out: list[dict[str, Any]] = [{
        "schema": 1, "type": "header", "host": host, "session": "s1", "t_wall": start,
        "t_mono": 0.0, "interval_s": 0.1, "slow_interval_s": 1.0,
        "gpus": [{"uuid": u, "index": i, "cuda_index": i, "name": "NVIDIA H100",
                  "mig": False, "energy_source": "nvml-counter", "power_source": "power-usage",
                  "power_avg": True, "power_limit_w": 700} for i, u in enumerate(uuids)],
        "rapl": [], "unavailable": {"rapl": "no powercap"}, "versions": {}}]
    for k in range(n):
        t = start + k * 1.0
        out.append({"schema": 1, "type": "sample", "host": host, "session": "s1", "t_wall": t,
                    "t_mono": float(k), "slow": True,
                    "gpu": {u: {"energy_mj": 1000 * k * (300 + 50 * i), "power_w": 300.0 + 50 * i
                                + (k % 5), "power_avg_w": None, "util_pct": 90 - i,
                                "mem_used_b": 1, "mem_total_b": 2, "temp_c": 50,
                                "sm_clock_mhz": 1800} for i, u in enumerate(uuids)},
                    "rapl": {}, "cpu": {"util_pct": 40.0, "ram_used_b": 1, "ram_total_b": 2}})
    return out


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def make_run(root: Path, rel: str, *, info: dict[str, Any], phases: list[dict] | None = None,
             evals: dict[str, dict] | None = None, perplexity: dict | None = None,
             ept: dict | None = None, telemetry: bool = False, metrics: bool = True,
             student: dict[str, Any] | None = None) -> Path:
    d = root / rel
    d.mkdir(parents=True, exist_ok=True)
    (d / "run.json").write_text(json.dumps({"status": "completed", **info}))
    (d / "config.yaml").write_text(json.dumps({"student": student or {
        "build": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2}}}))
    if phases is not None:
        write_jsonl(d / "phases.jsonl", phases)
    for suite, doc in (evals or {}).items():
        (d / "eval").mkdir(exist_ok=True)
        (d / "eval" / f"{suite}.json").write_text(json.dumps(doc))
    if perplexity is not None:
        (d / "eval").mkdir(exist_ok=True)
        (d / "eval" / "perplexity.json").write_text(json.dumps(perplexity))
    if ept is not None:
        (d / "ept.json").write_text(json.dumps(ept))
    if telemetry:
        write_jsonl(d / "telemetry" / "node1.jsonl", telemetry_lines())
    if metrics:
        recs = []
        for step in range(10, 110, 10):
            recs.append({"kind": "train", "step": step, "tokens": step * 40,
                         "loss": 5.0 - step / 50, "energy_j": step * 4.0})
            if step % 50 == 0:
                recs.append({"kind": "eval", "step": step, "tokens": step * 40,
                             "heldout_loss": 5.2 - step / 50, "heldout_ppl": 1.0,
                             "heldout_tokens": 100, "energy_j": step * 4.0})
        write_jsonl(d / "metrics.jsonl", recs)
    return d


def gpu_experiment(root: Path) -> Path:
    """Teacher + response x2 (cached teacher) + feature (protocol mismatch) + relation (no
    ledger) + baseline (no ept.json); telemetry only for the teacher and response/rep0. Expected values in test_report_metrics."""
    teacher_scores = {"taskA": (0.8, 0.02), "taskB": (0.5, 0.01)}
    make_run(root, "teacher", info={"method": "teacher", "mode": "none", "repeat": 0},
             telemetry=True,
             phases=[phase("idle", gpu=20.0, kind="idle"),
                     phase("train", gpu=1000.0, gpu_unc=10.0, tokens=10_000)],
             evals={"offline": eval_doc(teacher_scores)}, perplexity=perplexity_doc(2.0),
             ept=ept_doc({1: {"gpu": 96.0, "gpu_unc": 1.5, "idle_gpu_w": 4.0},
                          8: {"gpu": 30.72, "gpu_unc": 1.536, "idle_gpu_w": 1.0}}))
    cache = {"path": str(root / "teacher_cache"), "energy_j": 300.0, "source": "nvml-counter",
             "uncertainty_j": 3.0, "students": 3}
    make_run(root, "response/rep0",
             info={"method": "response", "mode": "response", "repeat": 0,
                   "teacher_signals": "cache", "teacher_cache": cache, "tokens": 4000},
             telemetry=True,
             phases=[phase("train", gpu=400.0, gpu_unc=4.0, tokens=4000),
                     phase("eval", gpu=50.0, gpu_unc=1.0),
                     phase("ept", gpu=30.0, gpu_unc=1.0, tokens=1536)],
             evals={"offline": eval_doc({"taskA": (0.6, 0.02), "taskB": (0.4, 0.01)})},
             ept=ept_doc({1: {"gpu": 48.0, "gpu_unc": 1.0}, 8: {"gpu": 15.36, "gpu_unc": 0.768}}))
    make_run(root, "response/rep1",
             info={"method": "response", "mode": "response", "repeat": 1,
                   "teacher_signals": "cache", "teacher_cache": cache},
             phases=[phase("train", gpu=300.0, gpu_unc=3.0, tokens=2000),
                     phase("train", gpu=200.0, gpu_unc=2.0, tokens=2000, start=T0 + 500)],
             evals={"offline": eval_doc({"taskA": (0.4, 0.02), "taskB": (0.5, 0.01)})},
             ept=ept_doc({1: {"gpu": 48.0, "gpu_unc": 1.0}, 8: {"gpu": 19.2, "gpu_unc": 0.96}}))
    make_run(root, "feature/rep0",
             info={"method": "feature", "mode": "feature", "repeat": 0,
                   "teacher_signals": "online"},
             phases=[phase("train", gpu=800.0, gpu_unc=8.0, tokens=4000)],
             evals={"offline": eval_doc({"taskA": (0.7, 0.02), "taskB": (0.5, 0.01)},
                                        limit=20)},
             ept=ept_doc({1: {"gpu": 48.0, "gpu_unc": 1.0}, 8: {"gpu": 15.36, "gpu_unc": 0.768}}))
    make_run(root, "relation/rep0",
             info={"method": "relation", "mode": "relation", "repeat": 0,
                   "teacher_signals": "online"},
             phases=None, telemetry=False,
             evals={"offline": eval_doc({"taskA": (0.8, 0.02), "taskB": (0.25, 0.01)})},
             ept=ept_doc({8: {"gpu": 15.36, "gpu_unc": 0.768}}))
    make_run(root, "baseline/rep0",
             info={"method": "baseline", "mode": "none", "repeat": 0},
             phases=[phase("train", gpu=300.0, gpu_unc=3.0, tokens=4000)],
             evals={"offline": eval_doc({"taskA": (0.4, 0.02), "taskB": (0.25, 0.01)})})
    return root


def cpu_experiment(root: Path) -> Path:
    """The CPU demo's shape: no GPU energy, estimated CPU energy, perplexity only."""
    make_run(root, "teacher", info={"method": "teacher", "mode": "none"},
             phases=[phase("train", gpu=None, cpu=500.0, tokens=10_000)],
             perplexity=perplexity_doc(2.0), telemetry=False,
             ept=ept_doc({1: {"gpu": None, "cpu": 24.0}}))
    make_run(root, "response/rep0",
             info={"method": "response", "mode": "response", "repeat": 0,
                   "teacher_signals": "online"},
             phases=[phase("train", gpu=None, cpu=200.0, tokens=4000)],
             perplexity=perplexity_doc(2.5), telemetry=False,
             ept=ept_doc({1: {"gpu": None, "cpu": 12.0}}))
    make_run(root, "baseline/rep0", info={"method": "baseline", "mode": "none", "repeat": 0},
             phases=[phase("train", gpu=None, cpu=100.0, tokens=4000)],
             perplexity=perplexity_doc(3.0), telemetry=False,
             ept=ept_doc({1: {"gpu": None, "cpu": 12.0}}))
    return root


def make_cache(path: Path, *, gpu: float | None, cpu: float | None = None,
               session_unc: list[float | None] = (), complete: bool = True) -> Path:
    """A teacher-cache folder with a manifest that wattkd.teacher_cache accepts (no parts)."""
    from wattkd.atomic import atomic_write_json

    path.mkdir(parents=True, exist_ok=True)
    energy = {"energy_j": gpu, "component": "gpu", "source": "nvml-counter",
              "estimated": False, "components": {"gpu": gpu, "cpu": cpu, "dram": None},
              "sources": {"gpu": "nvml-counter" if gpu is not None else "unavailable",
                          "cpu": "estimated-cpu-time" if cpu is not None else "unavailable",
                          "dram": "unavailable"},
              "tokens": 1000, "j_per_token": None, "complete": complete, "notes": [],
              "sessions": [{"uncertainty_j": u} for u in session_unc]}
    manifest = {"format": "wattkd-teacher-cache", "version": 1,
                "identity": {k: "x" for k in ("shards_sha256", "tokenizer_sha256",
                                              "teacher_fingerprint", "teacher_dtype", "signals",
                                              "encoding")},
                "shards": {"path": "shards/train", "manifest_sha256": "x"},
                "teacher": {"id": "teacher", "fingerprint": "x", "vocab": 64},
                "signals": {"spec": "topk"}, "columns": {},
                "parts": [], "rows": 0, "tokens": 1000, "encoding": "topk-v1",
                "energy": energy}
    atomic_write_json(path / "manifest.json", manifest)
    return path
