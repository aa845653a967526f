"""KD training throughput on one GPU: wattkd vs TRL GKDTrainer vs a naive full-logit loop.

    python benchmarks/kd_throughput.py --out DIR [--impls wattkd,wattkd_topk,trl,naive]

Pair: a Gemma 3 270M-shaped teacher (vocab 262,144, 18 layers, hidden 640; random init,
seeded: speed does not depend on weight values) and a 6-layer student copied from its layers
0,3,6,9,12,17 — the pair of ../shared/DESIGN.md. bf16 compute, seq 1024, AdamW, forward KL.
All implementations get the same random token ids already on the GPU, so data loading is
excluded for every one of them equally.

  wattkd       wattkd's DistillObjective + OnlineTeacher as `wattkd train` runs them by
               default: fused, chunked logit loss, closed-form and torch.compiled on CUDA;
               fp32 master weights, bf16 autocast.
  wattkd_compile  the same with WATTKD_COMPILE=1 forced (the default on CUDA anyway).
  wattkd_generic  the same with WATTKD_FAST_LOSS=0 (the generic autograd chunk path).
  wattkd_topk  the same student step fed by top-k teacher tensors (k=64) as the teacher cache
               provides them (cache read excluded; no teacher forward); _compile as above.
               The tensors are built once, before timing, as the cache builds them (logits in
               chunks of --chunk tokens: the setup peaks below the online step;
               `setup_peak_mem_gb` is the peak of build + setup + warm-up, `peak_mem_gb` of
               the timed steps).
  wattkd_triton  the same with WATTKD_FUSED_KERNEL=triton (distill/kernels/lm_head_kd.py:
               LM-head matmuls fused with online softmax and the KD terms, logits never in HBM).
  wattkd_topk_triton  the top-k step through the same kernels (no teacher matmul: a stats and a
               gradient sweep + the two head-gradient GEMMs).
  liger_chunked  Liger-Kernel `chunked_loss.LigerFusedLinearJSDLoss` (beta=0 = forward KL,
               hard-loss weight 0, compiled, chunk 1024: what TRL's trainers use with Liger).
  liger_triton  Liger-Kernel `transformers.LigerFusedLinearJSD` (Triton, jsd_beta=0).
  body_only    the ceiling's first half: the same pair, batch and update with the LM-head loss
               replaced by (h.float()**2).mean() on the student's final hidden state (no head
               matmul, no vocab work): teacher body forward + student body forward/backward +
               clip + AdamW, the part of the step every peer shares.
  body_only_student  the same without the teacher forward (the top-k cache path's share).
  <row>_body_compile, <row>_body_triton  (row: wattkd, wattkd_topk, body_only,
               body_only_student) the row with `train.body_kernels` = compile (torch.compile of
               each decoder block) or triton (fused RMSNorm and GeGLU kernels), applied to the
               student and to the teacher where the timed step runs it (body_kernels.py);
               the first compiled row of a run pays the compile in its warm-up.
  <row>_body_flex  experiment: the same models with Hugging Face's flex attention (compiled
               block-sparse kernels: Gemma's sliding-window layers skip the masked blocks)
               instead of SDPA with a materialised mask; CUDA only (no backward on CPU).
  trl          TRL GKDTrainer as plain off-policy forward KL (beta=0, lmbda=0, no generation).
  naive        full [tokens x vocab] fp32 logits for teacher and student (the original code).

`--pair llama`: a Llama-3.2-1B-shaped student (16 layers, hidden 2048, vocab 128,256) of a
Llama-3.1-8B-shaped teacher (32 layers, hidden 4096), both random init on the GPU.

`--head-gemm`: the four LM-head GEMMs at the pair's exact shapes (cuBLAS, bf16 in, fp32
accumulation) in TFLOP/s; with a body_only row it gives the `ceiling`: the most tokens/s any
loss implementation can reach on this pair and card = tokens per step / (body_only step time
+ the 4 head GEMMs at their measured rate), and its ratio to every peer (see `ceiling`).

For each implementation the batch sizes are tried in order until one runs out of memory.
`--out DIR/kd_throughput.json` is rewritten after every record (a run cut short keeps its
figures).
Figures per (implementation, batch): tokens/s over the timed steps, peak GPU memory, J/token
from the NVML energy counter over the timed steps, and MFU = tokens/s x FLOPs/token / peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pair import GEMMA_270M, STUDENT_LAYERS

TINY = {**GEMMA_270M, "vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 6, "head_dim": 16, "num_attention_heads": 2,
        "max_position_embeddings": 256, "sliding_window": 32, "query_pre_attn_scalar": 16}
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense, SXM


# ------------------------------------------------------------------------------------ models
def make_pair(arch: dict, device: torch.device):
    from wattkd.models import build_from_config, init_from_teacher_layers

    teacher = build_from_config(arch, arch["vocab_size"], seed=0)
    layers = STUDENT_LAYERS if arch["num_hidden_layers"] == 18 else [0, 2, 5]
    student = init_from_teacher_layers(teacher, layers)
    teacher = teacher.to(device, torch.bfloat16).eval().requires_grad_(False)
    return teacher, student.to(device)


LLAMA_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 8192,
            "rope_theta": 500000.0, "tie_word_embeddings": False}
LLAMA_1B = {**LLAMA_8B, "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "head_dim": 64, "tie_word_embeddings": True}


def make_llama_pair(device: torch.device):
    """Llama-3.1-8B-shaped teacher and Llama-3.2-1B-shaped student, random init made on the
    GPU (an 8B CPU init would take minutes; speed does not depend on weight values)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    def build(arch: dict, seed: int):
        kw = dict(arch)
        cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
        torch.manual_seed(seed)
        with torch.device(device):
            return AutoModelForCausalLM.from_config(cfg)

    teacher = build(LLAMA_8B, 0).to(torch.bfloat16).eval().requires_grad_(False)
    return teacher, build(LLAMA_1B, 1)


def flops_per_token(arch: dict, n_student_layers: int, seq: int,
                    student_arch: dict | None = None) -> dict[str, float]:
    """Matmul FLOPs per token: teacher forward + student forward and backward (3x forward).
    The student has the teacher's layer shape unless `student_arch` is given."""
    def per_layer_and_head(a: dict) -> tuple[float, float, float]:
        h, inter, v = a["hidden_size"], a["intermediate_size"], a["vocab_size"]
        q = a["num_attention_heads"] * a["head_dim"]
        kv = a["num_key_value_heads"] * a["head_dim"]
        per_layer = 2 * (h * q + 2 * h * kv + q * h + 3 * h * inter)   # projections + MLP
        attn = 2 * 2 * q * seq / 2                                    # QK^T and AV, causal
        return per_layer, attn, 2 * h * v

    per_layer, attn, head = per_layer_and_head(arch)
    teacher = arch["num_hidden_layers"] * (per_layer + attn) + head
    if student_arch is not None:
        per_layer, attn, head = per_layer_and_head(student_arch)
    student_fwd = n_student_layers * (per_layer + attn) + head
    return {"teacher_forward": teacher, "student_forward": student_fwd,
            "student_train": 3 * student_fwd, "total": teacher + 3 * student_fwd}


# ------------------------------------------------------------------------------ implementations
def run_wattkd(teacher, student, ids, steps, warmup, topk: int | None = None,
               fast: bool = True, compile: bool | None = None, kernel: str | None = None):
    """`fast`: closed-form fused loss; False: the generic autograd path (WATTKD_FAST_LOSS=0).
    `compile`: None = what `wattkd train` does by default (compiled on CUDA), True/False =
    WATTKD_COMPILE=1/0 (without the compiler CUDA takes the generic path). `kernel`: forces
    WATTKD_FUSED_KERNEL (None: the product default, auto)."""
    import os

    from wattkd.distill.fused import path as fused_path

    os.environ["WATTKD_FAST_LOSS"] = "1" if fast else "0"
    if kernel is None:
        os.environ.pop(fused_path.ENV, None)
    else:
        os.environ[fused_path.ENV] = kernel
    fused_path.reset()
    if compile is None:
        os.environ.pop("WATTKD_COMPILE", None)
    else:
        os.environ["WATTKD_COMPILE"] = "1" if compile else "0"
    from wattkd.config import LossTerm, MethodConfig
    from wattkd.distill.modes import make_mode
    from wattkd.distill.objective import DistillObjective, StepInputs
    from wattkd.distill.teacher import OnlineTeacher
    from wattkd.models import hidden_size, num_layers

    method = MethodConfig(name="response", method="response",
                          losses=[LossTerm(name="forward_kl", params={"temperature": 1.0})])
    mode = make_mode(method, student, (num_layers(teacher), hidden_size(teacher)))
    obj = DistillObjective(student, mode, method, vocab=GEMMA_VOCAB[0], chunk_tokens=CHUNK[0])
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-5,
                            fused=ids.is_cuda)
    provider = OnlineTeacher(teacher, mode.request)
    cached = None if topk is None else cached_topk(teacher, ids, topk)
    batch = {"input_ids": ids}

    def step():
        inputs = StepInputs.from_batch(batch, ids.device)
        signals = cached if cached is not None else provider.signals(batch)
        with torch.autocast(ids.device.type, dtype=torch.bfloat16):
            loss, _ = obj(inputs, signals)
        return update(loss, student, opt)

    out = timed(step, steps, warmup)
    out["fused_path"] = fused_path.decisions()
    return out


def cached_topk(teacher, ids, k: int):
    """Top-k teacher tensors as the teacher cache delivers them (int32 ids, fp16 log-probs
    and tail), built the way the cache builds them (distill.signals.topk_logprobs:
    logits in chunks of CHUNK tokens, exact logsumexp tail): never [tokens x vocab] at once,
    so the setup peaks below the online step (the full fp32 log_softmax of 64 x 1024 x 262,144
    logits took ~69 GB a copy and ran out of memory on an 80 GB card)."""
    from wattkd.distill.losses import TopKTeacher
    from wattkd.distill.signals import TeacherSignals, topk_logprobs
    from wattkd.distill.teacher import decoder_forward, logit_softcap

    with torch.no_grad():
        last, _ = decoder_forward(teacher, ids, False)
        head = teacher.get_output_embeddings()
        b, seq = ids.shape
        idx, lps, tail = topk_logprobs(last.reshape(b * seq, -1), head.weight, head.bias
                                       if getattr(head, "bias", None) is not None else None,
                                       logit_softcap(teacher), k, CHUNK[0])
        del last
    return TeacherSignals(topk=TopKTeacher(idx.to(torch.int32).view(b, seq, k),
                                           lps.half().view(b, seq, k),
                                           tail.half().view(b, seq)))


def run_liger(teacher, student, ids, steps, warmup, kind: str = "chunked"):
    """Liger-Kernel's fused linear + forward KL (JSD beta=0) on the final hidden states of
    student and (no-grad) teacher; the same bf16 autocast, fp32 master weights and update.
    Both heads are cast to bf16 for the loss (the cast is differentiable)."""
    from wattkd.distill.teacher import decoder_forward

    if kind == "chunked":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0,
                                          beta=0.0, temperature=1.0, compiled=True,
                                          chunk_size=1024)
    else:
        from liger_kernel.transformers import LigerFusedLinearJSD

        loss_fn = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=ids.is_cuda)
    s_head = student.get_output_embeddings()
    t_head = teacher.get_output_embeddings()
    labels = ids.reshape(-1)

    def step():
        with torch.no_grad():
            t_h, _ = decoder_forward(teacher, ids, False)
        with torch.autocast(ids.device.type, dtype=torch.bfloat16):
            s_h, _ = decoder_forward(student, ids, False)
            bf = torch.bfloat16
            args = (s_h.reshape(-1, s_h.shape[-1]).to(bf), s_head.weight.to(bf),
                    t_h.reshape(-1, t_h.shape[-1]).to(bf), t_head.weight.to(bf))
            loss = loss_fn(*args, labels) if kind == "chunked" else loss_fn(*args, None)
        return update(loss, student, opt)

    return timed(step, steps, warmup)


def run_body_only(teacher, student, ids, steps, warmup, with_teacher: bool = True):
    """Everything of the step but the LM-head loss: teacher body forward (no_grad; skipped
    when not `with_teacher`), student body forward and backward, the shared update. The loss
    (h.float()**2).mean() still backpropagates through the student's final hidden state, at
    the cost of two elementwise passes (no head matmul, no vocab work)."""
    from wattkd.distill.teacher import decoder_forward

    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=ids.is_cuda)

    def step():
        if with_teacher:
            with torch.no_grad():
                decoder_forward(teacher, ids, False)
        with torch.autocast(ids.device.type, dtype=torch.bfloat16):
            s_h, _ = decoder_forward(student, ids, False)
            loss = s_h.float().pow(2).mean()
        return update(loss, student, opt)

    return timed(step, steps, warmup)


def update(loss, student, opt):
    """The optimizer step every implementation shares (backward, clip at 1.0, AdamW)."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def run_naive(teacher, student, ids, steps, warmup):
    student = student.to(torch.bfloat16)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=ids.is_cuda)

    def step():
        with torch.no_grad():
            t_logits = teacher(ids).logits.float()
        s_logits = student(ids).logits.float()
        loss = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1),
                        log_target=True, reduction="batchmean")
        return update(loss, student, opt)

    return timed(step, steps, warmup)


def run_trl(teacher, student, ids, steps, warmup):
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from wattkd.data.tokenizer import load_tokenizer

    tok: PreTrainedTokenizerFast = load_tokenizer("bundled:bpe-4096")
    rows = ids.cpu().tolist()
    ds = Dataset.from_dict({"input_ids": rows * (steps + warmup + 1)})

    def collate(batch):
        x = torch.tensor([b["input_ids"] for b in batch])
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            marks.append(time.perf_counter())

    args = GKDConfig(output_dir="/tmp/trl-bench", per_device_train_batch_size=ids.shape[0],
                     max_steps=steps + warmup, bf16=True, beta=0.0, lmbda=0.0, temperature=1.0,
                     learning_rate=1e-5, logging_steps=1000, save_strategy="no", report_to=[],
                     remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
                     max_grad_norm=1.0, dataloader_num_workers=0, seed=0)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                         data_collator=collate, processing_class=tok, callbacks=[Clock()])
    energy0 = {}

    class Meter(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup and not energy0:
                torch.cuda.synchronize()
                energy0["t"], energy0["e"] = time.perf_counter(), nvml_energy_j()

    trainer.add_callback(Meter())
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    seconds = marks[-1] - energy0["t"]
    energy = nvml_energy_j()
    return {"seconds": seconds, "steps": steps,
            "energy_j": None if energy is None or energy0["e"] is None else energy - energy0["e"]}


def timed(step, steps: int, warmup: int) -> dict:
    for _ in range(warmup):
        step()
    sync()
    # the peak of build, setup (e.g. the top-k tensors) and warm-up, before the timed steps
    setup_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    e0, t0 = nvml_energy_j(), time.perf_counter()
    loss = None
    for _ in range(steps):
        loss = step()
    sync()
    seconds, e1 = time.perf_counter() - t0, nvml_energy_j()
    return {"seconds": seconds, "steps": steps, "loss": float(loss.detach()),
            "energy_j": None if e0 is None or e1 is None else e1 - e0,
            "setup_peak_bytes": setup_peak}


# ----------------------------------------------------------------------- ceiling of the pair
HEAD_GEMMS = ("teacher_forward", "student_forward", "student_grad_hidden",
              "student_grad_weight")
HEAD_ROWS = (2048, 4096, 8192, 16384)  # GEMM rows tried; the best rate counts
TARGETS = {  # issue 20: (body row, peer, factor): the ceiling must reach factor x peer
    "gemma": (("body_only", "liger_chunked", 1.5), ("body_only_student", "wattkd", 1.5)),
    "llama": (("body_only", "liger_chunked", 1.25),)}


def head_gemm_flops(tokens: int, vocab: int, hidden: int,
                    teacher_hidden: int | None) -> dict[str, float]:
    """FLOPs of the LM-head GEMMs no loss implementation can skip, for `tokens` rows: teacher
    logits (none when `teacher_hidden` is None: the top-k cache path), student logits,
    d/d hidden = dz @ W and d/d W = dz^T @ h; 2 x tokens x vocab x hidden each."""
    out = {} if teacher_hidden is None else {
        "teacher_forward": 2.0 * tokens * vocab * teacher_hidden}
    for name in HEAD_GEMMS[1:]:
        out[name] = 2.0 * tokens * vocab * hidden
    return out


def _gemm(name: str, rows: int, vocab: int, k: int, device: torch.device):
    """A no-argument call of one head GEMM at [rows, vocab, k] in bf16 (output bf16; cuBLAS
    accumulates in fp32), operands laid out as autograd has them (head weight [vocab x k])."""
    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16)

    if name.endswith("forward"):            # logits = h [rows x k] @ W^T
        a, b = rand(rows, k), rand(vocab, k).T
    elif name == "student_grad_hidden":     # dz [rows x vocab] @ W [vocab x k]
        a, b = rand(rows, vocab), rand(vocab, k)
    else:                                   # dz^T [vocab x rows] @ h [rows x k]
        a, b = rand(rows, vocab).T, rand(rows, k)
    out = torch.empty(a.shape[0], b.shape[1], device=device, dtype=torch.bfloat16)
    return lambda: torch.mm(a, b, out=out)


def _seconds(fn, reps: int) -> float:
    """Best of 3 means over `reps` calls (after 2 warm-up calls), in s."""
    fn()
    fn()
    best = float("inf")
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def head_gemm_peak(tokens: int, vocab: int, hidden: int, teacher_hidden: int,
                   device: torch.device) -> dict:
    """Measured TFLOP/s of each head GEMM at the pair's shapes, rows in HEAD_ROWS (at most the
    step's tokens), with cuBLAS's bf16 split-K reduction in fp32 (as the kernel accumulates)
    and, on CUDA, also as torch allows by default; `best` is the fastest per GEMM (the higher
    the rate, the higher, i.e. the more generous, the ceiling). `square_8192` is the card's
    rate on a large square GEMM, for comparison."""
    matmul = torch.backends.cuda.matmul
    modes = (False, True) if device.type == "cuda" else (False,)
    rows_list = sorted({min(r, tokens) for r in HEAD_ROWS})
    runs, best = [], {}
    saved = matmul.allow_bf16_reduced_precision_reduction
    try:
        for name in HEAD_GEMMS:
            k = teacher_hidden if name == "teacher_forward" else hidden
            for rows in rows_list:
                fn = _gemm(name, rows, vocab, k, device)
                for reduced in modes:
                    matmul.allow_bf16_reduced_precision_reduction = reduced
                    sec = _seconds(fn, reps=5)
                    rate = 2.0 * rows * vocab * k / sec / 1e12
                    runs.append({"gemm": name, "rows": rows, "vocab": vocab, "k": k,
                                 "bf16_reduced_precision_reduction": reduced,
                                 "seconds": sec, "tflops": rate})
                    best[name] = max(best.get(name, 0.0), rate)
                del fn
                torch.cuda.empty_cache() if device.type == "cuda" else None
        matmul.allow_bf16_reduced_precision_reduction = False
        n = 8192 if device.type == "cuda" else 256
        sq = _gemm("student_forward", n, n, n, device)
        square = 2.0 * n ** 3 / _seconds(sq, reps=10) / 1e12
    finally:
        matmul.allow_bf16_reduced_precision_reduction = saved
    return {"best_tflops": best, f"square_{n}_tflops": square, "runs": runs,
            "method": "torch.mm bf16 -> bf16 (cuBLAS, fp32 accumulation), best of 3 means of "
                      "5 calls after 2 warm-up calls, random normal operands"}


def ceiling(tokens_per_step: int, body_step_s: float, flops: dict[str, float],
            tflops: dict[str, float]) -> dict:
    """Most tokens/s a loss implementation can reach: the step's shared part (body_step_s,
    measured) plus the unavoidable head GEMMs at their measured rate, run one after the
    other. (A bound for serial execution: overlapping the body with the head GEMMs on
    other streams, lower-precision GEMMs or skipping teacher logits are outside it.)"""
    gemm_s = {k: f / (tflops[k] * 1e12) for k, f in flops.items()}
    step_s = body_step_s + sum(gemm_s.values())
    tps = tokens_per_step / step_s
    terms = " + ".join(f"{flops[k] / 1e12:.4g} TFLOP / {tflops[k]:.4g} TFLOP/s"
                       for k in flops)
    return {"tokens_per_step": tokens_per_step, "body_step_s": round(body_step_s, 5),
            "head_gemm_tflop": {k: round(f / 1e12, 3) for k, f in flops.items()},
            "head_gemm_tflops": {k: round(tflops[k], 2) for k in flops},
            "head_gemm_s": {k: round(v, 5) for k, v in gemm_s.items()},
            "step_s_min": round(step_s, 5), "tokens_per_s_max": tps,
            "arithmetic": f"{tokens_per_step} tokens / ({body_step_s * 1e3:.1f} ms body + "
                          f"{sum(gemm_s.values()) * 1e3:.1f} ms head GEMMs [{terms}]) = "
                          f"{tps:,.0f} tokens/s"}


def ceilings(records: list[dict], head: dict, dims: tuple[int, int, int],
             targets: tuple) -> list[dict]:
    """One `ceiling` per ok body-only record, with its ratio to every other ok record of the
    run and the verdict on each target (body row, peer, factor) that applies to it."""
    vocab, hidden, teacher_hidden = dims
    peers = [r for r in records if r["status"] == "ok" and not r["impl"].startswith("body")]
    out = []
    for body in (r for r in records if r["status"] == "ok" and r["impl"].startswith("body")):
        # tokens/s counts every token (as for the peers); the head needs rows with a next
        # token only: batch x (seq - 1), the fewest any loss implementation can do
        rows = body["batch"] * (body["seq"] - 1)
        flops = head_gemm_flops(rows, vocab, hidden,
                                None if body["impl"].startswith("body_only_student")
                                else teacher_hidden)
        c = ceiling(body["batch"] * body["seq"], body["seconds"] / body["steps"], flops,
                    head["best_tflops"])
        c.update(body=body["impl"], batch=body["batch"], vs_peers=[
            {"impl": r["impl"], "batch": r["batch"], "tokens_per_s": r["tokens_per_s"],
             "ceiling_over_measured": round(c["tokens_per_s_max"] / r["tokens_per_s"], 3)}
            for r in peers])
        for row, peer, factor in targets:
            best = max((r["tokens_per_s"] for r in peers if r["impl"] == peer), default=None)
            if row == body["impl"] and best is not None:
                need = factor * best
                c.setdefault("targets", []).append(
                    {"target": f">= {factor}x {peer}", "peer_tokens_per_s": best,
                     "needed_tokens_per_s": round(need, 1),
                     "ceiling_over_peer": round(c["tokens_per_s_max"] / best, 3),
                     "reachable": c["tokens_per_s_max"] >= need})
        out.append(c)
    return out


# ------------------------------------------------------------------------------------ helpers
_NVML: list = []


def nvml_energy_j() -> float | None:
    """Total-energy counter of the benchmark GPU, in J (NVML reports mJ)."""
    if not torch.cuda.is_available():
        return None
    try:
        import pynvml

        if not _NVML:
            pynvml.nvmlInit()
            _NVML.append(pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device()))
        return pynvml.nvmlDeviceGetTotalEnergyConsumption(_NVML[0]) / 1000.0
    except Exception:  # noqa: BLE001 - figure becomes null, never a made-up value
        return None


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def versions() -> dict:
    from wattkd.runinfo import versions as package_versions

    out = package_versions(("torch", "transformers", "accelerate", "trl", "datasets",
                            "nvidia-ml-py"))
    if torch.cuda.is_available():
        try:
            import pynvml

            pynvml.nvmlInit()
            out["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:  # noqa: BLE001, S110 - the driver version is optional
            pass
    return out


GEMMA_VOCAB = [GEMMA_270M["vocab_size"]]
CHUNK = [1024]
IMPLS = {"wattkd": (run_wattkd, {}),
         "wattkd_compile": (run_wattkd, {"compile": True}),
         "wattkd_generic": (run_wattkd, {"fast": False}),
         "wattkd_topk": (run_wattkd, {"topk": 64}),
         "wattkd_topk_compile": (run_wattkd, {"topk": 64, "compile": True}),
         "wattkd_triton": (run_wattkd, {"kernel": "triton"}),
         "wattkd_topk_triton": (run_wattkd, {"topk": 64, "kernel": "triton"}),
         "liger_chunked": (run_liger, {"kind": "chunked"}),
         "liger_triton": (run_liger, {"kind": "triton"}),
         "body_only": (run_body_only, {}),
         "body_only_student": (run_body_only, {"with_teacher": False}),
         "naive": (run_naive, {}),
         "trl": (run_trl, {})}
# The same rows with the decoder bodies sped up (`train.body_kernels`, body_kernels.py):
# student and, where the step runs it, teacher blocks torch.compiled or through the Triton
# RMSNorm / GeGLU kernels. The peers (liger_*, trl) keep the plain body.
for _row in ("wattkd", "wattkd_topk", "body_only", "body_only_student"):
    for _how in ("compile", "triton", "flex"):
        IMPLS[f"{_row}_body_{_how}"] = (IMPLS[_row][0], {**IMPLS[_row][1], "body": _how})


def build_row(impl: str, pair, device: torch.device):
    """(teacher, student, the row's keyword arguments) with the row's body kernels applied:
    to the student, and to the teacher where the timed step runs it (not for top-k rows,
    whose teacher only builds the cached tensors once, nor body_only_student)."""
    from wattkd.body_kernels import apply_body_kernels

    kwargs = dict(IMPLS[impl][1])
    body = kwargs.pop("body", "none")
    teacher, student = pair(device)
    models = [student] + ([teacher] if kwargs.get("topk") is None
                          and kwargs.get("with_teacher", True) else [])
    for model in models:
        if body == "flex":   # an experiment, not a train setting (yet): HF's flex attention
            model.set_attn_implementation("flex_attention")
        else:
            apply_body_kernels(model, body, device)
    return teacher, student, kwargs


def profile(impl: str, batch: int, arch: dict, seq: int, device: torch.device, out: Path,
            pair=None) -> None:
    """Where one implementation's step time goes: torch.profiler over 3 steps, top CUDA ops."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn = IMPLS[impl][0]
    teacher, student, kwargs = build_row(impl, pair or (lambda d: make_pair(arch, d)), device)
    ids = torch.randint(0, arch["vocab_size"], (batch, seq), device=device)
    fn(teacher, student, ids, 1, 2, **kwargs)   # warm-up (and compile) outside the trace
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        fn(teacher, student, ids, 3, 0, **kwargs)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30)
    (out / f"profile_{impl}_b{batch}.txt").write_text(table)
    print(table)


def measure(impls: list[str], batches: str, pair, arch: dict, seq: int, steps: int,
            warmup: int, device: torch.device, fpt: dict, peak: float | None,
            on_record) -> list[dict]:
    """One record per (implementation, batch), each passed to `on_record(records)` as it
    comes; an implementation's larger batches are skipped once one fails (out of memory).
    Each builds the pair afresh."""
    name = card()
    records = []
    per_impl = dict(item.split("=") for item in batches.split(";")) if "=" in batches else {}
    for impl in impls:
        fn = IMPLS[impl][0]
        sizes = per_impl.get(impl, batches if not per_impl else "8")
        for batch in [int(b) for b in sizes.split(",")]:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            rec = {"impl": impl, "batch": batch, "seq": seq, "card": name,
                   "body_kernels": IMPLS[impl][1].get("body", "none")}
            wall0 = time.perf_counter()
            try:
                teacher, student, kwargs = build_row(impl, pair, device)
                g = torch.Generator().manual_seed(batch)
                ids = torch.randint(0, arch["vocab_size"], (batch, seq), generator=g).to(device)
                res = fn(teacher, student, ids, steps, warmup, **kwargs)
                tokens = batch * seq * res["steps"]
                tps = tokens / res["seconds"]
                rec.update(tokens_per_s=round(tps, 1), seconds=round(res["seconds"], 3),
                           steps=res["steps"],
                           peak_mem_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2)
                           if torch.cuda.is_available() else None,
                           j_per_token=None if res["energy_j"] is None
                           else round(res["energy_j"] / tokens, 6),
                           energy_j=res["energy_j"], loss=res.get("loss"),
                           mfu=None if peak is None else round(tps * fpt["total"] / (peak * 1e12),
                                                               4),
                           status="ok")
                if res.get("setup_peak_bytes") is not None:   # build + setup + warm-up
                    rec["setup_peak_mem_gb"] = round(res["setup_peak_bytes"] / 1e9, 2)
                if "fused_path" in res:
                    rec["fused_path"] = res["fused_path"]
            except torch.cuda.OutOfMemoryError:
                rec["status"] = "oom"
            except Exception as exc:  # noqa: BLE001 - one failure must not lose the others
                rec["status"] = f"error: {type(exc).__name__}: {exc}"[:500]
            finally:
                teacher = student = ids = None
            rec["wall_s"] = round(time.perf_counter() - wall0, 1)  # build + compile + steps
            print(json.dumps(rec), flush=True)
            records.append(rec)
            on_record(records)
            if rec["status"] != "ok":
                break
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--impls", default="wattkd,wattkd_topk,trl,naive")
    ap.add_argument("--batches", default="4,8,16,32,64",
                    help="batch sizes for every impl, or per impl: 'wattkd=8,16;naive=4,8'")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=1024, help="wattkd logit chunk tokens")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny pair")
    ap.add_argument("--pair", choices=("gemma", "llama"), default="gemma")
    ap.add_argument("--head-gemm", action="store_true",
                    help="measure the LM-head GEMMs at the pair's shapes; with a body_only "
                         "row, write the ceiling")
    ap.add_argument("--profile", default=None, metavar="IMPL=BATCH",
                    help="also write a torch.profiler table of one implementation")
    args = ap.parse_args()
    unknown = [i for i in args.impls.split(",") if i not in IMPLS]
    if unknown:
        ap.error(f"--impls: unknown {unknown}; expected some of {sorted(IMPLS)}")
    llama = args.pair == "llama"
    arch = TINY if args.tiny else LLAMA_8B if llama else GEMMA_270M
    student_arch = LLAMA_1B if llama else arch
    GEMMA_VOCAB[0], CHUNK[0] = arch["vocab_size"], args.chunk
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seq = 64 if args.tiny else args.seq
    n_layers = 3 if args.tiny else LLAMA_1B["num_hidden_layers"] if llama else len(STUDENT_LAYERS)
    fpt = flops_per_token(arch, n_layers, seq, LLAMA_1B if llama else None)
    pair = make_llama_pair if llama else (lambda d: make_pair(arch, d))
    args.out.mkdir(parents=True, exist_ok=True)
    name = card()
    peak = peak_tflops(name)
    result = {"name": "kd_throughput", "card": name,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "versions": versions(), "command": " ".join(sys.argv),
              "pair": ({"teacher": arch, "student": LLAMA_1B, "seq": seq} if llama else
                       {"teacher": arch, "student_layers": STUDENT_LAYERS if not args.tiny
                        else [0, 2, 5], "seq": seq}),
              "flops_per_token": fpt, "peak_bf16_tflops": peak,
              "mfu_arithmetic": "mfu = tokens/s x flops_per_token.total / (peak_bf16_tflops x "
                                "1e12); flops = 2 x matmul params + causal attention, teacher "
                                "forward + 3 x student forward",
              "records": [], "best": {}}
    dims = (arch["vocab_size"], student_arch["hidden_size"], arch["hidden_size"])
    if args.head_gemm:  # first, so that a run cut short still has it
        batches = [int(b) for b in args.batches.replace("=", ",").replace(";", ",").split(",")
                   if b.isdigit()]
        result["head_gemm"] = head_gemm_peak(max(batches) * seq, *dims, device)
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    out_json = args.out / "kd_throughput.json"

    def write(records: list[dict]) -> None:
        """The whole result so far, after every record (a run cut short keeps its figures)."""
        result["records"], result["best"] = records, {}
        for r in records:
            if r["status"] == "ok" and r["tokens_per_s"] > result["best"].get(
                    r["impl"], {}).get("tokens_per_s", 0):
                result["best"][r["impl"]] = r
        if args.head_gemm:
            result["ceiling"] = ceilings(records, result["head_gemm"], dims,
                                         TARGETS["llama" if llama else "gemma"])
        out_json.write_text(json.dumps(result, indent=2))

    write(measure(args.impls.split(","), args.batches, pair, arch, seq, args.steps,
                  args.warmup, device, fpt, peak, write))
    if args.profile:
        impl, batch = args.profile.split("=")
        profile(impl, int(batch), arch, seq, device, args.out, pair)
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [f"KD throughput on {result['card']} ({result['date']})", "",
             "| implementation | batch | tokens/s | peak GB | J/token | MFU | status |",
             "|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        lines.append(f"| {r['impl']} | {r['batch']} | {r.get('tokens_per_s', '—')} | "
                     f"{r.get('peak_mem_gb', '—')} | {r.get('j_per_token', '—')} | "
                     f"{r.get('mfu', '—')} | {r['status']} |")
    if "head_gemm" in result:
        lines += ["", "LM-head GEMM rate at the pair's shapes (best over rows): " + ", ".join(
            f"{k} {v:.1f} TFLOP/s" for k, v in result["head_gemm"]["best_tflops"].items())]
    for c in result.get("ceiling", []):
        lines += ["", f"Ceiling ({c['body']}, batch {c['batch']}): {c['arithmetic']}", "",
                  "| peer | batch | tokens/s | ceiling / peer |", "|---|---|---|---|"]
        lines += [f"| {p['impl']} | {p['batch']} | {p['tokens_per_s']} | "
                  f"{p['ceiling_over_measured']} |" for p in c["vs_peers"]]
        lines += [f"- target {t['target']}: needs {t['needed_tokens_per_s']:,.0f} tokens/s; "
                  f"ceiling / peer = {t['ceiling_over_peer']} -> "
                  f"{'reachable' if t['reachable'] else 'unreachable'}"
                  for t in c.get("targets", [])]
    return "\n".join(lines)

if __name__ == "__main__":
    main()
