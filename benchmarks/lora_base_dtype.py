"""Frozen LoRA base in fp32 vs bf16 (`student.dtype`): peak GPU memory, speed, same losses.

    python benchmarks/lora_base_dtype.py --out DIR --tokenizer TOK [--tiny]

Runs `wattkd train` twice on the same shards and seed, a LoRA student (r16 on every linear
layer) trained with the CE baseline in bf16, once with `student.dtype: float32` and once with
`bfloat16`, and reads each run's own log: peak allocated GPU memory (largest rank), tokens/s
after the first logged interval, and the per-step losses (the bf16 base must not change them:
autocast rounds an fp32 weight to bf16 before every matmul anyway).

Student: Llama-3.2-1B-shaped (16 layers, hidden 2048, MLP 8192, GQA 32/8; random init: memory
and speed do not depend on weight values) with the vocabulary of --tokenizer.
--gpus N --strategy fsdp: the same under torchrun (written to lora_base_dtype_fsdpN.json).
--tiny: a CPU smoke run (small model, bundled tokenizer).
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
from train_runs import card, peak_memory_gb, run_train

LLAMA_1B = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
            "max_position_embeddings": 8192, "tie_word_embeddings": True}
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128}


def experiment(root: Path, args: argparse.Namespace) -> Path:
    """The YAML, and the random-init student saved as a pretrained base (LoRA under FSDP saves
    adapters, which need a loadable base)."""
    from wattkd.data.tokenizer import load_tokenizer
    from wattkd.models import build_from_config

    model = TINY if args.tiny else LLAMA_1B
    tokenizer = "bundled:bpe-4096" if args.tiny else args.tokenizer
    base = root / "student-base"
    if not (base / "config.json").exists():
        vocab = len(load_tokenizer(tokenizer))
        build_from_config(model, vocab, seed=0).save_pretrained(base)
    data = {
        "name": "lora-base",
        "output_dir": str(root / "runs"),
        "data": {"sources": [{"path": "bundled"}] if args.tiny else
                 [{"path": str(Path(args.corpus).resolve())}],
                 "tokenizer": tokenizer,
                 "seq_len": 64 if args.tiny else args.seq,
                 "total_tokens": 100_000 if args.tiny else None, "heldout_fraction": 0.0,
                 "num_workers": 2 if args.tiny else 8, "shards_dir": str(root / "shards")},
        "teacher": {"build": model},  # never loaded: the CE baseline needs no teacher
        "student": {"model": str(base), "lora": {"r": 16, "alpha": 32, "dropout": 0.0,
                                                 "merge_on_save": False}},
        "distill": {"methods": [{"name": "baseline", "method": "none",
                                 "losses": [{"name": "ce"}]}]},
        "train": {"max_steps": args.steps, "micro_batch_size": args.batch,
                  "log_every": args.log_every, "tensorboard": False, "lr": 1e-4,
                  "schedule": "constant", "checkpoint_every": 0, "precision": "bf16",
                  "device": "cpu" if args.tiny else "auto"},
        "telemetry": {"idle_seconds": 0},
    }
    path = root / "lora-base.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_one(cfg: Path, root: Path, dtype: str, repeat: int, args: argparse.Namespace) -> dict:
    out = root / f"base-{dtype}-{repeat}"
    launch = ([] if args.gpus == 1 else
              ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}"])
    cmd = [sys.executable, *launch, "-m", "wattkd.cli", "train", str(cfg), "--method",
           "baseline", "--set", f"output_dir={out}", "--set", f"student.dtype={dtype}",
           "--set", f"train.strategy={args.strategy}"]
    rec: dict = {"student_dtype": dtype, "repeat": repeat, "gpus": args.gpus,
                 "strategy": args.strategy, "command": " ".join(cmd[1:])}
    outcome, records = run_train(cmd, {**os.environ, "OMP_NUM_THREADS": "4"},
                                 out / "baseline" / "rep0",
                                 root / f"base-{dtype}-{repeat}.log", args.timeout)
    rec.update(outcome)
    if not records:
        return rec
    train = [r for r in records if r["kind"] == "train"]
    steady = train[1:] or train
    rec.update(steps=train[-1]["step"],
               tokens_per_s=round(sum(r["tokens_per_s"] for r in steady) / len(steady), 1),
               losses={r["step"]: r["loss"] for r in records if r["kind"] in ("train", "step")})
    rec["gpu_mem_peak_gb"] = peak_memory_gb(train)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/wattkd-lora-base"))
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder")
    ap.add_argument("--corpus", default="../shared/data/corpus")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--timeout", type=int, default=240, help="per run, seconds")
    ap.add_argument("--repeats", type=int, default=2, help="runs per dtype, alternating")
    ap.add_argument("--gpus", type=int, default=1, help="processes (torchrun when > 1)")
    ap.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run")
    args = ap.parse_args()
    if not args.tiny and not args.tokenizer:
        ap.error("--tokenizer is required")
    args.work.mkdir(parents=True, exist_ok=True)
    cfg_path = experiment(args.work, args)

    from wattkd.config import load
    from wattkd.data.shards import build_shards
    from wattkd.runinfo import versions

    cfg = load(cfg_path)
    build_shards(cfg.data, cfg.shards_dir, progress=False)
    # Alternating order, so drift of the card (clocks, temperature) does not favour one side.
    records = [run_one(cfg_path, args.work, dtype, rep, args)
               for rep in range(args.repeats) for dtype in ("float32", "bfloat16")]
    ok = [r for r in records if r["status"] == "ok"]
    fp32 = [r for r in ok if r["student_dtype"] == "float32"]
    bf16 = [r for r in ok if r["student_dtype"] == "bfloat16"]
    same = noise = None
    if fp32 and bf16:
        same = max_rel_difference(fp32[0]["losses"], bf16[0]["losses"])
    if len(fp32) > 1:  # two fp32 runs: the card's own run-to-run difference
        noise = max_rel_difference(fp32[0]["losses"], fp32[1]["losses"])
    result = {"name": "lora_base_dtype", "card": card(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "versions": versions(("torch", "transformers", "peft", "accelerate")),
              "command": " ".join(sys.argv),
              "setup": {"student": "tiny llama" if args.tiny else
                        "Llama-3.2-1B-shaped (random init), LoRA r16 all linear layers",
                        "vocab": cfg.data.tokenizer, "seq": cfg.data.seq_len,
                        "micro_batch": args.batch, "steps": args.steps, "gpus": args.gpus,
                        "strategy": args.strategy,
                        "method": "CE baseline, train.precision bf16"},
              "max_relative_loss_difference": {"fp32_vs_bf16_base": same,
                                               "fp32_vs_fp32_rerun": noise},
              "records": records}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "lora_base_dtype" + ("" if args.gpus == 1 else f"_{args.strategy}{args.gpus}")
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(f"LoRA frozen base dtype on {result['card']}: max relative loss difference "
          f"{same} (fp32 rerun: {noise})")
    print("| student.dtype | repeat | peak GB | tokens/s | status |\n|---|---|---|---|---|")
    for r in records:
        print(f"| {r['student_dtype']} | {r['repeat']} | {r.get('gpu_mem_peak_gb')} | "
              f"{r.get('tokens_per_s', '—')} | {r['status'][:80]} |")


def max_rel_difference(a: dict, b: dict) -> float:
    """Largest relative difference of two runs' per-step losses."""
    return max(abs(b[s] - a[s]) / abs(a[s]) for s in sorted(a))


if __name__ == "__main__":
    main()
