"""One training loop for every KD mode and the no-KD baseline, readable top to bottom.

    wattkd train CONFIG --method response [--repeat 0] [--resume auto]

`train` is the whole story in order: check the inputs before a model is loaded; build the
accelerator, models, objective and optimizer; resume from the newest checkpoint; then the loop
(teacher signals -> student step -> optimizer step -> log / eval / checkpoint / stop decisions)
inside the energy meter's `train` phase window; finish with final/ and run.json. What the jobs
are (and whether a run already finished) lives in `wattkd.jobs`; the loop's parts (metrics log,
divergence guard, held-out loss, final/, cross-rank agreement) in `wattkd.training`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from rich.progress import MofNCompleteColumn
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from wattkd import checkpoint, sharding
from wattkd.amortisation import record_cache_use, record_finetune_use
from wattkd.body_kernels import apply_body_kernels
from wattkd.config import ExperimentConfig, MethodConfig, TrainConfig, dump
from wattkd.data.loader import ShardDataset
from wattkd.distill.fused import path as fused_path
from wattkd.distill.methods import get_method
from wattkd.distill.modes import make_mode
from wattkd.distill.objective import DistillObjective, StepInputs
from wattkd.distill.registry import get_loss
from wattkd.distill.teacher import OnlineTeacher
from wattkd.energy.ledger import make_meter
from wattkd.errors import note_run_dir
from wattkd.eval.in_training import task_evaluator
from wattkd.hashing import file_sha256
from wattkd.jobs import TrainJob, TrainResult, budget_reached, finished_run
from wattkd.models import (
    build_student,
    check_vocab,
    frozen_linear_dtype,
    load_teacher,
    parameter_count,
    resolve_device,
    student_frozen_dtype,
    teacher_dims,
)
from wattkd.preflight import check_stage_inputs, check_training
from wattkd.progress import progress_bar
from wattkd.runinfo import run_history, write_run_json
from wattkd.runlock import RunFolderBusy, RunLock
from wattkd.teacher_cache import CachedTeacher, check_cache
from wattkd.training.batches import batches
from wattkd.training.final import save_final
from wattkd.training.guard import DivergenceError, DivergenceGuard
from wattkd.training.heldout import heldout_loss
from wattkd.training.metrics_log import MetricsLog
from wattkd.training.ranks import (
    any_rank,
    clip_grad_norm,
    mean_over_ranks,
    peak_memory_gb,
    rng_by_rank,
)
from wattkd.training.resume import ResumePlan, archive_previous, plan_resume
from wattkd.training.rollouts import (
    NO_PHASES,
    STATE_KEY,
    StepPhases,
    TopKScores,
    load_rollout_state,
    make_rollouts,
)

log = logging.getLogger(__name__)


def train(job: TrainJob, *, resume: str = "auto", progress: bool = True,
          allow_config_change: bool = False) -> TrainResult:
    """Train one student (or the demo teacher) and write its run directory."""
    inputs = check_inputs(job, resume)                       # 1. nothing expensive yet
    bf16 = use_bf16(job.train, inputs.device)
    frozen_dtype = student_frozen_dtype(job.student, bf16)   # refuses bf16 storage without bf16
    accelerator = make_accelerator(job.method, bf16, inputs.device)
    with lock_run_folder(job, accelerator) as lock:          # one writer per run folder
        done = already_trained(job, resume, accelerator)
        if done is not None:
            return done
        plan = plan_resume(job, resume, allow_config_change)  # a changed config: refused here
        run = setup(job, inputs, accelerator, bf16, frozen_dtype)  # 2. models, optimizer
        pos = resume_position(run, plan)                     # 3. exact resume
        record_start(run, pos, plan, lock)                   # the first write to the folder
        status = run_loop(run, pos, progress)                # 4. the loop
        return finish(run, pos, status)                      # 5. final/ and run.json


# ------------------------------------------------------------------------ what setup builds
@dataclass
class Inputs:
    """What the checks before any model is loaded found."""

    shards: Path
    tokenizer: Any
    seq_len: int
    needs_teacher: bool   # the method reads teacher signals
    uses_teacher: bool    # ... or the student starts from the teacher's layers
    device: torch.device
    task_eval: Any        # eval.train_suite's scorer, or None
    cache_manifest: dict[str, Any] | None  # the teacher cache, checked once (signals included)


@dataclass
class Run:
    """One run as set up: the job, its inputs, the accelerator and what it trains."""

    job: TrainJob
    inputs: Inputs
    accelerator: Accelerator
    bf16: bool
    fsdp: bool
    student: Any
    objective: Any        # what the step calls (DDP-wrapped when there are several ranks)
    core: Any             # the objective itself: checkpoints, held-out loss, final/
    provider: Any         # teacher signals: OnlineTeacher, CachedTeacher or None
    cache_use: dict[str, Any] | None
    params: list[torch.Tensor]
    optimizer: Any
    scheduler: Any
    tokens_per_step: int
    total_steps: int | None
    rollouts: Any = None  # on-policy methods: training.rollouts.RolloutSource

    @property
    def cfg(self) -> ExperimentConfig:
        return self.job.cfg

    @property
    def tc(self) -> TrainConfig:
        return self.job.train

    @property
    def method(self) -> MethodConfig:
        return self.job.method

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def strategy(self) -> str:
        return "fsdp" if self.fsdp else "ddp"   # the checkpoint format (DDP = single process)

    @property
    def full_weights(self) -> bool:
        return self.job.student.lora is None


@dataclass
class Position:
    """Where the run stands: restored from a checkpoint, advanced by every step."""

    step: int = 0
    samples: int = 0
    tokens: int = 0
    prior_energy: float = 0.0        # energy of the runs before this resume (J)
    guard: list[float] | None = None  # the divergence guard's values so far
    checkpoint: Path | None = None    # resumed from


# ---------------------------------------------------------------------------- 1. the checks
def check_inputs(job: TrainJob, resume: str) -> Inputs:
    """Validate shards, tokenizer, teacher, cache, --resume, eval suite and the configs before
    anything expensive (no model is loaded here)."""
    cfg, tc = job.cfg, job.train
    needs_teacher = job.method.needs_teacher
    uses_teacher = needs_teacher or job.student.from_teacher_layers is not None
    probe = check_stage_inputs(cfg, job.teacher_path, uses_teacher)  # shards, tokenizer, teacher
    shards, tokenizer = probe.path, probe.tokenizer
    cache_manifest = None
    if needs_teacher and cfg.distill.teacher_signals == "cache":
        request = get_method(job.method.method).signals(job.method)
        cache_manifest = check_cache(cfg, shards, request=request)
    device = resolve_device(tc.device)
    if resume not in ("auto", "never") and not Path(resume).is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint directory")
    # eval.train_suite: resolved and its tasks loaded now, before any model is built
    task_eval = task_evaluator(cfg.eval, eval_every=tc.eval_every, strategy=tc.strategy)
    check_training(job, probe, resume)  # configs, layers, vocab, lengths, disk: nothing loaded
    return Inputs(shards, tokenizer, probe.seq_len, needs_teacher, uses_teacher, device,
                  task_eval, cache_manifest)


def use_bf16(train: TrainConfig, device: torch.device) -> bool:
    if train.precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return train.precision == "bf16"


def make_accelerator(method: MethodConfig, bf16: bool, device: torch.device) -> Accelerator:
    """The process group (single process, DDP or FSDP under torchrun / accelerate / srun)."""
    # Without a logit term the LM head (and layers past the last mapped one) get no gradient:
    # DDP must be told, or it fails at the second step.
    has_logit_term = any(get_loss(t.name).kind == "logit" and t.weight > 0
                         for t in method.losses)
    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=not has_logit_term)
    return Accelerator(mixed_precision="bf16" if bf16 else "no",
                       cpu=device.type == "cpu", kwargs_handlers=[ddp_kwargs])


@contextmanager
def lock_run_folder(job: TrainJob, accelerator: Accelerator) -> Iterator[RunLock | None]:
    """Rank 0 holds the run folder's lock for the whole run (the other ranks of the run do not
    lock); when it cannot, every rank stops with its error."""
    lock = RunLock(job.run_dir, job.role if job.role != "student" else "train")
    busy: RunFolderBusy | None = None
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except RunFolderBusy as exc:
            busy = exc
    if any_rank(accelerator, busy is not None):
        raise busy or RunFolderBusy(f"{job.run_dir}: rank 0 could not lock the run folder "
                                    "(its error names the holder)")
    try:
        yield lock if accelerator.is_main_process else None
    finally:
        lock.release()


def already_trained(job: TrainJob, resume: str, accelerator: Accelerator) -> TrainResult | None:
    """The result of a finished run that this config asks nothing more of, else None."""
    run_dir = job.run_dir
    done = finished_run(run_dir) if resume == "auto" else None
    if not any_rank(accelerator, done is None or not budget_reached(done, job.train)):
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
    return None


# ------------------------------------------------------- 2. models, objective, optimizer
def setup(job: TrainJob, inputs: Inputs, accelerator: Accelerator, bf16: bool,
          frozen_dtype: torch.dtype) -> Run:
    """Run folder, models, objective (sharded under FSDP), teacher signals, optimizer."""
    tc, run_dir = job.train, job.run_dir
    fsdp = tc.strategy == "fsdp" and accelerator.num_processes > 1
    shard_teacher = fsdp and tc.fsdp.shard_teacher
    torch.manual_seed(job.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    teacher, student, dims, vocab = build_models(job, inputs, accelerator.device,
                                                 frozen_dtype, shard_teacher)
    objective = build_objective(job, student, dims, vocab)
    if fsdp:
        if teacher is not None and shard_teacher:
            sharding.shard_teacher(teacher)
        sharding.shard_objective(objective, student, bf16=bf16,
                                 reshard_after_forward=tc.fsdp.reshard_after_forward)
    provider, cache_use = teacher_signals(job, inputs, teacher, objective.mode, accelerator)
    rollouts = make_rollouts(objective.mode, student, seed=job.seed,
                             rank=accelerator.process_index, device=accelerator.device,
                             eos_token_id=inputs.tokenizer.eos_token_id,
                             autocast=accelerator.autocast,
                             decode_dtype=torch.bfloat16 if bf16 else None)
    if rollouts is not None and rollouts.p.teacher_topk and provider is not None:
        provider = TopKScores(provider, rollouts.p.teacher_topk, objective.vocab,
                              job.cfg.distill.logit_chunk_tokens)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tc.betas,
                                  weight_decay=tc.weight_decay)
    tokens_per_step = (tc.micro_batch_size * tc.grad_accum * accelerator.num_processes
                       * (rollouts.sequence_tokens if rollouts is not None else inputs.seq_len))
    total_steps = tc.max_steps
    if tc.max_tokens is not None:
        by_tokens = math.ceil(tc.max_tokens / tokens_per_step)
        total_steps = by_tokens if total_steps is None else min(total_steps, by_tokens)
    scheduler = make_scheduler(optimizer, tc, total_steps)
    if not fsdp:  # FSDP is applied above, by hand; accelerate wraps the rest (DDP or nothing)
        objective, optimizer = accelerator.prepare(objective, optimizer)
    core = accelerator.unwrap_model(objective)
    return Run(job, inputs, accelerator, bf16, fsdp, student, objective, core, provider,
               cache_use, params, optimizer, scheduler, tokens_per_step, total_steps, rollouts)


def build_models(job: TrainJob, inputs: Inputs, device: torch.device,
                 frozen_dtype: torch.dtype, shard_teacher: bool
                 ) -> tuple[Any, Any, Any, int]:
    """(teacher kept for online signals or None, student, teacher dims, vocab size)."""
    cfg, tc, tokenizer = job.cfg, job.train, inputs.tokenizer
    teacher = None
    init_from_teacher = job.student.from_teacher_layers is not None
    if init_from_teacher or (inputs.needs_teacher and cfg.distill.teacher_signals == "online"):
        # A teacher to be sharded is loaded on the CPU; sharding moves its parts over.
        teacher = load_teacher(cfg.teacher, device=torch.device("cpu") if shard_teacher
                               else device, vocab_size=len(tokenizer),
                               seed=cfg.train.seed, path_override=job.teacher_path,
                               compute_device=device)
    student = build_student(job.student, teacher=teacher, vocab_size=len(tokenizer),
                            seed=job.seed, frozen_dtype=frozen_dtype)
    dims = (teacher_dims(cfg.teacher, job.teacher_path, teacher) if inputs.needs_teacher
            else None)
    if teacher is not None and (not inputs.needs_teacher
                                or cfg.distill.teacher_signals == "cache"):
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
    for model in (student, teacher):
        if model is not None:
            apply_body_kernels(model, tc.body_kernels, device)
    vocab = check_vocab(teacher, student, len(tokenizer))
    return teacher, student, dims, vocab


def build_objective(job: TrainJob, student: Any, dims: Any, vocab: int) -> DistillObjective:
    """The method's mode (its teacher-signal request and new parameters) and the objective:
    student forward + the method's weighted losses."""
    method, tc = job.method, job.train
    # New parameters (projectors) from the repeat's seed alone, whatever was loaded before.
    torch.manual_seed(job.seed)
    mode = make_mode(method, student, dims, batch_size=tc.micro_batch_size)
    objective = DistillObjective(student, mode, method, vocab=vocab,
                                 chunk_tokens=job.cfg.distill.logit_chunk_tokens)
    fused_path.set_path(job.cfg.distill.fused_kernel)
    return objective


def teacher_signals(job: TrainJob, inputs: Inputs, teacher: Any, mode: Any,
                    accelerator: Accelerator) -> tuple[Any, dict[str, Any] | None]:
    """(provider of the mode's teacher signals: the online teacher or the cache, or None;
    the cache-use record of run.json)."""
    if not inputs.needs_teacher or mode.request.empty:
        return None, None
    if teacher is not None:
        return OnlineTeacher(teacher, mode.request), None
    provider = CachedTeacher(job.cfg, mode.request, rank=accelerator.process_index,
                             world_size=accelerator.num_processes, device=accelerator.device,
                             manifest=inputs.cache_manifest)
    cache_use = (record_cache_use(job.cfg.cache_dir, job.run_dir)
                 if accelerator.is_main_process else None)
    return provider, cache_use


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int | None):
    if train.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, train.warmup_steps)
    if total_steps is None:
        raise ValueError(f"train.schedule={train.schedule!r} needs max_steps or max_tokens to "
                         "know its length; use schedule: constant with an energy-only budget")
    fn = (get_cosine_schedule_with_warmup if train.schedule == "cosine"
          else get_linear_schedule_with_warmup)
    return fn(optimizer, train.warmup_steps, total_steps)


# -------------------------------------------------------------------------------- 3. resume
def resume_position(run: Run, plan: ResumePlan) -> Position:
    """Restore model, optimizer, scheduler, RNG and data position from the checkpoint the plan
    chose (the newest valid one for `auto`, a given one, or none)."""
    ckpt = plan.checkpoint
    if ckpt is None:
        return Position()
    meta = checkpoint.load(ckpt, module=run.core, optimizer=run.optimizer,
                           scheduler=run.scheduler, rank=run.rank, sharded=run.fsdp)
    pos = Position(meta["step"], meta["samples"], meta["tokens"],
                   meta.get("energy_j") or 0.0, checkpoint=ckpt)
    if meta.get("world_size", run.world) != run.world:
        raise checkpoint.CheckpointError(
            f"{ckpt} was written by {meta['world_size']} ranks, this run has {run.world}: "
            "the data position is per rank, so resume with the same number of processes")
    pos.guard = meta.get("guard")
    if run.rollouts is not None:  # the rollout RNG and the rollouts kept for reuse
        run.rollouts.load_state_dict(load_rollout_state(ckpt, run.rank))
    return pos


def record_start(run: Run, pos: Position, plan: ResumePlan, lock: RunLock | None) -> None:
    """The first write to the run folder, after every check: an earlier run's records archived
    (a fresh start over them), config.yaml, and run.json "running" with what runs, the config
    changes this resume accepted and a lock taken over from a dead process (an error reaching
    the CLI marks it failed)."""
    if not run.accelerator.is_main_process:
        return
    job, cfg, method, inputs = run.job, run.cfg, run.method, run.inputs
    if plan.archive and pos.checkpoint is None:
        archive_previous(job.run_dir)
    (job.run_dir / "config.yaml").write_text(dump(cfg))
    history = run_history(job.run_dir)
    if plan.changes:
        history["config_changes"].append({"step": plan.step, "changes": plan.changes})
    if lock is not None and lock.taken_over:
        history["lock_takeovers"].append(lock.taken_over)
    write_run_json(job.run_dir, status="running", method=method.name, mode=method.method,
                   repeat=job.repeat, seed=job.seed, teacher=job.teacher_path or
                   cfg.teacher.model, teacher_signals=cfg.distill.teacher_signals
                   if inputs.needs_teacher else None, shards=str(inputs.shards),
                   shards_sha256=file_sha256(inputs.shards / "manifest.json"),
                   parameters=parameter_count(run.student),
                   precision="bf16" if run.bf16 else "fp32", world_size=run.world,
                   frozen_base_dtype=frozen_linear_dtype(run.student),
                   resumed_from=str(pos.checkpoint) if pos.checkpoint else None,
                   teacher_cache=run.cache_use, role=job.role,
                   seeds={"data_order": job.seed, "init": job.seed},
                   teacher_finetune=_finetune_use(job, inputs.uses_teacher), **history)
    note_run_dir(job.run_dir)


def _finetune_use(job: TrainJob, uses_teacher: bool) -> dict[str, Any] | None:
    """A student that reads a teacher fine-tuned here registers as one of its users (the
    report amortises the fine-tune energy over them); None otherwise."""
    if job.role != "student" or not uses_teacher or not job.cfg.teacher.finetuned:
        return None
    return record_finetune_use(job.cfg.out / "teacher", job.run_dir)


# ------------------------------------------------------------------------------ 4. the loop
@dataclass
class Loop:
    """What the loop writes to and reads each step besides the run and its position."""

    meter: Any
    metrics: MetricsLog
    bar: Any
    task: Any
    window: Any               # the meter's `train` phase window
    preempt: checkpoint.PreemptionSignal
    guard: DivergenceGuard | None
    t_last: float             # time and tokens at the last logged step (tok/s)
    tok_last: int
    phases: StepPhases = NO_PHASES  # energy windows inside the step (on-policy methods)


def run_loop(run: Run, pos: Position, progress: bool) -> str:
    """Step until a stop decision; the status: completed | preempted | budget."""
    stream = data_stream(run, pos)
    guard = divergence_guard(run.method, pos.guard)
    metrics = MetricsLog(run.job.run_dir, run.tc.tensorboard, run.accelerator.is_main_process)
    # One meter per node (local rank 0 reads the node's GPUs); all nodes append to the ledger.
    meter = make_meter(run.cfg.telemetry,
                       run.job.run_dir if run.accelerator.is_local_main_process else None)
    bar = progress_bar(progress and run.accelerator.is_main_process, MofNCompleteColumn(),
                       "loss {task.fields[loss]:.4f}", "{task.fields[tps]:,.0f} tok/s")
    run.objective.train()
    with meter, checkpoint.PreemptionSignal() as preempt, bar, metrics:
        task = bar.add_task(f"train {run.method.name}", total=run.total_steps,
                            completed=pos.step, loss=float("nan"), tps=0.0)
        with meter.phase("train", method=run.method.name, repeat=run.job.repeat,
                         start_step=pos.step) as window:
            loop = Loop(meter, metrics, bar, task, window, preempt, guard,
                        time.perf_counter(), pos.tokens)
            if run.rollouts is not None:
                loop.phases = StepPhases(meter, run.rollouts.p.phase_every)
            while run.total_steps is None or pos.step < run.total_steps:  # max steps
                with loop.phases.step(pos.step + 1, run.tokens_per_step):
                    parts, grad_norm, inputs = train_step(run, stream, loop.phases, pos.step)
                advance(run, pos, loop, parts)
                log_step(run, pos, loop, parts, grad_norm, inputs)
                evaluate(run, pos, loop)
                status = stop_decision(run, pos, loop)
                if status is not None:
                    if not full_record_due(run, pos.step):   # the stop step's figures too
                        log_step(run, pos, loop, parts, grad_norm, inputs, final=True)
                    return status
    return "completed"


def data_stream(run: Run, pos: Position) -> Iterator[dict[str, torch.Tensor]]:
    """Batches in the seeded, rank-aware order, continuing after the samples already used."""
    data = ShardDataset(run.inputs.shards, rank=run.rank, world_size=run.world,
                        seed=run.job.seed, shuffle=True, start=pos.samples, loop=True,
                        verify="size")
    stream = batches(data, run.tc.micro_batch_size)
    if run.provider is not None and hasattr(run.provider, "prefetch"):
        stream = run.provider.prefetch(stream)  # cache rows read ahead, same batches, same order
    return stream


def divergence_guard(method: MethodConfig, resumed: list[float] | None
                      ) -> DivergenceGuard | None:
    """Feature/relation runs without a CE term are watched for a climbing LM loss."""
    guard = None
    has_ce = any(t.name == "ce" and t.weight > 0 for t in method.losses)
    if get_method(method.method).guard and method.guard.enabled and not has_ce:
        guard = DivergenceGuard(method.guard.window, method.guard.max_ratio)
        guard.values = list(resumed or [])
    return guard


def rollout_tokens(run: Run) -> int:
    """Tokens the last rollouts generated on all ranks (completions stopped at EOS differ in
    length between ranks, so one rank's count times the world size would be approximate)."""
    n = run.rollouts.last_new_tokens
    if run.world == 1:
        return n
    t = torch.tensor([n], dtype=torch.long, device=run.accelerator.device)
    return int(run.accelerator.reduce(t, reduction="sum").item())


def train_step(run: Run, stream: Iterator[dict[str, torch.Tensor]],
               phases: StepPhases = NO_PHASES, step: int = 0
               ) -> tuple[dict[str, float], float | None, StepInputs]:
    """One optimizer step over grad_accum micro-batches: (losses as the global batch's mean,
    gradient norm before clipping, the last micro-batch's inputs). On-policy methods first
    turn each batch into rollouts; `phases` meters rollout / score / update."""
    tc, accelerator, objective = run.tc, run.accelerator, run.objective
    parts_acc: dict[str, float] = {}
    for micro in range(tc.grad_accum):
        if run.rollouts is not None:   # the prompts' read counts to the rollout phase
            phases.switch("rollout")
            batch = run.rollouts.batch(next(stream), step, micro)
            phases.switch("rollout", rollout_tokens(run))
        else:
            batch = next(stream)
        inputs = StepInputs.from_batch(batch, accelerator.device)
        seq_tokens = inputs.input_ids.numel() * run.world
        phases.switch("score", seq_tokens)
        signals = run.provider.signals(batch) if run.provider is not None else None
        phases.switch("update", seq_tokens)
        sync = micro == tc.grad_accum - 1
        if run.fsdp:  # reduce-scatter gradients only on the last micro-batch
            objective.set_requires_gradient_sync(sync)
            ctx = accelerator.autocast()
        else:
            ctx = nullcontext() if sync else accelerator.no_sync(objective)
        with ctx:
            loss, parts = objective(inputs, signals)
            accelerator.backward(loss / tc.grad_accum)
        for k, v in parts.items():
            parts_acc[k] = parts_acc.get(k, 0.0) + v / tc.grad_accum
    parts_acc = mean_over_ranks(accelerator, parts_acc)
    grad_norm = None
    if tc.max_grad_norm is not None:
        grad_norm = clip_grad_norm(accelerator, run.params, tc.max_grad_norm, run.fsdp)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return parts_acc, grad_norm, inputs


def advance(run: Run, pos: Position, loop: Loop, parts: dict[str, float]) -> None:
    """Count the step; a non-finite loss stops the run here."""
    pos.step += 1
    pos.samples += run.tc.micro_batch_size * run.tc.grad_accum
    pos.tokens += run.tokens_per_step
    loop.window.add_tokens(run.tokens_per_step)
    if not math.isfinite(parts.get("loss", 0.0)):
        raise DivergenceError(f"loss is {parts.get('loss')} at step {pos.step}")


def full_record_due(run: Run, step: int) -> bool:
    """A full `train` record every log_every steps and at the last step of max_steps."""
    return step % run.tc.log_every == 0 or step == run.total_steps


def log_step(run: Run, pos: Position, loop: Loop, parts: dict[str, float],
             grad_norm: float | None, inputs: StepInputs, *, final: bool = False) -> None:
    """metrics.jsonl: a full `train` record every log_every steps (and the last), else the
    step's loss alone (every step's loss is logged, for exact-resume checks). `final`: the
    full record of a step that stopped the run between those (energy budget, max tokens,
    preemption), after its loss record, so the last interval's rate and energy are kept."""
    accelerator, step = run.accelerator, pos.step
    if not (final or full_record_due(run, step)):
        loop.metrics.write({"kind": "step", "step": step, "loss": parts["loss"]})
        return
    now = time.perf_counter()
    energy = loop.meter.energy_j()
    record = {"kind": "train", "step": step, "tokens": pos.tokens,
              "lr": run.scheduler.get_last_lr()[0], **parts, "grad_norm": grad_norm,
              "tokens_per_s": (pos.tokens - loop.tok_last) / max(now - loop.t_last, 1e-9),
              "energy_j": None if energy is None else pos.prior_energy + energy}
    if final:
        record["final"] = True   # a second record of this step (energy/killed_tokens.py)
    peak = peak_memory_gb(accelerator)
    if peak is not None:
        record["gpu_mem_peak_gb"] = peak
    if loop.guard is not None and not final:   # the stop decided stands: no new guard check
        with accelerator.autocast():
            lm = run.core.lm_loss(inputs)
        # every rank sees the same value, so all stop at the same step
        record["lm_loss"] = mean_over_ranks(accelerator, {"lm": lm})["lm"]
        loop.guard.update(record["lm_loss"], step)
    loop.metrics.write(record)
    loop.t_last, loop.tok_last = now, pos.tokens
    loop.bar.update(loop.task, completed=step, loss=parts.get("loss", float("nan")),
                    tps=record["tokens_per_s"])


def evaluate(run: Run, pos: Position, loop: Loop) -> None:
    """Every eval_every steps: held-out loss (and eval.train_suite's tasks on rank 0)."""
    tc, heldout = run.tc, run.cfg.shards_dir / "heldout"
    if not (tc.eval_every and pos.step % tc.eval_every == 0
            and (heldout / "manifest.json").exists()):
        return
    ev = heldout_loss(run.core, heldout, tokens=tc.eval_tokens, batch_size=tc.micro_batch_size,
                      device=run.accelerator.device, autocast=run.accelerator.autocast)
    if run.inputs.task_eval is not None and run.accelerator.is_main_process:
        ev.update(run.inputs.task_eval(run.core.student, run.inputs.tokenizer))  # suite, tasks
    energy = loop.meter.energy_j()
    loop.metrics.write({"kind": "eval", "step": pos.step, "tokens": pos.tokens, **ev,
                        "energy_j": None if energy is None else pos.prior_energy + energy})


def stop_decision(run: Run, pos: Position, loop: Loop) -> str | None:
    """After a step: checkpoint when due or signalled; why the run stops (preempted, max
    tokens -> completed, energy budget), or None to go on. Every decision is agreed across
    ranks, so all ranks stop at the same step (max steps is the loop's own condition)."""
    tc, accelerator = run.tc, run.accelerator
    done_by_energy = False
    if tc.energy_budget_j is not None:
        energy = loop.meter.energy_j()
        done_by_energy = any_rank(accelerator, energy is not None and
                                  pos.prior_energy + energy >= tc.energy_budget_j)
    stop_signal = any_rank(accelerator, loop.preempt.received is not None)
    wants_ckpt = tc.checkpoint_every and pos.step % tc.checkpoint_every == 0
    if wants_ckpt or stop_signal:
        save_checkpoint(run, pos, loop)
    if stop_signal:
        return "preempted"
    if tc.max_tokens is not None and pos.tokens >= tc.max_tokens:
        return "completed"
    if done_by_energy:
        log.info("energy budget %.1f J reached at step %d", tc.energy_budget_j, pos.step)
        return "budget"
    return None


def save_checkpoint(run: Run, pos: Position, loop: Loop) -> None:
    """An atomic checkpoint of everything exact resume needs; the ledger records the energy
    up to here."""
    progress_rec = {"samples": pos.samples, "tokens": pos.tokens,
                    "energy_j": pos.prior_energy + (loop.meter.energy_j() or 0.0),
                    "guard": loop.guard.values if loop.guard is not None else None,
                    "world_size": run.world, "strategy": run.strategy}
    states = (sharding.full_states(run.core, run.optimizer, frozen=run.full_weights)
              if run.fsdp else None)
    checkpoint.save(run.job.run_dir, pos.step, module=run.core, optimizer=run.optimizer,
                    scheduler=run.scheduler, progress=progress_rec,
                    full_weights=run.full_weights, keep_last=run.tc.keep_last, rank=run.rank,
                    rng_by_rank=rng_by_rank(run.accelerator, None if run.rollouts is None else
                                            {STATE_KEY: run.rollouts.state_dict()}),
                    states=states)
    loop.meter.progress("checkpoint")


# ------------------------------------------------------------------------------ 5. finish
def finish(run: Run, pos: Position, status: str) -> TrainResult:
    """final/ (unless preempted) and run.json's end status."""
    run_dir, accelerator = run.job.run_dir, run.accelerator
    final_dir = None
    # FSDP: the whole state is gathered to rank 0 (a collective), which writes final/ from it.
    gathered = (sharding.full_model_state(run.core, frozen=run.full_weights)
                if run.fsdp and status != "preempted" else None)
    if status != "preempted" and accelerator.is_main_process:
        final_dir = save_final(run_dir, run.core, run.inputs.tokenizer, run.job, step=pos.step,
                               tokens=pos.tokens, state=gathered)
    if accelerator.is_main_process:
        write_run_json(run_dir, status=status, step=pos.step, tokens=pos.tokens,
                       final=str(final_dir) if final_dir else None,
                       fused_logit_loss=fused_path.decisions())
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, status, pos.step, pos.tokens, final_dir)
