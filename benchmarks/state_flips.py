"""Single-bit flips in the JSON files a resume or a reader trusts (issue 26): a checkpoint's
state.json and a shard set's manifest.json. Counts how many flips are caught.

    python benchmarks/state_flips.py [--random 60] [--seed 26]

A checkpoint pair (steps 10 and 20 of a small module) and a tiny shard set (bundled corpus)
are written by the installed wattkd. Every bit of state.json of step 20 is flipped in turn
(exhaustive), and `--random` seeded flips of the shard manifest; a state.json flip is caught
when `checkpoint.latest` falls back to step 10, a manifest flip when `read_manifest` raises
ManifestError. Run with PYTHONPATH pointing at an older wattkd to count what it missed.
Writes benchmarks/results/state_flips.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import random
import subprocess
import tempfile
from pathlib import Path

import torch

from wattkd import checkpoint
from wattkd.config import DataConfig, SourceConfig
from wattkd.data.manifest import ManifestError, read_manifest
from wattkd.data.shards import build_shards

HERE = Path(__file__).resolve().parent


def checkpoints(run_dir: Path) -> Path:
    model = torch.nn.Linear(16, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (10, 20):
        checkpoint.save(run_dir, step, module=model, optimizer=opt, scheduler=sched,
                        progress={"samples": step * 8, "tokens": step * 256, "energy_j": 1.5,
                                  "world_size": 1, "strategy": "ddp"},
                        full_weights=True, keep_last=3)
    return run_dir / "checkpoints" / "step_0000020" / "state.json"


def flip(raw: bytes, bit: int) -> bytes:
    bad = bytearray(raw)
    bad[bit // 8] ^= 1 << (bit % 8)
    return bytes(bad)


def state_flips(root: Path) -> dict[str, int]:
    state = checkpoints(root / "run")
    raw = state.read_bytes()
    caught = 0
    for bit in range(len(raw) * 8):
        state.write_bytes(flip(raw, bit))
        try:
            chosen = checkpoint.latest(root / "run")
        except checkpoint.CheckpointError:
            chosen = None
        caught += chosen is not None and chosen.name == "step_0000010"
    state.write_bytes(raw)
    return {"flips": len(raw) * 8, "caught": caught, "bytes": len(raw)}


def manifest_flips(root: Path, n: int, seed: int) -> dict[str, int]:
    cfg = DataConfig(sources=[SourceConfig(path="bundled")], tokenizer="bundled:bpe-4096",
                     seq_len=32, total_tokens=8192, rows_per_part=64, heldout_fraction=0.0)
    build_shards(cfg, root / "shards", progress=False)
    folder = root / "shards" / "train"
    path = folder / "manifest.json"
    raw = path.read_bytes()
    rng = random.Random(seed)
    caught = 0
    n = min(n, len(raw) * 8)           # more than the bits there: every bit
    for bit in rng.sample(range(len(raw) * 8), n):
        path.write_bytes(flip(raw, bit))
        try:
            read_manifest(folder)
        except ManifestError:
            caught += 1
    path.write_bytes(raw)
    return {"flips": n, "caught": caught, "bytes": len(raw)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random", type=int, default=60)
    ap.add_argument("--seed", type=int, default=26)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "state_flips.json")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        result = {"state_json": state_flips(root),
                  "shard_manifest": manifest_flips(root, args.random, args.seed)}
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, cwd=HERE, check=False).stdout.strip()
    result.update(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  machine=platform.processor() or platform.machine(), git=sha,
                  wattkd=checkpoint.__file__)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
