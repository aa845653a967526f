"""Teacher farm benchmark: cache throughput, bytes/token, J/token; KD from cache vs online.

    python benchmarks/teacher_cache.py --out DIR [--tiny] [--encodings packed,fp16,raw]

One invocation, one GPU, one process, writes DIR/teacher_cache.json:
1. Shards: the bundled corpus tokenized with a word-level tokenizer padded to the pair's
   vocabulary (262,144 by default, the Gemma 3 size: the LM head and the top-k search cost
   what they cost with a real 262k vocabulary; `--tokenizer` takes a real one instead).
2. Teacher cache (`wattkd.teacher_cache.build_cache`, the code `wattkd teacher cache` runs)
   once per encoding: tokens/s over the build's `teacher_cache` phase window, bytes/token
   (total and top-k only), J/token from that window (NVML energy counter).
3. KD loss of the same student on the same batches from each encoding's cache, relative to the
   raw (fp32, uncompressed) cache, and the dense online loss for scale (what top-k drops).
4. KD training, the same pair, batches and steps, timed (warm-up excluded) and metered
   (`train_cache` / `train_online` phase windows): student step fed by `CachedTeacher` (no
   teacher on the GPU) vs by `OnlineTeacher`. The step is train.py's: DistillObjective (fused
   chunked logit loss), bf16 autocast, grad clipping, AdamW.
5. Amortisation: energy per student trained on the cached tokens, online vs cache (build
   energy shared by n students), and the break-even n.

Pair: a Gemma 3 270M-shaped teacher (random init, seeded: speed does not depend on weight
values) and a 6-layer student copied from its layers 0,3,6,9,12,17. A random teacher's
next-token distributions are flatter than a trained one's, so its cache compresses worse
than a real teacher's: the bytes/token here are an upper bound; RESULTS.md also gives the
figure measured with the real Gemma 3 270M weights on CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pair import GEMMA_270M, STUDENT_LAYERS

TINY = {"model_type": "llama", "vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "tie_word_embeddings": True, "initializer_range": 0.5}
TINY_LAYERS = [0, 3]
log = logging.getLogger("bench.teacher_cache")


# ---------------------------------------------------------------------------------- setup
def word_tokenizer(out: Path, vocab: int) -> Path:
    """A word-level fast tokenizer over the bundled corpus, padded to exactly `vocab` ids."""
    if (out / "tokenizer.json").is_file():
        return out
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from wattkd import corpus

    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"]
    counts = Counter(w for doc in corpus.documents("all") for w in doc.split())
    words = [w for w, _ in counts.most_common(vocab - len(specials))]
    table = {t: i for i, t in enumerate(specials + words)}
    for i in range(len(table), vocab):
        table[f"<|fill{i}|>"] = i
    tok = Tokenizer(models.WordLevel(table, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>",
                                   eos_token="<|eos|>", pad_token="<|pad|>",
                                   unk_token="<|unk|>")
    fast.save_pretrained(str(out))
    return out


def experiment(args: argparse.Namespace, work: Path, tokenizer: str, arch: dict,
               encoding: str) -> dict:
    return {
        "name": "bench-cache", "output_dir": str(work / "exp"),
        "data": {"tokenizer": tokenizer, "seq_len": args.seq, "total_tokens": args.tokens,
                 "shards_dir": str(work / "shards"), "heldout_fraction": 0.0,
                 "rows_per_part": args.rows_per_part},
        "teacher": {**({"model": args.teacher} if args.teacher else {"build": arch}),
                    "dtype": "bfloat16" if args.device == "cuda" else "float32"},
        "student": {"from_teacher_layers": TINY_LAYERS if args.tiny else STUDENT_LAYERS},
        "distill": {"methods": [{"name": "response", "method": "response", "losses": [
            {"name": "forward_kl", "params": {"temperature": 1.0}}]}],
            "cache_top_k": args.k, "cache_dir": str(work / f"cache_{encoding}"),
            "logit_chunk_tokens": args.chunk},
        "train": {"micro_batch_size": args.batch, "device": args.device, "seed": 0,
                  "tensorboard": False},
        "telemetry": {"idle_seconds": args.idle_seconds,
                      "cpu_watts_per_core": 10.0 if args.device == "cpu" else None},
    }


# ------------------------------------------------------------------------------------ data
def batches(cfg: Any, batch: int, seed: int = 0):
    """Batches in ShardDataset's seeded order, each with its global rows (batch['row'])."""
    from wattkd.data.loader import ShardDataset, collate, epoch_permutation

    ds = ShardDataset(cfg.shards_dir / "train", seed=seed, shuffle=True, loop=True)
    part_rows = [p["rows"] for p in ds.manifest["parts"]]
    g, epoch_of, order = 0, -1, None
    buf, rows = [], []
    while True:
        epoch, pos = divmod(g, ds.num_rows)
        if epoch != epoch_of:
            order, epoch_of = epoch_permutation(part_rows, seed, epoch), epoch
        row = int(order[pos])
        buf.append(ds.row(row))
        rows.append(row)
        g += 1
        if len(buf) == batch:
            out = collate(buf)
            out["row"] = torch.tensor(rows)
            yield out
            buf, rows = [], []


# ---------------------------------------------------------------------------------- phases
def cache_figures(cache_dir: Path) -> dict:
    from wattkd.teacher_cache import read_cache_manifest

    m = read_cache_manifest(cache_dir)
    e = m["energy"]
    last = e["sessions"][-1]
    seconds = last.get("duration_s") or float("nan")
    return {"tokens": m["tokens"], "seconds": round(seconds, 3),
            "tokens_per_s": round(m["tokens"] / seconds, 1),
            "bytes_per_token": round(m["bytes"]["per_token"], 2),
            "bytes_per_token_by_signal": {k: round(v, 2) for k, v in
                                          m["bytes"]["per_token_by_signal"].items()},
            "energy_j": e["energy_j"], "energy_source": e["source"],
            "estimated": e["estimated"], "j_per_token": e["j_per_token"],
            "uncertainty_j": last.get("uncertainty_j"), "flags": last.get("flags"),
            "signals": m["signals"]["spec"], "encoding": m["encoding"]}


def make_student(cfg: Any, teacher: Any, device: torch.device):
    from wattkd.models import build_student, student_frozen_dtype

    bf16 = device.type == "cuda"  # the benchmark's autocast
    student = build_student(cfg.student, teacher=teacher,
                            vocab_size=teacher.config.vocab_size, seed=0,
                            frozen_dtype=student_frozen_dtype(cfg.student, bf16))
    return student.to(device)


def objective_for(cfg: Any, student: Any, teacher: Any, device: torch.device):
    """The response-KD objective over the compared vocabulary (the tokenizer's, as cached)."""
    from wattkd.distill.modes import make_mode
    from wattkd.distill.objective import DistillObjective
    from wattkd.models import teacher_dims
    from wattkd.teacher_cache import read_cache_manifest

    m = cfg.method("response")
    mode = make_mode(m, student, teacher_dims(None, model=teacher))
    vocab = read_cache_manifest(cfg.cache_dir)["teacher"]["vocab"]
    return DistillObjective(student, mode, m, vocab=vocab,
                            chunk_tokens=cfg.distill.logit_chunk_tokens).to(device)


@torch.no_grad()
def kd_losses(cfgs: dict[str, Any], teacher_cpu: Any, teacher_dev: Any | None,
              device: torch.device, n_batches: int) -> dict:
    """Loss of one fixed student on the same batches from each cache (and online, dense)."""
    from wattkd.distill.objective import StepInputs
    from wattkd.distill.teacher import OnlineTeacher
    from wattkd.teacher_cache import CachedTeacher

    any_cfg = next(iter(cfgs.values()))
    student = make_student(any_cfg, teacher_cpu, device)
    obj = objective_for(any_cfg, student, teacher_cpu, device)
    providers: dict[str, Any] = {enc: CachedTeacher(c, obj.request, rank=0, world_size=1,
                                                    device=device) for enc, c in cfgs.items()}
    if teacher_dev is not None:
        providers["online_dense"] = OnlineTeacher(teacher_dev, obj.request)
    sums = dict.fromkeys(providers, 0.0)
    it = batches(any_cfg, any_cfg.train.micro_batch_size, seed=123)
    for _ in range(n_batches):
        b = next(it)
        inputs = StepInputs.from_batch(b, device)
        for name, p in providers.items():
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss, _ = obj(inputs, p.signals(b))
            sums[name] += float(loss) / n_batches
    ref = sums.get("raw")
    return {"loss": sums, "rel_vs_raw": None if ref is None else
            {k: abs(v - ref) / abs(ref) for k, v in sums.items()}}


def train_timed(kind: str, cfg: Any, teacher_cpu: Any, teacher_dev: Any | None,
                device: torch.device, meter: Any, steps: int, warmup: int) -> dict:
    """train.py's student step, fed by the cache or by the online teacher; timed and metered."""
    from wattkd.distill.objective import StepInputs
    from wattkd.distill.teacher import OnlineTeacher
    from wattkd.teacher_cache import CachedTeacher

    student = make_student(cfg, teacher_cpu, device)
    obj = objective_for(cfg, student, teacher_cpu, device)
    provider = (CachedTeacher(cfg, obj.request, rank=0, world_size=1, device=device)
                if kind == "cache" else OnlineTeacher(teacher_dev, obj.request))
    params = [p for p in obj.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    it = batches(cfg, cfg.train.micro_batch_size, seed=0)
    if kind == "cache":
        it = provider.prefetch(it)   # reads the next batches' cache rows during the step
    tokens_per_step = cfg.train.micro_batch_size * cfg.data.seq_len
    cuda = device.type == "cuda"

    def step() -> float:
        b = next(it)
        inputs = StepInputs.from_batch(b, device)
        signals = provider.signals(b)
        with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
            loss, _ = obj(inputs, signals)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses = []
    with meter.phase(f"train_{kind}", tokens=0) as w:
        t0 = time.perf_counter()
        for _ in range(steps):
            losses.append(step())
            w.add_tokens(tokens_per_step)
        sync()
        seconds = time.perf_counter() - t0
    rec = w.record or {}
    tokens = steps * tokens_per_step
    e = (rec.get("energy_j") or {}).get("gpu")
    src = (rec.get("source") or {}).get("gpu", "unavailable")
    if e is None and (rec.get("energy_j") or {}).get("cpu") is not None:
        e, src = rec["energy_j"]["cpu"], rec["source"]["cpu"]
    out = {"steps": steps, "tokens": tokens, "seconds": round(seconds, 3),
           "tokens_per_s": round(tokens / seconds, 1), "energy_j": e, "energy_source": src,
           "estimated": src.startswith("estimated"),
           "j_per_token": None if e is None else e / tokens,
           "uncertainty_j": (rec.get("uncertainty_j") or {}).get("gpu"),
           "flags": rec.get("flags", []), "first_loss": losses[0], "last_loss": losses[-1],
           "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None}
    return out


def amortise(cache: dict, online: dict, cached: dict) -> dict:
    """Energy per student trained on the cached tokens (one pass), online vs from cache."""
    n_tok = cache["tokens"]
    if None in (cache["energy_j"], online["j_per_token"], cached["j_per_token"]):
        return {"note": "energy unavailable: no amortisation figures"}
    e_online = online["j_per_token"] * n_tok
    e_cached_train = cached["j_per_token"] * n_tok
    saving = e_online - e_cached_train
    per_n = {str(n): round(e_cached_train + cache["energy_j"] / n, 3) for n in (1, 2, 4, 8)}
    return {"tokens_per_student": n_tok, "online_j_per_student": round(e_online, 3),
            "cache_build_j": cache["energy_j"],
            "cached_train_j_per_student": round(e_cached_train, 3),
            "cached_total_j_per_student_by_n": per_n,
            "break_even_students": None if saving <= 0 else
            round(cache["energy_j"] / saving, 3),
            "formula": "per student: online = J/token_online x T; cached = J/token_cache x T + "
                       "E_build / n (T = cached tokens, one pass each)"}


# ---------------------------------------------------------------------------------- helpers
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else \
        (platform.processor() or platform.machine())


def versions() -> dict:
    from wattkd.runinfo import versions as package_versions

    return package_versions(("torch", "transformers", "pyarrow", "nvidia-ml-py", "tokenizers"))


def markdown(r: dict) -> str:
    su = r["setup"]
    lines = [(f"Teacher cache on {r['card']} ({r['date']}): {su['teacher']}, k={su['k']}, "
              f"seq {su['seq_len']}, batch {su['batch']}"),
             "", ("| encoding | tokens/s | bytes/token | top-k bytes/token | J/token | "
                  "KD loss rel. to raw |"), "|---|---|---|---|---|---|"]
    rel = (r.get("kd_loss") or {}).get("rel_vs_raw") or {}
    for enc, c in r["cache"].items():
        jpt = "n/a" if c["j_per_token"] is None else f"{c['j_per_token']:.3g}" + \
            (" (estimated)" if c["estimated"] else "")
        lines.append(f"| {enc} | {c['tokens_per_s']:,.0f} | {c['bytes_per_token']:.1f} | "
                     f"{c['bytes_per_token_by_signal'].get('topk', 0):.1f} | {jpt} | "
                     f"{rel.get(enc, float('nan')):.2e} |")
    if r["train"]:
        lines += ["", "| KD training | tokens/s | J/token | peak GB |", "|---|---|---|---|"]
    for kind, t in r["train"].items():
        jpt = "n/a" if t["j_per_token"] is None else f"{t['j_per_token']:.3g}" + \
            (" (estimated)" if t["estimated"] else "")
        lines.append(f"| {kind} | {t['tokens_per_s']:,.0f} | {jpt} | {t['peak_mem_gb']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="writes OUT/teacher_cache.json")
    ap.add_argument("--work", type=Path, help="shards/caches folder (default OUT/work)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny pair")
    ap.add_argument("--tokenizer", help="tokenizer spec (default: word-level, pair's vocab)")
    ap.add_argument("--teacher", help="HF folder of a real teacher (its tokenizer too) instead "
                    "of the random Gemma-shaped one; e.g. Gemma 3 270M for realistic bytes/token")
    ap.add_argument("--skip-train", action="store_true", help="cache figures and KD loss only")
    ap.add_argument("--encodings", default="packed,fp16,raw")
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=2_097_152, help="tokens cached")
    ap.add_argument("--rows-per-part", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=1024, help="logit chunk tokens")
    ap.add_argument("--steps", type=int, default=200, help="timed steps (>= 10 s windows)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--loss-batches", type=int, default=8)
    ap.add_argument("--idle-seconds", type=float, default=2.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.tiny:
        args.seq, args.tokens, args.rows_per_part = 64, 16384, 64
        args.steps, args.warmup, args.loss_batches, args.k = 4, 1, 2, 16
        args.idle_seconds = 0.0
    args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    device = torch.device(args.device)
    arch = TINY if args.tiny else GEMMA_270M
    if args.teacher:
        conf = json.loads((Path(args.teacher) / "config.json").read_text())
        arch = {k: v for k, v in conf.items() if not k.startswith("_")}
        args.tokenizer = args.tokenizer or args.teacher
    work = args.work or args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    encodings = args.encodings.split(",")
    if "raw" in encodings:  # the reference first: every other encoding is compared to it
        encodings = ["raw"] + [e for e in encodings if e != "raw"]

    from wattkd.config import validate
    from wattkd.data.shards import build_shards
    from wattkd.energy.ledger import make_meter
    from wattkd.teacher_cache import build_cache

    tokenizer = args.tokenizer or ("bundled:bpe-4096" if args.tiny else
                                   str(word_tokenizer(work / "tokenizer", arch["vocab_size"])))
    cfgs = {enc: validate(experiment(args, work, tokenizer, arch, enc)) for enc in encodings}
    first = cfgs[encodings[0]]
    t0 = time.perf_counter()
    summary = build_shards(first.data, first.shards_dir, progress=False)
    log.info("shards: %s tokens in %.1f s", summary["train"]["tokens"], time.perf_counter() - t0)

    cache: dict[str, dict] = {}
    for enc, cfg in cfgs.items():
        build_cache(cfg, f"topk:{args.k}", progress=False, encoding=enc, overwrite=True)
        cache[enc] = cache_figures(cfg.cache_dir)
        log.info("cache %s: %s", enc, json.dumps(cache[enc]))
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

    def online_teacher(dev: torch.device) -> Any:
        from wattkd.models import load_teacher

        return load_teacher(first.teacher, device=dev, vocab_size=arch["vocab_size"],
                            seed=first.train.seed)

    teacher_cpu = online_teacher(torch.device("cpu")).float()
    teacher_dev = None

    train: dict[str, dict] = {}
    if not args.skip_train:
        meter = make_meter(first.telemetry, work / "train_meter")
        with meter:
            # cache first: no teacher on the GPU while the cached student trains
            cached_cfg = cfgs["packed"] if "packed" in cfgs else cfgs[encodings[-1]]
            train["cache"] = train_timed("cache", cached_cfg, teacher_cpu, None, device, meter,
                                         args.steps, args.warmup)
            gc.collect()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            teacher_dev = online_teacher(device)
            train["online"] = train_timed("online", first, teacher_cpu, teacher_dev, device,
                                          meter, args.steps, args.warmup)
    if teacher_dev is None:
        teacher_dev = teacher_cpu if device.type == "cpu" else online_teacher(device)
    kd = kd_losses(cfgs, teacher_cpu, teacher_dev, device, args.loss_batches)

    packed = cache.get("packed") or cache[encodings[-1]]
    result = {
        "name": "teacher_cache", "card": card(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv), "versions": versions(),
        "setup": {"teacher": args.teacher or ("tiny llama (random init)" if args.tiny else
                                              "Gemma 3 270M shape (random init)"),
                  "teacher_arch": arch,
                  "student_layers": TINY_LAYERS if args.tiny else STUDENT_LAYERS,
                  "tokenizer": tokenizer, "vocab": arch["vocab_size"], "seq_len": args.seq,
                  "tokens_cached": summary["train"]["tokens"], "k": args.k,
                  "batch": args.batch, "train_steps": args.steps, "warmup": args.warmup,
                  "teacher_dtype": first.teacher.dtype, "device": args.device},
        "cache": cache, "kd_loss": kd, "train": train,
        "speedup_cache_vs_online": round(train["cache"]["tokens_per_s"] /
                                         train["online"]["tokens_per_s"], 3) if train else None,
        "amortisation": amortise(packed, train["online"], train["cache"]) if train else None,
        "notes": [("random-init teacher: flatter distributions than a trained one, so its "
                   "top-k caches compress worse (bytes/token is an upper bound)"),
                  ("energy windows shorter than telemetry.min_window_s carry the "
                   "'short-window' flag: counter quantisation dominates them")],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "teacher_cache.json").write_text(json.dumps(result, indent=2, default=str))
    print(markdown(result))


if __name__ == "__main__":
    main()
