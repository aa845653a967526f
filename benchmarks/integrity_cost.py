"""What the integrity checks on every read cost: shard parts opened with and without the
streamed sha256 (+ vocabulary check), and the sha256 throughput a teacher-cache part's first
open pays.

    python benchmarks/integrity_cost.py [--copies 1] [--repeats 7]

Shards: `build_shards` on the bundled corpus (x copies), seq_len 1024, 512 rows per part, the
real format. Each repeat reads every part once through `ShardDataset.part_ids` (a fresh
dataset, so nothing is cached in it) with verify="size" (the default: sha256 streamed while the
part is read, token ids checked against the vocabulary) and verify="none" (neither), in
alternating order. The OS page cache is warm for both (the files were just written/read), so
the difference is the CPU cost of hashing and checking, the part that matters when the reader
is not I/O bound. Writes benchmarks/results/integrity_cost.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)

    from wattkd.config import validate
    from wattkd.data.loader import ShardDataset
    from wattkd.data.shards import build_shards
    from wattkd.hashing import file_sha256

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sources = [{"path": "bundled", "name": f"copy{i}", "weight": 1.0}
                   for i in range(args.copies)]
        cfg = validate({"name": "ic", "output_dir": str(root / "out"),
                        "data": {"tokenizer": "bundled:bpe-4096", "seq_len": 1024,
                                 "sources": sources, "rows_per_part": 512,
                                 "heldout_fraction": 0.0, "shards_dir": str(root / "shards")},
                        "teacher": {"build": {"model_type": "llama"}},
                        "student": {"build": {"model_type": "llama"}}})
        build_shards(cfg.data, cfg.shards_dir, progress=False)
        path = cfg.shards_dir / "train"
        probe = ShardDataset(path, shuffle=False, verify="none")
        parts = len(probe.manifest["parts"])
        nbytes = sum(p["bytes"] for p in probe.manifest["parts"])
        tokens = probe.num_rows * probe.seq_len
        times: dict[str, list[float]] = {"size": [], "none": []}
        for r in range(args.repeats):
            for level in (("size", "none") if r % 2 == 0 else ("none", "size")):
                ds = ShardDataset(path, shuffle=False, verify=level)
                t0 = time.perf_counter()
                for i in range(parts):
                    ds.part_ids(i)
                times[level].append(time.perf_counter() - t0)
        files = sorted(path.glob("part-*.parquet"))
        hash_s = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for f in files:
                file_sha256(f)
            hash_s.append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/integrity_cost.py " + " ".join(argv or sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
        "shards": {"parts": parts, "bytes": nbytes, "tokens": tokens, "seq_len": 1024},
        "read_s_median": med, "read_s_all": times,
        "overhead_pct": round(100 * (med["size"] - med["none"]) / med["none"], 1),
        "verified_tokens_per_s": round(tokens / med["size"]),
        "unverified_tokens_per_s": round(tokens / med["none"]),
        "sha256_mb_per_s": round(nbytes / statistics.median(hash_s) / 1e6, 1),
    }
    out = HERE / "results" / "integrity_cost.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("shards", "read_s_median", "overhead_pct",
                                             "verified_tokens_per_s",
                                             "unverified_tokens_per_s", "sha256_mb_per_s")},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
