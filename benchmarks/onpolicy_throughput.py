"""On-policy distillation step on one GPU: wattkd's `onpolicy` method vs TRL's DistillationTrainer.

    python benchmarks/onpolicy_throughput.py [--device cuda] [--batch 32] [--prompt 128]
        [--completion 128] [--steps 10] [--warmup 3] [--impls wattkd,trl] [--tiny]

Pair (random init, seeded: speed does not depend on weight values): a Gemma-3-270M-shaped
student (benchmarks/pair.py, vocab 262,144) and a wider Gemma-3-1B-shaped teacher (26 layers,
hidden 1152); `--tiny` shrinks both for a CPU check of the script. The same prompts (random
token ids; TRL gets them as text, re-tokenised by the bundled tokenizer), `--completion` tokens
sampled at temperature 1 after each (EOS ignored on both sides, so every step does the same
work), reverse KL (TRL beta=1) on the completion tokens over the full vocabulary, AdamW, grad
clip 1.0, bf16 autocast on CUDA, no gradient checkpointing on either side.

  wattkd  the step `wattkd train` takes for `method: onpolicy` (training/rollouts.RolloutSource ->
          OnlineTeacher -> DistillObjective, the fused chunked LM-head loss), each step inside
          the ledger's `step` window with `rollout`, `score`, `update` windows (StepPhases).
  trl     trl.DistillationTrainer (TRL's on-policy distillation trainer: HF generate, chunked
          divergence), timed from the end of warm-up to the end of the last step.

Figures per implementation: whole-step tokens/s (tokens = batch x (prompt + completion)),
J per training token and per generated token (NVML counter through wattkd's EnergyMeter),
peak GPU memory; for wattkd also each phase's energy, J per rollout / scored / update token,
its share, and the check that the phases sum to the step windows within the stated counter
uncertainty. Writes benchmarks/results/onpolicy_throughput.json (figures, card, date,
versions, command) and prints the RESULTS.md table.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pair import GEMMA_270M

TEACHER_1B = {**GEMMA_270M, "hidden_size": 1152, "intermediate_size": 6912,
              "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1}
TINY_STUDENT = {**GEMMA_270M, "vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "head_dim": 16, "num_attention_heads": 2,
                "max_position_embeddings": 256, "sliding_window": 32,
                "query_pre_attn_scalar": 16}
TINY_TEACHER = {**TINY_STUDENT, "hidden_size": 96, "intermediate_size": 192,
                "num_hidden_layers": 3}
PHASES = ("rollout", "score", "update")


def build(arch: dict, seed: int, device: torch.device, teacher: bool):
    from wattkd.models import build_from_config

    model = build_from_config(arch, arch["vocab_size"], seed=seed)
    if teacher:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return model.to(device, dtype).eval().requires_grad_(False)
    return model.to(device)


def prompts(args, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(8, min(vocab, 4096), (args.batch, args.prompt), generator=g)


def meter_for(run_dir: Path, device: torch.device):
    from wattkd.config import TelemetryConfig
    from wattkd.energy.ledger import EnergyMeter

    cfg = TelemetryConfig(idle_seconds=2.0 if device.type == "cuda" else 0.0,
                          cpu_watts_per_core=None if device.type == "cuda" else 10.0)
    return EnergyMeter(cfg, run_dir, leader=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------- wattkd
def run_wattkd(args, student_arch, teacher_arch, device, out: Path) -> dict:
    from contextlib import nullcontext

    from wattkd.config import LossTerm, MethodConfig
    from wattkd.distill.modes import make_mode
    from wattkd.distill.objective import DistillObjective, StepInputs
    from wattkd.distill.teacher import OnlineTeacher
    from wattkd.energy.metrics import read_phases
    from wattkd.training.rollouts import RolloutSource, StepPhases

    teacher = build(teacher_arch, 0, device, True)
    student = build(student_arch, 1, device, False)
    method = MethodConfig(name="onpolicy", method="onpolicy", losses=[LossTerm(name="reverse_kl")],
                          params={"prompt_tokens": args.prompt, "completion_tokens":
                                  args.completion, "temperature": 1.0, "stop_at_eos": False})
    mode = make_mode(method, student, (teacher_arch["num_hidden_layers"],
                                       teacher_arch["hidden_size"]))
    vocab = student_arch["vocab_size"]
    obj = DistillObjective(student, mode, method, vocab=vocab, chunk_tokens=args.chunk)
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-5,
                            fused=device.type == "cuda")
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16))
                if device.type == "cuda" else nullcontext)
    source = RolloutSource(mode.rollout, student, seed=0, rank=0, device=device,
                           eos_token_id=None, autocast=autocast,
                           decode_dtype=torch.bfloat16 if device.type == "cuda" else None)
    provider = OnlineTeacher(teacher, mode.request)
    batch = {"input_ids": prompts(args, vocab).to(device)}
    tokens = args.batch * (args.prompt + args.completion)
    meter = meter_for(out, device)
    phases = StepPhases(meter, every=1)
    obj.train()

    def step(i: int) -> float:
        with phases.step(i + 1, tokens):
            phases.switch("rollout")
            seqs = source.batch(batch, i, 0)
            phases.switch("rollout", source.last_new_tokens)
            inputs = StepInputs.from_batch(seqs, device)
            phases.switch("score", inputs.input_ids.numel())
            signals = provider.signals(seqs)
            phases.switch("update", inputs.input_ids.numel())
            with autocast():
                loss, _ = obj(inputs, signals)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

    with meter:
        for i in range(args.warmup):
            step(i)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with meter.phase("timed", tokens=tokens * args.steps):
            t0 = time.perf_counter()
            for i in range(args.warmup, args.warmup + args.steps):
                loss = step(i)
            sync(device)
            seconds = time.perf_counter() - t0
    recs = [r for r in read_phases(out) if r.get("kind") == "phase"]
    timed = next(r for r in recs if r["phase"] == "timed")
    first = args.warmup + 1
    steps = [r for r in recs if r["phase"] == "step" and r["meta"]["step"] >= first]
    inner = [r for r in recs if r["phase"] in PHASES and r["meta"]["step"] >= first]
    out_rec = figures(args, seconds, timed, tokens, device)
    out_rec.update(loss=loss, phases=phase_figures(steps, inner))
    return out_rec


def _energy(recs: list[dict], comp: str) -> tuple[float | None, float | None]:
    vals = [r["energy_j"].get(comp) for r in recs]
    uncs = [r["uncertainty_j"].get(comp) for r in recs]
    if not vals or None in vals:
        return None, None
    return float(sum(vals)), (None if None in uncs else float(sum(uncs)))


def component(recs: list[dict]) -> str:
    return "gpu" if all(r["energy_j"].get("gpu") is not None for r in recs) else "cpu"


def phase_figures(steps: list[dict], inner: list[dict]) -> dict:
    """Energy, tokens, J/token and share per phase over the timed steps; the phases' sum
    against the step windows' sum, with both stated uncertainties."""
    comp = component(steps)
    e_steps, u_steps = _energy(steps, comp)
    out: dict = {"component": comp, "steps_energy_j": e_steps, "steps_uncertainty_j": u_steps}
    total, total_unc = 0.0, 0.0
    for name in PHASES:
        recs = [r for r in inner if r["phase"] == name]
        e, u = _energy(recs, comp)
        toks = sum(int(r["tokens"]) for r in recs)
        out[name] = {"energy_j": e, "uncertainty_j": u, "tokens": toks,
                     "seconds": sum(r["duration_s"] for r in recs),
                     "j_per_token": None if e is None or not toks else e / toks,
                     "share": None if e is None or not e_steps else e / e_steps}
        total += e or 0.0
        total_unc += u or 0.0
    out["phases_sum_j"] = total
    out["phases_sum_uncertainty_j"] = total_unc if u_steps is not None else None
    if e_steps is not None and u_steps is not None:
        out["sum_within_uncertainty"] = abs(total - e_steps) <= total_unc + u_steps
    return out


# -------------------------------------------------------------------------------------- trl
def run_trl(args, student_arch, teacher_arch, device, out: Path) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from wattkd.data.tokenizer import load_tokenizer
    from wattkd.energy.metrics import read_phases

    teacher = build(teacher_arch, 0, device, True)
    student = build(student_arch, 1, device, False)
    tok = load_tokenizer("bundled:bpe-4096")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    ids = prompts(args, student_arch["vocab_size"])
    texts = tok.batch_decode(ids.tolist())
    total = args.warmup + args.steps
    ds = Dataset.from_dict({"prompt": texts * (total + 1)})
    prompt_lens = [len(x) for x in tok(texts)["input_ids"]]
    meter = meter_for(out, device)
    tokens = args.batch * (args.prompt + args.completion)
    state: dict = {}

    class Window(TrainerCallback):
        def on_step_begin(self, a, st, control, **kw):
            if st.global_step == args.warmup and "w" not in state:
                sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                state["w"] = meter.phase("timed", tokens=tokens * args.steps)
                state["w"].__enter__()
                state["t0"] = time.perf_counter()

        def on_step_end(self, a, st, control, **kw):
            if st.global_step == total:
                sync(device)
                state["seconds"] = time.perf_counter() - state["t0"]
                state["w"].__exit__(None, None, None)

    cfg = DistillationConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=args.batch, max_steps=total,
        bf16=device.type == "cuda", use_cpu=device.type != "cuda", beta=1.0, temperature=1.0,
        max_completion_length=args.completion, learning_rate=1e-5, max_grad_norm=1.0,
        gradient_checkpointing=False, logging_steps=10_000, save_strategy="no", report_to=[],
        generation_kwargs={"min_new_tokens": args.completion}, dataloader_num_workers=0,
        seed=0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=cfg,
                                  train_dataset=ds, processing_class=tok, callbacks=[Window()])
    with meter:
        trainer.train()
    timed = next(r for r in read_phases(out) if r.get("kind") == "phase"
                 and r["phase"] == "timed")
    rec = figures(args, state["seconds"], timed, tokens, device)
    rec["prompt_tokens_mean"] = sum(prompt_lens) / len(prompt_lens)
    return rec


# ---------------------------------------------------------------------------------- output
def figures(args, seconds: float, timed: dict, tokens: int, device: torch.device) -> dict:
    comp = component([timed])
    e, u = timed["energy_j"].get(comp), timed["uncertainty_j"].get(comp)
    n = tokens * args.steps
    gen = args.batch * args.completion * args.steps
    return {"seconds": seconds, "steps": args.steps, "tokens": n,
            "tokens_per_s": n / seconds, "step_s": seconds / args.steps,
            "energy_component": comp, "energy_source": timed["source"].get(comp),
            "estimated": timed["estimated"], "energy_j": e, "uncertainty_j": u,
            "j_per_token": None if e is None else e / n,
            "j_per_generated_token": None if e is None else e / gen,
            "peak_memory_gb": (torch.cuda.max_memory_allocated() / 1e9
                               if device.type == "cuda" else None),
            "flags": timed.get("flags", [])}


def versions() -> dict:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__}
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        out["trl"] = None
    return out


def card(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"


def table(results: dict) -> str:
    rows = ["| impl | tok/s | step s | J/token | J/gen token | peak GB |",
            "|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | error: {r['error'][:60]} | | | | |")
            continue
        def f(v, spec):
            return "n/a" if v is None else format(v, spec)
        rows.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | "
                    f"{f(r['j_per_token'], '.3g')} | {f(r['j_per_generated_token'], '.3g')} | "
                    f"{f(r['peak_memory_gb'], '.2f')} |")
    ph = results.get("wattkd", {}).get("phases")
    if ph:
        rows += ["", "| wattkd phase | J | share | tokens | J/token |", "|---|---|---|---|---|"]
        for name in PHASES:
            p = ph[name]
            e = "n/a" if p["energy_j"] is None else f"{p['energy_j']:.4g}"
            s = "n/a" if p["share"] is None else f"{100 * p['share']:.1f}%"
            j = "n/a" if p["j_per_token"] is None else f"{p['j_per_token']:.3g}"
            rows.append(f"| {name} | {e} | {s} | {p['tokens']} | {j} |")
        rows.append(f"| sum vs steps | {ph['phases_sum_j']:.4g} vs {ph['steps_energy_j']} | "
                    f"within uncertainty: {ph.get('sum_within_uncertainty')} | | |")
    if "wattkd" in results and "trl" in results and "error" not in results["trl"] \
            and "error" not in results["wattkd"]:
        ratio = results["wattkd"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
        rows.append(f"\nwattkd / TRL whole-step throughput: {ratio:.2f}x")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--completion", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=4096, help="fused loss chunk (tokens)")
    ap.add_argument("--impls", default="wattkd,trl")
    ap.add_argument("--tiny", action="store_true", help="tiny models (CPU check of the script)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" /
                    "onpolicy_throughput.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    student_arch, teacher_arch = ((TINY_STUDENT, TINY_TEACHER) if args.tiny
                                  else (GEMMA_270M, TEACHER_1B))
    results: dict = {}
    runners = {"wattkd": run_wattkd, "trl": run_trl}
    for name in args.impls.split(","):
        with tempfile.TemporaryDirectory(prefix=f"onpolicy-{name}-") as tmp:
            try:
                results[name] = runners[name](args, student_arch, teacher_arch, device,
                                              Path(tmp))
            except Exception as exc:  # noqa: BLE001 - a peer that fails is a row, not a crash
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        gc.collect()   # the finished implementation's models, before the next one's peak
        if device.type == "cuda":
            torch.cuda.empty_cache()
    doc = {"benchmark": "onpolicy_throughput", "card": card(device), "device": str(device),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "versions": versions(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "student": student_arch, "teacher": teacher_arch,
           "settings": {k: getattr(args, k) for k in ("batch", "prompt", "completion", "steps",
                                                      "warmup", "chunk", "tiny")},
           "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, default=str))
    print(table(results))


if __name__ == "__main__":
    main()
