"""Multi-GPU scaling of `wattkd train`: one GPU vs N GPUs under DDP and FSDP, same pair.

    python benchmarks/multi_gpu.py --out DIR --tokenizer TOK --corpus DIR [--gpus 1,2]

Runs the product itself (`torchrun -m wattkd.cli train`, response KD, online teacher, the
energy meter on) for each (GPU count, strategy) and reads its own logs: tokens/s from
metrics.jsonl over the steady part of the run (after the first logged interval, which holds
start-up and torch.compile), J/token from the cumulative energy logged at the same steps
(NVML counter of every GPU of the run, read by the sampler at 1 Hz: +-1 s of power per edge),
and the whole train window from phases.jsonl. Scaling efficiency = tokens/s on N GPUs /
(N x tokens/s on one GPU), per-GPU batch fixed (weak scaling).

Pair: Gemma 3 270M-shaped teacher (random init: speed does not depend on weight values, and
the GPU machine has no hub access) and the 6-layer student copied from its layers; the
tokenizer given by --tokenizer (Gemma's, vocab 262k), shards built from --corpus.
--tiny: a CPU smoke run (gloo, small model, bundled tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

from pair import GEMMA_270M, STUDENT_LAYERS
from train_runs import card, peak_memory_gb, run_train

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128}


def experiment(root: Path, args: argparse.Namespace) -> Path:
    """The benchmark's experiment YAML (the same schema every wattkd config uses)."""
    tiny = args.tiny
    data = {
        "name": "multigpu",
        "output_dir": str(root / "runs"),
        "data": {"sources": [{"path": "bundled"}] if tiny else
                 [{"path": str(Path(args.corpus).resolve())}],
                 "tokenizer": "bundled:bpe-4096" if tiny else args.tokenizer,
                 "seq_len": 64 if tiny else args.seq, "total_tokens": 200_000 if tiny else None,
                 "heldout_fraction": 0.0, "num_workers": 2 if tiny else 8,
                 "shards_dir": str(root / "shards")},
        "teacher": {"build": TINY if tiny else {k: v for k, v in GEMMA_270M.items()
                                                if k != "vocab_size"},
                    "dtype": "float32" if tiny else "bfloat16"},
        "student": {"from_teacher_layers": [0, 2] if tiny else STUDENT_LAYERS},
        "distill": {"logit_chunk_tokens": 1024, "methods": [
            {"name": "response", "method": "response",
             "losses": [{"name": "forward_kl"}, {"name": "ce", "weight": 0.5}]}]},
        "train": {"max_steps": args.steps, "micro_batch_size": args.batch,
                  "log_every": args.log_every, "tensorboard": False, "lr": 1e-4,
                  "schedule": "constant", "checkpoint_every": 0,
                  "device": "cpu" if tiny else "auto"},
        "telemetry": {"idle_seconds": 0 if tiny else 2.0},
    }
    path = root / "multigpu.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_one(cfg: Path, root: Path, gpus: int, strategy: str, tiny: bool,
            timeout: int) -> dict:
    out = root / f"{strategy}-{gpus}gpu"
    env = {**os.environ, "OMP_NUM_THREADS": "1" if tiny else "4"}
    if not tiny:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={gpus}", "-m", "wattkd.cli", "train", str(cfg),
           "--method", "response", "--set", f"output_dir={out}",
           "--set", f"train.strategy={strategy}"]
    rec: dict = {"gpus": gpus, "strategy": strategy if gpus > 1 else "single process",
                 "command": " ".join(cmd[1:])}
    run = out / "response" / "rep0"
    outcome, records = run_train(cmd, env, run, root / f"{strategy}-{gpus}gpu.log", timeout)
    rec.update(outcome)
    if not records:
        return rec
    train = [r for r in records if r["kind"] == "train"]
    first, last = train[0], train[-1]
    steady_tokens = last["tokens"] - first["tokens"]
    tps = [r["tokens_per_s"] for r in train[1:]]
    rec.update(steps=last["step"], tokens=last["tokens"],
               tokens_per_s=round(steady_tokens / sum(
                   (r["tokens"] - p["tokens"]) / r["tokens_per_s"]
                   for p, r in itertools.pairwise(train)), 1),
               tokens_per_s_min=round(min(tps), 1), tokens_per_s_max=round(max(tps), 1),
               final_loss=last["loss"])
    if (peak := peak_memory_gb(train)) is not None:
        rec["gpu_mem_peak_gb"] = peak
    if first.get("energy_j") is not None and last.get("energy_j") is not None:
        rec["j_per_token_steady"] = round((last["energy_j"] - first["energy_j"])
                                          / steady_tokens, 6)
    phases = [json.loads(x) for x in (run / "phases.jsonl").read_text().splitlines()]
    window = next((p for p in phases if p.get("kind") == "phase" and p.get("phase") == "train"),
                  None)
    if window:
        rec["train_window"] = {"duration_s": window["duration_s"], "tokens": window["tokens"],
                               "gpu_j": window["energy_j"]["gpu"],
                               "gpu_j_uncertainty": window["uncertainty_j"]["gpu"],
                               "gpus_metered": len(window.get("per_gpu") or {})}
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/wattkd-multigpu"))
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (Gemma 3's)")
    ap.add_argument("--corpus", default="../shared/data/corpus")
    ap.add_argument("--gpus", default="1,2", help="GPU counts to run")
    ap.add_argument("--strategies", default="ddp,fsdp")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--batch", type=int, default=16, help="micro-batch per GPU")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--timeout", type=int, default=240, help="per run, seconds")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run (gloo)")
    args = ap.parse_args()
    if not args.tiny and not args.tokenizer:
        ap.error("--tokenizer is required (a folder with Gemma 3's tokenizer.json)")
    args.work.mkdir(parents=True, exist_ok=True)
    cfg_path = experiment(args.work, args)

    from wattkd.config import load
    from wattkd.data.shards import build_shards

    cfg = load(cfg_path)
    build_shards(cfg.data, cfg.shards_dir, progress=False)
    records = []
    for gpus in [int(g) for g in args.gpus.split(",")]:
        for strategy in args.strategies.split(","):
            if gpus == 1 and strategy != args.strategies.split(",")[0]:
                continue  # one process: the strategy does not apply
            rec = run_one(cfg_path, args.work, gpus, strategy, args.tiny, args.timeout)
            print(json.dumps(rec), flush=True)
            records.append(rec)
    one = next((r for r in records if r["gpus"] == 1 and r["status"] == "ok"), None)
    for r in records:
        if one and r["status"] == "ok":
            r["scaling_efficiency"] = round(r["tokens_per_s"] / (r["gpus"]
                                                                 * one["tokens_per_s"]), 4)
    result = {"name": "multi_gpu", "card": card(), "date": datetime.now(timezone.utc).isoformat(
              timespec="seconds"), "versions": versions(), "command": " ".join(sys.argv),
              "setup": {"pair": "Gemma-3-270M-shaped teacher (random init) -> 6-layer student "
                                "from its layers" if not args.tiny else "tiny llama (CPU)",
                        "seq": cfg.data.seq_len, "micro_batch_per_gpu": args.batch,
                        "steps": args.steps, "log_every": args.log_every,
                        "method": "response KD (forward KL + 0.5 CE), online teacher"},
              "records": records}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "multi_gpu.json").write_text(json.dumps(result, indent=2))
    print(markdown(result))


def versions() -> dict:
    from wattkd.runinfo import versions as package_versions

    return package_versions(("torch", "transformers", "accelerate", "nvidia-ml-py"))


def markdown(result: dict) -> str:
    head = ("| GPUs | strategy | tokens/s | scaling eff. | J/token (steady) | train window J | "
            "peak GB/GPU | status |")
    lines = [f"Multi-GPU scaling on {result['card']} ({result['date']})", "", head,
             "|---|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        w = r.get("train_window") or {}
        lines.append(f"| {r['gpus']} | {r['strategy']} | {r.get('tokens_per_s', '—')} | "
                     f"{r.get('scaling_efficiency', '—')} | {r.get('j_per_token_steady', '—')} "
                     f"| {w.get('gpu_j', '—')} | {r.get('gpu_mem_peak_gb', '—')} "
                     f"| {r['status'][:80]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
