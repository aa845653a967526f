"""Shard-building throughput against plain `datasets.Dataset.map` tokenization, same input.

    python benchmarks/shards.py [--copies 4] [--repeats 3] [--workers 1 2]

Input: the bundled corpus (all four sub-corpora) repeated `--copies` times, written once as a
JSONL file that both sides read. Tokenizer: bundled:bpe-4096 (trained/cached first, not
timed). Each side is timed end to end from the JSONL file, in the same process, runs
alternating, `--repeats` times:

  wattkd      build_shards(): read + tokenize (+EOS) + pack + Parquet (zstd) + sha256 + manifest
              (heldout_fraction 0, so all documents go through the same path)
  datasets    load_dataset("json") into a fresh cache folder, then
              .map(tokenizer(batch["text"]), batched=True, num_proc=n) (Arrow cache files)
              The map-only time is recorded too.

Throughput = text tokens (the same count for both: tokens of the documents, not counting the
EOS wattkd adds) / wall seconds. Writes benchmarks/results/shards.json and
benchmarks/RESULTS.shards.md. The machine may be shared: the load average is recorded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cpu_seconds() -> float:
    """User+system CPU of this process and its reaped children (worker pools)."""
    import resource

    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                  resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    import psutil

    return {
        "cpu": cpu_model(), "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else None,
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(), "python": platform.python_version(),
    }


def versions() -> dict:
    from wattkd.runinfo import versions as package_versions

    return package_versions(("wattkd", "tokenizers", "transformers", "datasets", "pyarrow",
                             "numpy"))


def time_wattkd(jsonl: Path, workers: int, work: Path) -> dict:
    from wattkd.config import DataConfig, SourceConfig
    from wattkd.data.shards import build_shards

    out = work / f"shards-w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = DataConfig(sources=[SourceConfig(path=str(jsonl))], tokenizer="bundled:bpe-4096",
                     seq_len=1024, heldout_fraction=0.0, num_workers=workers)
    c0, t0 = cpu_seconds(), time.perf_counter()
    summary = build_shards(cfg, out, progress=False)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens_with_eos": summary["train"]["tokens"]
            + summary["train"]["dropped_tokens"]}


def time_datasets(jsonl: Path, workers: int, work: Path, tok) -> dict:
    import datasets

    cache = work / f"hf-cache-w{workers}"
    shutil.rmtree(cache, ignore_errors=True)
    c0, t0 = cpu_seconds(), time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(jsonl), split="train",
                               cache_dir=str(cache))
    t1 = time.perf_counter()
    mapped = ds.map(lambda b: tok(b["text"]), batched=True, num_proc=workers if workers > 1
                    else None, remove_columns=["text"], load_from_cache_file=False,
                    desc=None)
    t2, cpu = time.perf_counter(), cpu_seconds() - c0
    n_tokens = sum(len(x) for x in mapped["input_ids"])
    del ds, mapped
    shutil.rmtree(cache, ignore_errors=True)
    return {"seconds": t2 - t0, "cpu_seconds": cpu, "map_seconds": t2 - t1, "tokens": n_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "shards.json")
    ap.add_argument("--markdown", type=Path, default=HERE / "RESULTS.shards.md")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    from wattkd import corpus
    from wattkd.data.tokenizer import load_tokenizer

    tok = load_tokenizer("bundled:bpe-4096")  # trained and cached here, not timed
    work = Path(tempfile.mkdtemp(prefix="wattkd-bench-"))
    try:
        jsonl = work / "corpus.jsonl"
        docs = list(corpus.documents("all"))
        with open(jsonl, "w", encoding="utf-8") as f:
            for _ in range(args.copies):
                f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        n_docs = len(docs) * args.copies
        chars = sum(len(d) for d in docs) * args.copies
        print(f"input: {n_docs} documents, {chars / 1e6:.1f} M chars, {jsonl.stat().st_size / 1e6:.1f} MB "
              f"JSONL; TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}",
              flush=True)
        time_wattkd(jsonl, 1, work)  # warm-up: imports, page cache
        runs: dict[str, list[dict]] = {}
        load = [os.getloadavg()]
        for rep in range(args.repeats):
            for w in args.workers:
                for impl in (("wattkd", "datasets") if rep % 2 == 0 else ("datasets", "wattkd")):
                    r = time_wattkd(jsonl, w, work) if impl == "wattkd" else \
                        time_datasets(jsonl, w, work, tok)
                    runs.setdefault(f"{impl}/w{w}", []).append(r)
                    print(f"rep {rep} {impl:8s} workers={w}: {r['seconds']:.2f} s", flush=True)
            load.append(os.getloadavg())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    text_tokens = runs[f"datasets/w{args.workers[0]}"][0]["tokens"]
    eos = runs[f"wattkd/w{args.workers[0]}"][0]["tokens_with_eos"] - text_tokens
    assert eos == n_docs, (eos, n_docs)  # same tokenization on both sides, plus one EOS a doc
    rows = []
    for w in args.workers:
        for impl in ("wattkd", "datasets"):
            secs = [r["seconds"] for r in runs[f"{impl}/w{w}"]]
            cpus = [r["cpu_seconds"] for r in runs[f"{impl}/w{w}"]]
            row = {"impl": impl, "workers": w, "seconds": secs, "cpu_seconds": cpus,
                   "median_s": statistics.median(secs), "best_s": min(secs),
                   "median_cpu_s": statistics.median(cpus),
                   "tokens_per_cpu_s_median": text_tokens / statistics.median(cpus),
                   "tokens_per_s_median": text_tokens / statistics.median(secs),
                   "tokens_per_s_best": text_tokens / min(secs)}
            if impl == "datasets":
                ms = [r["map_seconds"] for r in runs[f"{impl}/w{w}"]]
                row["map_only_median_s"] = statistics.median(ms)
                row["map_only_tokens_per_s_median"] = text_tokens / statistics.median(ms)
            rows.append(row)
    result = {
        "benchmark": "shards", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(), "versions": versions(),
        "env": {"TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "unset")},
        "load_average_1_5_15": load,
        "input": {"documents": n_docs, "chars": chars, "text_tokens": text_tokens,
                  "copies_of_bundled_corpus": args.copies, "tokenizer": "bundled:bpe-4096"},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    args.markdown.write_text(md)
    print(md)


def markdown(r: dict) -> str:
    m, inp = r["machine"], r["input"]
    runs = len(r["results"][0]["seconds"])
    load0 = r["load_average_1_5_15"][0][0]
    load_max = max(x[0] for x in r["load_average_1_5_15"])
    lines = [
        "## Shard building (tokenize + pack + write) vs `datasets.map`",
        "",
        (f"Measured {r['date']} on {m['cpu']} ({m['logical_cpus']} CPUs, {m['ram_gb']} GB "
         f"RAM), no GPU. Command: `{r['command']}`."),
        (f"Input: bundled corpus x{inp['copies_of_bundled_corpus']} = {inp['documents']:,} "
         f"documents, {inp['chars'] / 1e6:.1f} M chars, {inp['text_tokens'] / 1e6:.2f} M "
         f"tokens ({inp['tokenizer']}); "
         f"TOKENIZERS_PARALLELISM={r['env']['TOKENIZERS_PARALLELISM']}."),
        ("Both sides start from the same JSONL file; wattkd = `build_shards` end to end (read, "
         "tokenize, EOS, pack seq_len 1024, Parquet zstd, sha256, manifest); datasets = "
         "`load_dataset('json')` + `Dataset.map(tokenizer, batched=True, num_proc=n)`."),
        (f"Median (best) of {runs} alternating runs; 1-min load average {load0:.1f} at the "
         f"start, {load_max:.1f} at most (shared machine). CPU s = user+system of the process "
         "and its workers."),
        "",
        ("| implementation | workers | wall s | tokens/s | CPU s | tokens per CPU s | "
         "datasets map-only tokens/s |"),
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["results"]:
        extra = f"{row['map_only_tokens_per_s_median'] / 1e3:,.0f}k" \
            if "map_only_tokens_per_s_median" in row else "—"
        lines.append(f"| {row['impl']} | {row['workers']} | {row['median_s']:.2f} "
                     f"({row['best_s']:.2f}) | {row['tokens_per_s_median'] / 1e3:,.0f}k "
                     f"({row['tokens_per_s_best'] / 1e3:,.0f}k) | {row['median_cpu_s']:.1f} | "
                     f"{row['tokens_per_cpu_s_median'] / 1e3:,.0f}k | {extra} |")
    by = {(x["impl"], x["workers"]): x["median_s"] for x in r["results"]}
    ratios = ", ".join(f"{w} worker(s): {by[('datasets', w)] / by[('wattkd', w)]:.2f}x"
                       for w in sorted({x["workers"] for x in r["results"]}))
    lines += [
        "", f"Speed of wattkd relative to datasets (median wall time): {ratios}.", "",
        ("How each side uses the CPUs: wattkd with 1 worker tokenizes in a background thread "
        "(the Rust tokenizer runs its own thread pool) while the main thread reads and packs; "
        "with n workers it forks n processes with one tokenizer thread each. datasets with "
        "num_proc=None tokenizes in-process (same thread pool); with num_proc=n it forks n "
        "processes. wattkd calls `encode_batch_fast` (no character offsets, same ids) and "
        "keeps ids as int32 arrays; datasets' tokenizer call computes offsets and also "
        "stores attention_mask. On a shared machine the wall times swing between runs; the "
        "CPU-seconds columns are the steadier comparison."),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
