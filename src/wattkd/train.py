"""One training loop for every KD mode and the no-KD baseline, readable top to bottom.

    wattkd train CONFIG --method response [--repeat 0] [--resume auto]

Setup validates everything before a model is loaded; then models, objective, optimizer; then
the loop: teacher signals -> student step -> optimizer step -> log / checkpoint / budget checks.
The whole loop runs inside the energy meter's `train` phase window.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wattkd import checkpoint, sharding
from wattkd.atomic import atomic_dir
from wattkd.config import ExperimentConfig, MethodConfig, StudentConfig, TrainConfig, dump
from wattkd.distill import fused_path
from wattkd.energy.monitor import ensure_trailing_newline
from wattkd.errors import RunFailure, note_run_dir
from wattkd.eval.in_training import task_evaluator
from wattkd.preflight import check_training
from wattkd.progress import NoBar
from wattkd.runinfo import write_run_json

log = logging.getLogger(__name__)


class DivergenceError(RunFailure, RuntimeError):
    """A feature/relation-only run whose LM loss climbed past the guard's threshold."""


@dataclass
class TrainJob:
    """What to train: the experiment, one method, one repeat, and where the student comes from."""

    cfg: ExperimentConfig
    method: MethodConfig
    run_dir: Path
    student: StudentConfig
    train: TrainConfig
    repeat: int = 0
    teacher_path: str | None = None   # a teacher trained earlier in this experiment
    role: str = "student"             # student | teacher_pretrain | teacher_finetune

    @property
    def seed(self) -> int:
        """Repeat k's seed: data order, the student's random init and the new parameters
        (projectors). Methods of one repeat share it, so their runs are paired."""
        return self.train.seed + self.repeat


@dataclass
class TrainResult:
    run_dir: Path
    status: str              # completed | preempted | budget
    step: int
    tokens: int
    final_dir: Path | None


# ------------------------------------------------------------------------------- job builders
def teacher_path(cfg: ExperimentConfig) -> str | None:
    """Where the teacher's weights are: a teacher pretrained or fine-tuned here (its final/),
    else the config's model."""
    if cfg.teacher.finetuned or cfg.teacher.pretrain is not None:
        return str(cfg.out / "teacher" / "final")  # trained here (finetune / pretrain stage)
    if cfg.teacher.model is not None:
        return cfg.teacher.model
    return None  # built from config, random init (benchmarks)


def student_job(cfg: ExperimentConfig, method: str, repeat: int = 0) -> TrainJob:
    m = cfg.method(method)
    return TrainJob(cfg, m, cfg.run_dir(method, repeat), cfg.student, cfg.train, repeat,
                    teacher_path(cfg))


def teacher_pretrain_job(cfg: ExperimentConfig) -> TrainJob:
    """The demo's tiny teacher is trained here first, with the same loop (CE only)."""
    from wattkd.config import DivergenceGuard as DivergenceGuardConfig
    from wattkd.config import LossTerm

    pre = cfg.teacher.pretrain
    if pre is None:
        raise ValueError("teacher.pretrain is not set in this config")
    # "teacher" is reserved for user methods (it is this run's folder), so build it unvalidated.
    method = MethodConfig.model_construct(
        name="teacher", mode="none", losses=[LossTerm(name="ce")], layer_map=None,
        token_subsample=1.0, pooling="mean", guard=DivergenceGuardConfig())
    train = cfg.train.model_copy(update={"max_steps": pre.max_steps, "lr": pre.lr,
                                         "micro_batch_size": pre.micro_batch_size,
                                         "max_tokens": None, "energy_budget_j": None,
                                         "warmup_steps": min(cfg.train.warmup_steps,
                                                             pre.max_steps // 10)})
    student = StudentConfig(build=cfg.teacher.build)
    return TrainJob(cfg, method, cfg.out / "teacher", student, train, 0, None,
                    role="teacher_pretrain")


def teacher_finetune_job(cfg: ExperimentConfig) -> TrainJob:
    """The pretrained teacher adapted to the training shards (CE, full or LoRA) with the same
    loop as the students; its final/ becomes the teacher of every later stage."""
    from wattkd.config import DivergenceGuard as DivergenceGuardConfig
    from wattkd.config import LossTerm

    ft = cfg.teacher.finetune
    if ft is None or not ft.enabled or cfg.teacher.model is None:
        raise ValueError("teacher.finetune is not enabled in this config (it needs "
                         "teacher.model and a teacher.finetune section)")
    method = MethodConfig.model_construct(
        name="teacher", mode="none", losses=[LossTerm(name="ce")], layer_map=None,
        token_subsample=1.0, pooling="mean", guard=DivergenceGuardConfig())
    steps = ft.max_steps if ft.max_steps is not None else 10 ** 9
    train = cfg.train.model_copy(update={
        "max_steps": ft.max_steps, "max_tokens": ft.max_tokens, "lr": ft.lr,
        "micro_batch_size": ft.micro_batch_size or cfg.train.micro_batch_size,
        "energy_budget_j": None, "warmup_steps": min(ft.warmup_steps, steps // 10)})
    student = StudentConfig(model=cfg.teacher.model, revision=cfg.teacher.revision,
                            lora=ft.lora, trust_remote_code=cfg.teacher.trust_remote_code)
    return TrainJob(cfg, method, cfg.out / "teacher", student, train, 0, None,
                    role="teacher_finetune")


# ---------------------------------------------------------------------------------- helpers
def finished_run(run_dir: Path) -> dict[str, Any] | None:
    """run.json of a run that ended (completed or energy budget) and wrote final/, else None."""
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    final = run_dir / "final"
    whole = (final / "config.json").exists() or (final / "adapter_config.json").exists()
    return info if info.get("status") in ("completed", "budget") and whole else None


def training_done(run_dir: Path) -> bool:
    return finished_run(run_dir) is not None


def _reached(done: dict[str, Any], tc: TrainConfig) -> bool:
    """Whether a finished run's record meets this config's budget (an energy-budget stop
    counts as reached; raised max_steps/max_tokens continue it)."""
    if done.get("status") == "budget":
        return True
    steps_ok = tc.max_steps is None or done.get("step", 0) >= tc.max_steps
    tokens_ok = tc.max_tokens is None or done.get("tokens", 0) >= tc.max_tokens
    return steps_ok and tokens_ok


def batches(dataset: Any, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Stack consecutive samples; the dataset's order (seeded, rank-aware) is the data order."""
    buf: list[dict[str, torch.Tensor]] = []
    for sample in dataset:
        buf.append(sample)
        if len(buf) == batch_size:
            yield {k: torch.stack([s[k] for s in buf]) for k in buf[0]
                   if isinstance(buf[0][k], torch.Tensor)}
            buf = []


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int | None):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if train.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, train.warmup_steps)
    if total_steps is None:
        raise ValueError(f"train.schedule={train.schedule!r} needs max_steps or max_tokens to "
                         "know its length; use schedule: constant with an energy-only budget")
    fn = (get_cosine_schedule_with_warmup if train.schedule == "cosine"
          else get_linear_schedule_with_warmup)
    return fn(optimizer, train.warmup_steps, total_steps)


def use_bf16(train: TrainConfig, device: torch.device) -> bool:
    if train.precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return train.precision == "bf16"


class MetricsLog:
    """metrics.jsonl (one line per logged step, flushed) + TensorBoard when installed."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool) -> None:
        self.enabled = enabled
        if enabled:  # a kill mid-line left a cut line: end it so the next record stays whole
            ensure_trailing_newline(run_dir / "metrics.jsonl")
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.info("tensorboard not installed; metrics go to metrics.jsonl only "
                         "(pip install 'wattkd[tensorboard]')")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert self.file is not None
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step":
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def __enter__(self) -> MetricsLog:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # also when the loop raises: no open handles or writer threads left

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


class DivergenceGuard:
    """Compares the LM loss of the latest window with the first one."""

    def __init__(self, window: int, max_ratio: float) -> None:
        self.window, self.max_ratio = window, max_ratio
        self.values: list[float] = []

    def update(self, lm_loss: float, step: int) -> None:
        self.values.append(lm_loss)
        if not math.isfinite(lm_loss):
            raise DivergenceError(f"LM loss became {lm_loss} at step {step}")
        if len(self.values) < 2 * self.window:
            return
        first = sum(self.values[: self.window]) / self.window
        recent = sum(self.values[-self.window:]) / self.window
        if recent > self.max_ratio * first:
            raise DivergenceError(
                f"LM loss diverged at step {step}: mean of the last {self.window} checks is "
                f"{recent:.3f}, {recent / first:.1f}x the first window's {first:.3f} (guard "
                f"max_ratio {self.max_ratio}). Add a `ce` term to the method, lower the lr, or "
                "set guard.enabled: false to train on anyway.")


def heldout_loss(objective: Any, path: Path, *, tokens: int, batch_size: int,
                 device: torch.device, autocast: Any = nullcontext) -> dict[str, float]:
    """Mean next-token CE over the first `tokens` of the held-out shards (fixed order).
    `autocast` is a factory of the context each forward runs in (the trainer's precision)."""
    from wattkd.data.loader import ShardDataset

    ds = ShardDataset(path, shuffle=False, verify="size")
    n_rows = max(1, min(len(ds), math.ceil(tokens / ds.seq_len)))
    total, count = 0.0, 0
    from wattkd.distill.objective import StepInputs

    was_training = objective.training
    objective.eval()
    rows = 0
    for batch in batches(ds, min(batch_size, n_rows)):
        inputs = StepInputs.from_batch(batch, device)
        with autocast():
            loss = objective.lm_loss(inputs)
        n = float(inputs.mask.sum())
        total += loss * n
        count += n
        rows += batch["input_ids"].shape[0]
        if rows >= n_rows:
            break
    objective.train(was_training)
    mean = total / max(count, 1.0)
    return {"heldout_loss": mean, "heldout_ppl": math.exp(min(mean, 50.0)),
            "heldout_tokens": int(count)}


# ------------------------------------------------------------------------------------- train
def train(job: TrainJob, *, resume: str = "auto", progress: bool = True) -> TrainResult:
    """Train one student (or the demo teacher) and write its run directory."""
    from accelerate import Accelerator

    from wattkd.data.loader import ShardDataset
    from wattkd.data.tokenizer import load_tokenizer, tokenizer_sha256
    from wattkd.distill.methods import get_method
    from wattkd.distill.modes import make_mode
    from wattkd.distill.objective import DistillObjective, StepInputs
    from wattkd.distill.teacher import OnlineTeacher
    from wattkd.energy.ledger import make_meter
    from wattkd.models import (
        build_student,
        check_tokenizer_match,
        check_vocab,
        frozen_linear_dtype,
        load_teacher,
        parameter_count,
        resolve_device,
        student_frozen_dtype,
        teacher_dims,
    )

    cfg, method, tc, run_dir = job.cfg, job.method, job.train, job.run_dir

    # ---- 1. validate inputs before anything expensive
    shards = cfg.shards_dir / "train"
    if not (shards / "manifest.json").exists():
        raise FileNotFoundError(f"no shards at {shards}: run `wattkd data build` first")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    probe = ShardDataset(shards, verify="size")
    want = probe.manifest["tokenizer"]["sha256"]
    if want != tokenizer_sha256(tokenizer):
        raise ValueError(f"stale shards: {shards} were built with a different tokenizer than "
                         f"data.tokenizer={cfg.data.tokenizer!r}; rebuild them")
    needs_teacher = method.mode != "none"
    uses_teacher = needs_teacher or job.student.from_teacher_layers is not None
    if uses_teacher and job.teacher_path and not Path(job.teacher_path).exists() \
            and (cfg.teacher.pretrain is not None or cfg.teacher.finetuned):
        stage = "finetune" if cfg.teacher.finetuned else "pretrain"
        raise FileNotFoundError(f"teacher {job.teacher_path} not found: run `wattkd teacher "
                                f"{stage}` first")
    if needs_teacher and cfg.distill.teacher_signals == "cache":
        from wattkd.teacher_cache import check_cache

        check_cache(cfg, shards)
    device = resolve_device(tc.device)
    if resume not in ("auto", "never") and not Path(resume).is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint directory")
    # eval.train_suite: resolved and its tasks loaded now, before any model is built
    task_eval = task_evaluator(cfg.eval, eval_every=tc.eval_every, strategy=tc.strategy)
    check_training(job, len(tokenizer), resume)  # configs, layers, vocab, disk: nothing loaded

    # ---- 2. accelerator, models, objective
    bf16 = use_bf16(tc, device)
    frozen_dtype = student_frozen_dtype(job.student, bf16)
    from accelerate.utils import DistributedDataParallelKwargs

    # Without a logit term the LM head (and layers past the last mapped one) get no gradient:
    # DDP must be told, or it fails at the second step.
    from wattkd.distill.registry import get_loss

    has_logit_term = any(get_loss(t.name).kind == "logit" and t.weight > 0
                         for t in method.losses)
    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=not has_logit_term)
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no",
                              cpu=device.type == "cpu", kwargs_handlers=[ddp_kwargs])
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    fsdp = tc.strategy == "fsdp" and world > 1
    shard_teacher = fsdp and tc.fsdp.shard_teacher
    done = finished_run(run_dir) if resume == "auto" else None
    if not _any_rank(accelerator, done is None or not _reached(done, tc)):
        # A rerun (by hand or a requeued job) of a finished run must not train it again.
        assert done is not None
        log.info("%s is already trained (%s at step %d, final/ written): nothing to do; raise "
                 "train.max_steps/max_tokens to continue it, or --resume never to train it "
                 "again", run_dir, done["status"], done.get("step", 0))
        return TrainResult(run_dir, done["status"], done.get("step", 0), done.get("tokens", 0),
                           run_dir / "final")
    if done is not None and checkpoint.latest(run_dir) is None:
        log.warning("%s finished earlier but left no checkpoint (train.checkpoint_every: 0) to "
                    "continue from: training it again from step 0", run_dir)
    torch.manual_seed(job.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(dump(cfg))

    teacher = None
    init_from_teacher = job.student.from_teacher_layers is not None
    if needs_teacher or init_from_teacher:
        check_tokenizer_match(job.teacher_path, tokenizer)
        if cfg.distill.teacher_signals == "online" or init_from_teacher:
            # A teacher to be sharded is loaded on the CPU; sharding moves its parts over.
            teacher = load_teacher(cfg.teacher, device=torch.device("cpu") if shard_teacher
                                   else device, vocab_size=len(tokenizer),
                                   seed=cfg.train.seed, path_override=job.teacher_path,
                                   compute_device=device)
    student = build_student(job.student, teacher=teacher, vocab_size=len(tokenizer),
                            seed=job.seed, frozen_dtype=frozen_dtype)
    dims = teacher_dims(cfg.teacher, job.teacher_path, teacher) if needs_teacher else None
    if teacher is not None and (not needs_teacher or cfg.distill.teacher_signals == "cache"):
        teacher = None  # only needed to initialise the student (baseline / cached signals)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if tc.gradient_checkpointing:
        # Non-reentrant: LoRA adapters inside checkpointed blocks still get gradients when the
        # frozen embeddings' outputs do not require grad.
        kwargs = {"use_reentrant": False}
        if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.x name
            student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    vocab = check_vocab(teacher, student, len(tokenizer))
    # New parameters (projectors) from the repeat's seed alone, whatever was loaded before.
    torch.manual_seed(job.seed)
    mode = make_mode(method, student, dims, batch_size=tc.micro_batch_size)
    objective = DistillObjective(student, mode, method, vocab=vocab,
                                 chunk_tokens=cfg.distill.logit_chunk_tokens)
    fused_path.set_path(cfg.distill.fused_kernel)
    if fsdp:
        if teacher is not None and shard_teacher:
            sharding.shard_teacher(teacher)
        sharding.shard_objective(objective, student, bf16=bf16,
                                 reshard_after_forward=tc.fsdp.reshard_after_forward)
    provider = None
    cache_use = None
    if needs_teacher and not mode.request.empty:
        if teacher is not None:
            provider = OnlineTeacher(teacher, mode.request)
        else:
            from wattkd.teacher_cache import CachedTeacher, record_cache_use

            provider = CachedTeacher(cfg, mode.request, rank=rank, world_size=world,
                                     device=device)
            if accelerator.is_main_process:
                cache_use = record_cache_use(cfg.cache_dir, run_dir)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tc.betas,
                                  weight_decay=tc.weight_decay)
    tokens_per_step = tc.micro_batch_size * tc.grad_accum * world * probe.seq_len
    total_steps = tc.max_steps
    if tc.max_tokens is not None:
        by_tokens = math.ceil(tc.max_tokens / tokens_per_step)
        total_steps = by_tokens if total_steps is None else min(total_steps, by_tokens)
    scheduler = make_scheduler(optimizer, tc, total_steps)
    if not fsdp:  # FSDP is applied above, by hand; accelerate wraps the rest (DDP or nothing)
        objective, optimizer = accelerator.prepare(objective, optimizer)
    core = accelerator.unwrap_model(objective)
    strategy = "fsdp" if fsdp else "ddp"   # the checkpoint format (DDP = single process)

    # ---- 3. resume
    step, samples, tokens, prior_energy = 0, 0, 0, 0.0
    resumed_guard = None
    ckpt = (checkpoint.latest(run_dir) if resume == "auto"
            else None if resume == "never" else Path(resume))
    if ckpt is not None:
        meta = checkpoint.load(ckpt, module=core, optimizer=optimizer, scheduler=scheduler,
                               rank=rank, sharded=fsdp)
        step, samples, tokens = meta["step"], meta["samples"], meta["tokens"]
        prior_energy = meta.get("energy_j") or 0.0
        if meta.get("world_size", world) != world:
            raise checkpoint.CheckpointError(
                f"{ckpt} was written by {meta['world_size']} ranks, this run has {world}: "
                "the data position is per rank, so resume with the same number of processes")
        resumed_guard = meta.get("guard")
    full_weights = job.student.lora is None
    if accelerator.is_main_process:
        write_run_json(run_dir, status="running", method=method.name, mode=method.mode,
                       repeat=job.repeat, seed=job.seed, teacher=job.teacher_path or
                       cfg.teacher.model, teacher_signals=cfg.distill.teacher_signals
                       if needs_teacher else None, shards=str(shards),
                       shards_sha256=_sha256(shards / "manifest.json"), parameters=parameter_count(student),
                       precision="bf16" if bf16 else "fp32", world_size=world,
                       frozen_base_dtype=frozen_linear_dtype(student),
                       resumed_from=str(ckpt) if ckpt else None, teacher_cache=cache_use,
                       role=job.role, seeds={"data_order": job.seed, "init": job.seed},
                       teacher_finetune=_finetune_use(cfg, job, run_dir, uses_teacher))
        note_run_dir(run_dir)  # an error reaching the CLI marks this run.json failed

    data = ShardDataset(shards, rank=rank, world_size=world, seed=job.seed, shuffle=True,
                        start=samples, loop=True, verify="size")
    stream = batches(data, tc.micro_batch_size)
    if provider is not None and hasattr(provider, "prefetch"):
        stream = provider.prefetch(stream)  # cache rows read ahead, same batches, same order
    guard = None
    has_ce = any(t.name == "ce" and t.weight > 0 for t in method.losses)
    if get_method(method.mode).guard and method.guard.enabled and not has_ce:
        guard = DivergenceGuard(method.guard.window, method.guard.max_ratio)
        guard.values = list(resumed_guard or [])
    metrics = MetricsLog(run_dir, tc.tensorboard, accelerator.is_main_process)
    heldout = cfg.shards_dir / "heldout"
    status = "completed"

    # ---- 4. the loop
    # One meter per node (local rank 0 reads the node's GPUs); all nodes append to the ledger.
    meter = make_meter(cfg.telemetry, run_dir if accelerator.is_local_main_process else None)
    bar = _progress(progress and accelerator.is_main_process, total_steps, method.name)
    objective.train()
    with meter, checkpoint.PreemptionSignal() as preempt, bar, metrics:
        task = bar.add_task(f"train {method.name}", total=total_steps, start_step=step)
        with meter.phase("train", method=method.name, repeat=job.repeat,
                         start_step=step) as window:
            t_last, tok_last = time.perf_counter(), tokens
            while total_steps is None or step < total_steps:
                parts_acc: dict[str, float] = {}
                for micro in range(tc.grad_accum):
                    batch = next(stream)
                    inputs = StepInputs.from_batch(batch, device)
                    signals = provider.signals(batch) if provider is not None else None
                    sync = micro == tc.grad_accum - 1
                    if fsdp:  # reduce-scatter gradients only on the last micro-batch
                        objective.set_requires_gradient_sync(sync)
                        ctx = accelerator.autocast()
                    else:
                        ctx = nullcontext() if sync else accelerator.no_sync(objective)
                    with ctx:
                        loss, parts = objective(inputs, signals)
                        accelerator.backward(loss / tc.grad_accum)
                    for k, v in parts.items():
                        parts_acc[k] = parts_acc.get(k, 0.0) + v / tc.grad_accum
                parts_acc = _mean_over_ranks(accelerator, parts_acc)
                grad_norm = None
                if tc.max_grad_norm is not None:
                    grad_norm = _clip(accelerator, params, tc.max_grad_norm, fsdp)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                samples += tc.micro_batch_size * tc.grad_accum
                tokens += tokens_per_step
                window.add_tokens(tokens_per_step)
                if not math.isfinite(parts_acc.get("loss", 0.0)):
                    raise DivergenceError(f"loss is {parts_acc.get('loss')} at step {step}")

                if step % tc.log_every == 0 or step == total_steps:
                    now = time.perf_counter()
                    energy = meter.energy_j()
                    record = {"kind": "train", "step": step, "tokens": tokens,
                              "lr": scheduler.get_last_lr()[0], **parts_acc,
                              "grad_norm": grad_norm,
                              "tokens_per_s": (tokens - tok_last) / max(now - t_last, 1e-9),
                              "energy_j": None if energy is None else prior_energy + energy}
                    peak = _peak_memory_gb(accelerator)
                    if peak is not None:
                        record["gpu_mem_peak_gb"] = peak
                    if guard is not None:
                        with accelerator.autocast():
                            lm = core.lm_loss(inputs)
                        # every rank sees the same value, so all stop at the same step
                        record["lm_loss"] = _mean_over_ranks(accelerator, {"lm": lm})["lm"]
                        guard.update(record["lm_loss"], step)
                    metrics.write(record)
                    t_last, tok_last = now, tokens
                    bar.update(task, completed=step, loss=parts_acc.get("loss", float("nan")),
                               tps=record["tokens_per_s"])
                else:
                    # Same per-step losses in the log on every step for exact-resume checks.
                    metrics.write({"kind": "step", "step": step, "loss": parts_acc["loss"]})
                if tc.eval_every and step % tc.eval_every == 0 and (heldout / "manifest.json"
                                                                    ).exists():
                    ev = heldout_loss(core, heldout, tokens=tc.eval_tokens,
                                      batch_size=tc.micro_batch_size, device=device,
                                      autocast=accelerator.autocast)
                    if task_eval is not None and accelerator.is_main_process:
                        ev.update(task_eval(core.student, tokenizer))  # suite, tasks
                    energy = meter.energy_j()
                    metrics.write({"kind": "eval", "step": step, "tokens": tokens, **ev,
                                   "energy_j": None if energy is None else prior_energy + energy})

                done_by_energy = False
                if tc.energy_budget_j is not None:
                    energy = meter.energy_j()
                    done_by_energy = _any_rank(accelerator, energy is not None and
                                               prior_energy + energy >= tc.energy_budget_j)
                stop_signal = _any_rank(accelerator, preempt.received is not None)
                wants_ckpt = tc.checkpoint_every and step % tc.checkpoint_every == 0
                if wants_ckpt or stop_signal:
                    progress_rec = {"samples": samples, "tokens": tokens,
                                    "energy_j": prior_energy + (meter.energy_j() or 0.0),
                                    "guard": guard.values if guard is not None else None,
                                    "world_size": world, "strategy": strategy}
                    states = (sharding.full_states(core, optimizer, frozen=full_weights)
                              if fsdp else None)
                    checkpoint.save(run_dir, step, module=core, optimizer=optimizer,
                                    scheduler=scheduler, progress=progress_rec,
                                    full_weights=full_weights, keep_last=tc.keep_last,
                                    rank=rank, rng_by_rank=_rng_by_rank(accelerator),
                                    states=states)
                    meter.progress("checkpoint")  # the ledger holds the energy up to here
                if stop_signal:
                    status = "preempted"
                    break
                if tc.max_tokens is not None and tokens >= tc.max_tokens:
                    break
                if done_by_energy:
                    status = "budget"
                    log.info("energy budget %.1f J reached at step %d", tc.energy_budget_j, step)
                    break

    # ---- 5. finish
    final_dir = None
    # FSDP: the whole state is gathered to rank 0 (a collective), which writes final/ from it.
    gathered = (sharding.full_model_state(core, frozen=full_weights)
                if fsdp and status != "preempted" else None)
    if status != "preempted" and accelerator.is_main_process:
        final_dir = save_final(run_dir, core, tokenizer, job, step=step, tokens=tokens,
                               state=gathered)
    if accelerator.is_main_process:
        write_run_json(run_dir, status=status, step=step, tokens=tokens,
                       final=str(final_dir) if final_dir else None,
                       fused_logit_loss=fused_path.decisions())
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, status, step, tokens, final_dir)


def _clip(accelerator: Any, params: list[torch.Tensor], max_norm: float, fsdp: bool) -> float:
    """Clip the global gradient norm; under FSDP the norm of sharded gradients is a DTensor
    whose full value needs a reduction over the ranks."""
    if not fsdp:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _rng_by_rank(accelerator: Any) -> list[dict[str, Any]]:
    """Every rank's RNG states (a collective: all ranks call it at the same step)."""
    state = checkpoint.rng_state()
    if accelerator.num_processes == 1:
        return [state]
    from accelerate.utils import gather_object

    return gather_object([state])


def _mean_over_ranks(accelerator: Any, parts: dict[str, float]) -> dict[str, float]:
    """Logged losses are the global batch's (mean over ranks, equal token counts per rank),
    so a DDP run's log is comparable with a single-process run of the same global batch."""
    if accelerator.num_processes == 1:
        return parts
    keys = sorted(parts)
    t = torch.tensor([parts[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))


def _peak_memory_gb(accelerator: Any) -> float | None:
    """Largest peak of allocated GPU memory on any rank since the start (GB), the figure that
    says whether a model fits; None off CUDA."""
    device = accelerator.device
    if device.type != "cuda":
        return None
    t = torch.tensor([torch.cuda.max_memory_allocated(device) / 1e9], device=device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return round(t.item(), 3)


def _any_rank(accelerator: Any, flag: bool) -> bool:
    """True on every rank if it is true on any (energy is read on one rank per node, and a
    preemption signal may reach only some ranks): all ranks must stop at the same step."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def save_final(run_dir: Path, objective: Any, tokenizer: Any, job: TrainJob, *, step: int,
               tokens: int, state: dict[str, torch.Tensor] | None = None) -> Path:
    """final/: an HF folder `from_pretrained` loads, plus projector.pt and wattkd.json.
    `state`: the objective's full state dict gathered from FSDP shards (else read here)."""
    from peft import PeftModel

    from wattkd.models import store_frozen_linears

    final = run_dir / "final"
    student = objective.student
    lora = job.student.lora
    with atomic_dir(final) as tmp:  # replaces an older final/ only once the new one is whole
        if state is not None:
            from wattkd.sharding import drop_tied_duplicates

            own = {k.removeprefix("student."): v for k, v in state.items()
                   if k.startswith("student.")}
            # PeftModel.save_pretrained keeps the adapter's entries of a full state dict.
            student.save_pretrained(tmp, state_dict=drop_tied_duplicates(student, own))
        elif isinstance(student, PeftModel):
            if lora is not None and lora.merge_on_save:
                import copy

                merged = copy.deepcopy(student)
                # W + delta summed in fp32 even when the frozen base is stored in bf16.
                store_frozen_linears(merged, torch.float32)
                merged.merge_and_unload().save_pretrained(tmp)
            else:
                student.save_pretrained(tmp)
        else:
            student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        projectors = getattr(objective.mode, "projectors", None)
        if projectors is not None:
            proj_state = projectors.state_dict() if state is None else {
                k.removeprefix("mode.projectors."): v for k, v in state.items()
                if k.startswith("mode.projectors.")}
            torch.save({"layer_map": job.method.layer_map, "state_dict": proj_state},
                       tmp / "projector.pt")
        (tmp / "wattkd.json").write_text(json.dumps({
            "method": job.method.name, "mode": job.method.mode, "repeat": job.repeat,
            "teacher": job.teacher_path or job.cfg.teacher.model, "steps": step,
            "tokens": tokens, "layer_map": job.method.layer_map}, indent=2))
    return final


def _finetune_use(cfg: ExperimentConfig, job: TrainJob, run_dir: Path, uses_teacher: bool
                  ) -> dict[str, Any] | None:
    """A student that reads a teacher fine-tuned here registers as one of its users (the
    report amortises the fine-tune energy over them); None otherwise."""
    if job.role != "student" or not uses_teacher or not cfg.teacher.finetuned:
        return None
    from wattkd.teacher_adapt import record_finetune_use

    return record_finetune_use(cfg.out / "teacher", run_dir)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()



def _progress(enabled: bool, total: int | None, name: str) -> Any:
    if not enabled:
        return NoBar()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}"),
                   TextColumn("{task.fields[tps]:,.0f} tok/s"), TimeRemainingColumn(),
                   transient=False)
    real_add = bar.add_task

    def add_task(description: str, total: int | None = None, start_step: int = 0) -> Any:
        return real_add(description, total=total, completed=start_step, loss=float("nan"),
                        tps=0.0)

    bar.add_task = add_task  # type: ignore[method-assign]
    return bar
