"""Inference EPT on the product's own path: `wattkd ept` on both engines, teacher and student.

Gemma-3-270M-shaped teacher (the real Gemma 3 270M text config: vocab 262,144, 18 layers,
hidden 640, ...; benchmarks/pair.py) and a 6-layer student of the same shape, both random
init in bf16: decoding speed and energy do not depend on weight values, and exactly
`--new-tokens` tokens are generated (EOS suppressed), so the work is the same as with real
weights. Prompts: the bundled corpus, `--prompt-tokens` tokens each (the bundled byte-level
BPE tokenizer; token ids do not change the cost). For each engine (static KV cache +
compiled decoding, dynamic cache eager) and model, the real `wattkd ept MODEL --config ...`
command runs in this process (typer app, same code as the CLI), then this script collects
the ept.json files into one record with the student/teacher ratio per batch size.

    python3 benchmarks/ept_engine.py --out OUT [--work DIR] [--batches 1,8,32,128]
        [--repeats 3] [--min-window 1.5] [--engines static,dynamic] [--tokenizer DIR]

Writes OUT/ept_engine.json (card, date, versions, command, per engine/model/batch: ms per
decoding step, J per output/input token, J per request, repeats, spread, ratio) and each
run's ept.json as OUT/ept_<engine>_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pair import GEMMA_270M

FIGS = ("j_per_output_token", "j_per_input_token", "j_per_request", "mean_power_w",
        "dynamic_j_per_output_token", "dynamic_j_per_input_token", "dynamic_j_per_request")


TINY = {"vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
        "query_pre_attn_scalar": 16}  # --tiny: the same code path in seconds on a CPU


def build_models(work: Path, tokenizer: str, tiny: bool = False) -> dict[str, Path]:
    """Teacher (18 layers) and student (6 layers) folders, random init, bf16, with tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from wattkd.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    out = {}
    for name, layers in (("teacher", GEMMA_270M["num_hidden_layers"]), ("student", 6)):
        d = work / name
        if not (d / "config.json").is_file():
            kw = {k: v for k, v in GEMMA_270M.items() if k != "model_type"}
            kw["num_hidden_layers"] = layers
            if tiny:
                kw.update(TINY)
            cfg = AutoConfig.for_model(GEMMA_270M["model_type"], **kw)
            cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
            cfg.pad_token_id = tok.pad_token_id
            torch.manual_seed(0)
            net = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
            net.save_pretrained(d)
            tok.save_pretrained(d)
        out[name] = d
    return out


def write_config(work: Path, models: dict[str, Path], a: argparse.Namespace) -> Path:
    import yaml

    cfg = {
        "name": "ept-engine",
        "output_dir": str(work / "runs"),
        "teacher": {"model": str(models["teacher"])},
        "student": {"model": str(models["student"])},
        "telemetry": {"idle_seconds": a.idle_seconds},
        "eval": {"suite": None, "ept": {
            "num_prompts": max(a.batches), "prompt_tokens": a.prompt_tokens,
            "max_new_tokens": a.new_tokens, "batch_sizes": a.batches,
            "warmup_batches": a.warmup, "repeats": a.repeats, "min_window_s": a.min_window}},
    }
    p = work / "ept_engine.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def run_cli(args: list[str]) -> None:
    """`wattkd ARGS` in this process (the typer app itself); a failure stops the benchmark."""
    from wattkd.cli import app

    try:
        app(args, standalone_mode=False)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"wattkd {shlex.join(args)} exited {exc.code}") from None


def _pick(run: dict[str, Any], engine: str) -> dict[str, Any]:
    """One batch size's figures (each {mean, std, min, max, n, uncertainty}: std/min/max are
    the spread over repeats)."""
    f = run["figures"]
    gpu = f["energy"].get("gpu") or {}
    row = {"engine": engine, "batch_size": run["batch_size"], "ms_per_step": f["ms_per_step"],
           "tokens_per_s": f["tokens_per_s"], "output_tokens_per_s": f["output_tokens_per_s"],
           "warmup_s": run["warmup_s"], "repeats": f["ms_per_step"]["n"],
           "batches_run": run["batches_run"], "flags": run["flags"],
           "energy_source": gpu.get("source")}
    for k in FIGS:
        row[k] = gpu.get(k)
    return row


def summarise(docs: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    from wattkd.eval.ept_protocol import ept_ratios

    engines: dict[str, Any] = {}
    for (engine, model), doc in docs.items():
        e = engines.setdefault(engine, {"engine": doc["engine"], "models": {}})
        e["models"][model] = {"parameters": doc["model"]["parameters"],
                              "protocol_hash": doc["protocol_hash"],
                              "measurement": doc["measurement"],
                              "idle_power_w": (doc.get("idle_power_w") or {}).get("gpu"),
                              "runs": [_pick(r, doc["engine"]["name"]) for r in doc["runs"]]}
    for engine, e in engines.items():
        s, t = docs.get((engine, "student")), docs.get((engine, "teacher"))
        if s and t:
            e["student_teacher_ratio"] = {
                key: {str(b): v for b, v in ept_ratios(s, t, key=key).items()}
                for key in ("j_per_output_token", "j_per_input_token", "j_per_request",
                            "dynamic_j_per_output_token")}
            e["student_teacher_ratio"]["ms_per_step"] = {
                str(b): v for b, v in ept_ratios(s, t, key="ms_per_step").items()}
            for row in e["models"]["student"]["runs"]:
                row["student_teacher_ratio"] = {k: v.get(str(row["batch_size"]))
                                                for k, v in e["student_teacher_ratio"].items()}
    return engines


def _card() -> dict[str, Any]:
    import torch

    card: dict[str, Any] = {"name": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                            else "cpu"}
    try:
        import pynvml

        pynvml.nvmlInit()
        card["driver"] = pynvml.nvmlSystemGetDriverVersion()
        pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - the card name is enough without NVML
        card["driver"] = f"unavailable ({type(exc).__name__})"
    return card


def _versions() -> dict[str, str]:
    import torch
    import transformers

    v = {"torch": torch.__version__, "transformers": transformers.__version__,
         "python": sys.version.split()[0]}
    try:
        import pynvml

        v["nvidia-ml-py"] = getattr(pynvml, "__version__", "unknown")
    except ImportError:
        pass
    return v


def table(engines: dict[str, Any]) -> str:
    lines = [("| engine | model | batch | ms/step | J/out-token (decode) | J/in-token (prefill) "
              "| J/request | out tok/s | W | student/teacher J/out |"),
             "|---|---|---|---|---|---|---|---|---|---|"]

    def f(q: Any, digits: int = 3) -> str:
        if not q:
            return "—"
        return f"{q['mean']:.{digits}g} ± {q['std']:.2g}"

    for engine, e in engines.items():
        ratio = (e.get("student_teacher_ratio") or {}).get("j_per_output_token", {})
        for model, m in e["models"].items():
            for r in m["runs"]:
                rat = ratio.get(str(r["batch_size"])) if model == "student" else None
                lines.append(f"| {engine} | {model} | {r['batch_size']} | {f(r['ms_per_step'])} "
                             f"| {f(r['j_per_output_token'])} | {f(r['j_per_input_token'])} "
                             f"| {f(r['j_per_request'])} | {f(r['output_tokens_per_s'], 4)} "
                             f"| {f(r['mean_power_w'])} | "
                             f"{'—' if rat is None else f'{rat:.3f}'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ept_engine"))
    ap.add_argument("--tokenizer", default="bundled:bpe-4096")
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--engines", default="static,dynamic")
    ap.add_argument("--models", default="teacher,student")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-window", type=float, default=10.0,
                    help="seconds per metered window (eval.ept.min_window_s)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--idle-seconds", type=float, default=5.0)
    ap.add_argument("--tiny", action="store_true", help="tiny widths (CPU check of the path)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds: skip the remaining runs once this much time has passed")
    a = ap.parse_args()
    a.batches = [int(x) for x in a.batches.split(",")]
    t0 = time.perf_counter()
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    models = build_models(a.work, a.tokenizer, a.tiny)
    cfg = write_config(a.work, models, a)
    docs: dict[tuple[str, str], dict[str, Any]] = {}
    skipped: list[str] = []
    record: dict[str, Any] = {
        "benchmark": "ept_engine", "card": _card(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(), "command": "python3 " + shlex.join(sys.argv),
        "workload": {"teacher": "Gemma-3-270M-shaped (real text config), random init, bf16",
                     "student": "same shape, 6 layers, random init, bf16",
                     "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
                     "batch_sizes": a.batches, "repeats": a.repeats,
                     "min_window_s": a.min_window, "decoding": "greedy, EOS suppressed",
                     "note": "speed and energy do not depend on weight values"},
    }
    for engine in a.engines.split(","):
        for model in a.models.split(","):
            if a.deadline and time.perf_counter() - t0 > a.deadline:
                skipped.append(f"{engine}/{model}")
                continue
            dest = a.out / f"ept_{engine}_{model}.json"
            t1 = time.perf_counter()
            run_cli(["ept", str(models[model]), "--config", str(cfg), "--out", str(dest),
                     "--set", f"eval.ept.engine={engine}"])
            docs[(engine, model)] = json.loads(dest.read_text())
            docs[(engine, model)]["wall_s"] = time.perf_counter() - t1
            print(f"== {engine}/{model}: {time.perf_counter() - t1:.1f} s", flush=True)
            record["engines"] = summarise(docs)
            record["skipped"] = skipped
            record["wall_s"] = round(time.perf_counter() - t0, 1)
            (a.out / "ept_engine.json").write_text(json.dumps(record, indent=1) + "\n")
    record["engines"] = summarise(docs)
    record["skipped"] = skipped
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    (a.out / "ept_engine.json").write_text(json.dumps(record, indent=1) + "\n")
    print(table(record["engines"]))
    if skipped:
        print("skipped (deadline):", ", ".join(skipped))


if __name__ == "__main__":
    main()
