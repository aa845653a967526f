"""Experiment configuration: one pydantic schema, the only place defaults live.

`load(path)` reads a YAML file and returns an `ExperimentConfig`. Unknown keys and wrong types
raise `ConfigError` naming the file, the dotted key and what was expected, before any
expensive work starts; a key given twice is refused with both lines (wattkd.yamlfile), and `~`
is expanded in every path field at load (`PathStr`), so every stage sees the same path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from wattkd.errors import ConfigError
from wattkd.names import safe_name as _safe_name
from wattkd.yamlfile import check_duplicate_keys, load_yaml


class Strict(BaseModel):
    """Base for every section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _expand_home(value: str) -> str:
    """`~` and `~user` at the start of a path mean a home folder, in every path field alike."""
    return os.path.expanduser(value) if value.startswith("~") else value


# A path field (or a field that is a path or a hub id): `~` is expanded once, at load.
PathStr = Annotated[str, AfterValidator(_expand_home)]


# Folders of the experiment's output directory that stages own: a method can't be named so.
RESERVED_METHOD_NAMES = {"shards", "teacher", "teacher_cache", "report", "slurm"}


def _reserved(value: str) -> str:
    if value in RESERVED_METHOD_NAMES:
        raise ValueError(f"method name {value!r} is reserved for a stage's output folder "
                         f"({', '.join(sorted(RESERVED_METHOD_NAMES))})")
    return value


# --------------------------------------------------------------------------------------- data
class SourceConfig(Strict):
    """One input of the shard builder. `kind` is inferred from `path` when omitted."""

    path: PathStr = Field(description="hub id, local file or glob, or bundled corpus name")
    kind: Literal["auto", "hub", "json", "parquet", "text", "bundled"] = "auto"
    name: str | None = Field(default=None, description="label in the manifest; defaults to path")
    split: str = "train"
    subset: str | None = Field(default=None, description="hub dataset config name")
    revision: str | None = None
    text_field: str = "text"
    prompt_field: str | None = Field(default=None, description="instruction data: prompt column")
    response_field: str | None = Field(default=None, description="instruction data: response")
    chat_template: bool = Field(default=False, description="format prompt/response with the "
                                "tokenizer's chat template")
    weight: float = Field(default=1.0, gt=0, description="mixing weight (share of tokens)")
    max_tokens: int | None = Field(default=None, gt=0, description="quota: at most this many "
                                   "tokens from this source")

    @model_validator(mode="after")
    def _instruction_pair(self) -> SourceConfig:
        if (self.prompt_field is None) != (self.response_field is None):
            raise ValueError("prompt_field and response_field must be given together")
        return self


class DataConfig(Strict):
    sources: list[SourceConfig] = Field(default_factory=lambda: [SourceConfig(path="bundled")])
    tokenizer: PathStr = Field(default="bundled:bpe-4096",
                           description="HF tokenizer path or hub id, or bundled:bpe-<vocab>")
    seq_len: int = Field(default=256, ge=8)
    shards_dir: PathStr = Field(default="{output_dir}/shards",
                            description="where train/ and heldout/ shard sets are written")
    total_tokens: int | None = Field(default=None, gt=0,
                                     description="token budget across sources (None: all input)")
    heldout_fraction: float = Field(default=0.02, ge=0, lt=0.5)
    rows_per_part: int = Field(default=2048, gt=0)
    num_workers: int = Field(default=1, ge=1)
    seed: int = 0


# ------------------------------------------------------------------------------------- models
class LoraConfig(Strict):
    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    merge_on_save: bool = Field(default=True, description="merge into the base weights in final/; "
                                "False saves an adapter folder")


Dtype = Literal["float32", "bfloat16", "float16", "auto"]


class TeacherPretrainConfig(Strict):
    """Train a from-scratch teacher before distillation (tiny demo teachers only)."""

    max_steps: int = Field(default=200, gt=0)
    lr: float = Field(default=3e-3, gt=0)
    micro_batch_size: int = Field(default=16, gt=0)


class TeacherFinetuneConfig(Strict):
    """Adapt a pretrained teacher (teacher.model) to the experiment's training shards first
    (CE, the students' loop); later stages then use <output_dir>/teacher/final."""

    enabled: bool = True
    max_steps: int | None = Field(default=200, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)
    lr: float = Field(default=5e-5, gt=0)
    micro_batch_size: int | None = Field(default=None, gt=0,
                                         description="None: train.micro_batch_size")
    warmup_steps: int = Field(default=0, ge=0)
    lora: LoraConfig | None = Field(default=None, description="None: full fine-tuning; LoRA "
                                    "adapters are merged into final/ (merge_on_save: true)")

    @model_validator(mode="after")
    def _budget(self) -> TeacherFinetuneConfig:
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("teacher.finetune needs max_steps or max_tokens")
        if self.lora is not None and not self.lora.merge_on_save:
            raise ValueError("teacher.finetune.lora.merge_on_save must be true: the online "
                             "teacher and the teacher cache load a whole model folder")
        return self


class TeacherConfig(Strict):
    model: PathStr | None = Field(default=None, description="HF folder or hub id")
    build: dict[str, Any] | None = Field(default=None, description="HF config kwargs for a "
                                         "random-init model (needs `model_type`)")
    pretrain: TeacherPretrainConfig | None = None
    finetune: TeacherFinetuneConfig | None = Field(
        default=None, description="fine-tune the pretrained teacher on the training shards "
        "before distillation (`wattkd teacher finetune`)")
    revision: str | None = None
    dtype: Dtype = "auto"
    device_map: str | None = Field(default=None, description="e.g. 'auto' to spread a large "
                                   "teacher over the node's GPUs")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if (self.model is None) == (self.build is None):
            raise ValueError("give exactly one of teacher.model or teacher.build")
        if self.pretrain is not None and self.build is None:
            raise ValueError("teacher.pretrain applies only to a teacher built from config")
        if self.finetune is not None and self.finetune.enabled and self.model is None:
            raise ValueError("teacher.finetune adapts a pretrained teacher: it needs "
                             "teacher.model (a teacher built from config uses teacher.pretrain)")
        return self

    @property
    def finetuned(self) -> bool:
        """Whether a `teacher finetune` stage runs (its output replaces teacher.model)."""
        return self.finetune is not None and self.finetune.enabled


class StudentConfig(Strict):
    model: PathStr | None = Field(default=None, description="pretrained HF folder or hub id")
    build: dict[str, Any] | None = Field(default=None, description="HF config kwargs")
    from_teacher_layers: list[int] | None = Field(
        default=None, description="copy embeddings, these decoder layers, norm and head")
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="storage of a LoRA student's frozen decoder weights: auto "
        "= bfloat16 when training in bf16, else float32; trainable weights are fp32 masters")
    lora: LoraConfig | None = None
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> StudentConfig:
        given = [x is not None for x in (self.model, self.build, self.from_teacher_layers)]
        if sum(given) != 1:
            raise ValueError("give exactly one of student.model, student.build, "
                             "student.from_teacher_layers")
        if self.from_teacher_layers is not None and not self.from_teacher_layers:
            raise ValueError("student.from_teacher_layers must not be empty")
        if self.dtype == "bfloat16" and self.lora is None:
            raise ValueError("student.dtype: bfloat16 stores the frozen base of a LoRA student; "
                             "full fine-tuning keeps fp32 master weights (bf16 compute comes "
                             "from train.precision): remove it or add student.lora")
        if self.lora is not None and not self.lora.merge_on_save and self.model is None:
            raise ValueError("student.lora.merge_on_save: false saves only an adapter, which "
                             "needs a loadable base (student.model); merge it for students "
                             "built from config or from teacher layers")
        return self


# ------------------------------------------------------------------------------------ distill
class LossTerm(Strict):
    """One weighted loss of a method; `params` are checked against the loss registry."""

    name: str
    weight: float = Field(default=1.0, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)


class GuardConfig(Strict):
    """Stop a feature/relation-only run whose LM loss climbs instead of silently collapsing."""

    enabled: bool = True
    window: int = Field(default=20, gt=1)
    max_ratio: float = Field(default=3.0, gt=1,
                             description="stop when the window-mean LM loss exceeds its "
                                         "first-window mean by this factor")


RENAMED_METHOD_KEYS = {"mode": "method"}   # MethodConfig keys renamed (old -> new), issue 29


class MethodConfig(Strict):
    name: str
    method: str = Field(description="KD method: a name registered in wattkd/distill/methods/ "
                        "(response, feature, relation, none, ...)")
    losses: list[LossTerm]
    layer_map: list[tuple[int, int]] | None = Field(
        default=None, description="feature method: (student layer, teacher layer) pairs; hidden "
                                  "state index 0 is the embeddings")
    token_subsample: float = Field(default=1.0, gt=0, le=1)
    pooling: Literal["mean", "last"] = "mean"
    guard: GuardConfig = Field(default_factory=GuardConfig)
    params: dict[str, Any] = Field(default_factory=dict, description="the method's own "
                                   "settings, checked against its declaration")

    _name = field_validator("name")(lambda v: _reserved(_safe_name(v, "method name")))

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """A key renamed since is one error naming the new key (run folders written before
        the rename are migrated on read instead: `migrate_stored`)."""
        if isinstance(data, dict):
            for old, new in RENAMED_METHOD_KEYS.items():
                if old in data:
                    raise ValueError(f"key `{old}` was renamed to `{new}`: write "
                                     f"`{new}: {data[old]}`")
        return data

    @model_validator(mode="after")
    def _losses_needed(self) -> MethodConfig:
        if not self.losses:
            raise ValueError(f"method {self.name!r}: losses must not be empty")
        return self

    @property
    def needs_teacher(self) -> bool:
        """Whether the method reads teacher signals, as its registered declaration says."""
        from wattkd.distill.methods.registry import get_method  # lazy: see _check_methods

        return get_method(self.method).needs_teacher


def _default_methods() -> list[MethodConfig]:
    return [
        MethodConfig(name="response", method="response",
                     losses=[LossTerm(name="forward_kl", params={"temperature": 2.0}),
                             LossTerm(name="ce", weight=0.5)]),
        MethodConfig(name="baseline", method="none", losses=[LossTerm(name="ce")]),
    ]


class DistillConfig(Strict):
    methods: list[MethodConfig] = Field(default_factory=_default_methods)
    teacher_signals: Literal["online", "cache"] = "online"
    cache_dir: PathStr = "{output_dir}/teacher_cache"
    cache_top_k: int = Field(default=64, gt=0)
    cache_hidden_layers: list[int] = Field(default_factory=list)
    cache_hidden_stride: int = Field(default=1, ge=1, description="cache hidden states at "
                                     "every S-th position only (feature KD then reads those)")
    cache_pooled: bool = False
    cache_encoding: Literal["packed", "fp16", "raw"] = Field(
        default="packed", description="packed: gap-coded ids + log-probs on a 1/64-nat grid "
                                      "(~250 B/token at k=128); fp16; raw (int32 + fp32)")
    logit_chunk_tokens: int = Field(default=1024, gt=0,
                                    description="tokens per chunk of the fused logit losses")
    fused_kernel: Literal["auto", "triton", "compiled", "generic"] = Field(
        default="auto", description="fused logit loss implementation: auto (compiled on CUDA, "
                                    "eager on CPU; see distill/fused/path.py), or force one; "
                                    "triton: the Triton LM-head kernel (env "
                                    "WATTKD_FUSED_KERNEL wins)")

    @model_validator(mode="after")
    def _unique(self) -> DistillConfig:
        names = [m.name for m in self.methods]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"method names must be unique; repeated: {sorted(dup)}")
        return self


# -------------------------------------------------------------------------------------- train
class FsdpConfig(Strict):
    """FSDP2 settings, used when train.strategy is fsdp and more than one process runs."""

    reshard_after_forward: bool = Field(
        default=True, description="True: full shard (parameters freed after forward and "
        "all-gathered again for backward); False: kept from forward to backward (faster, "
        "more memory)")
    shard_teacher: bool = Field(default=True, description="shard the online teacher's decoder "
                                "layers over the ranks too (False: a full copy on every rank)")


class TrainConfig(Strict):
    seed: int = 0
    repeats: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=100, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)
    energy_budget_j: float | None = Field(default=None, gt=0,
                                          description="stop once metered energy reaches this")
    micro_batch_size: int = Field(default=8, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    lr: float = Field(default=3e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto: bf16 on CUDA with bf16 support, else fp32")
    gradient_checkpointing: bool = False
    body_kernels: Literal["none", "compile", "triton"] = Field(
        default="none", description="opt-in speed-up of the decoder blocks of the student and "
        "the online teacher: compile = torch.compile per block, triton = fused RMSNorm and "
        "GeGLU/SwiGLU kernels (CUDA); none = as the model ships (body_kernels.py)")
    checkpoint_every: int = Field(default=0, ge=0, description="steps; 0 = none (preemption "
                                  "still checkpoints; a finished run is never retrained)")
    keep_last: int = Field(default=2, ge=1)
    log_every: int = Field(default=10, gt=0)
    eval_every: int = Field(default=0, ge=0, description="in-loop held-out perplexity; 0 = off")
    eval_tokens: int = Field(default=8192, gt=0)
    tensorboard: bool = True
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp", description="several processes (torchrun / accelerate / srun): ddp "
        "replicates the student; fsdp shards its weights, gradients and optimizer state")
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig)

    @model_validator(mode="after")
    def _budget(self) -> TrainConfig:
        if self.max_steps is None and self.max_tokens is None and self.energy_budget_j is None:
            raise ValueError("give at least one of max_steps, max_tokens, energy_budget_j")
        if self.body_kernels == "compile" and self.strategy == "fsdp":
            raise ValueError("body_kernels=compile is not supported with strategy=fsdp "
                             "(compiled blocks under FSDP2's hooks are untested); use triton "
                             "or none")
        return self


# ---------------------------------------------------------------------------------- telemetry
class TelemetryConfig(Strict):
    enabled: bool = True
    interval_s: float = Field(default=0.1, gt=0, description="power sampling period")
    slow_interval_s: float = Field(default=1.0, gt=0,
                                   description="temperature, clocks, memory sampling period")
    idle_seconds: float = Field(default=5.0, ge=0, description="idle power measured before the "
                                "first phase")
    cpu_watts_per_core: float | None = Field(
        default=None, gt=0, description="enables an `estimated` CPU energy figure "
                                        "(CPU time x this) where no RAPL counter exists")
    gpu_gain_error: float = Field(default=0.05, ge=0, description="relative sensor error used "
                                  "in the uncertainty")
    min_window_s: float = Field(default=10.0, ge=0, description="shorter phases are flagged")
    progress_every_s: float = Field(default=30.0, gt=0, description="open energy windows write "
                                    "a progress record at least this often (crash recovery)")
    sources: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-source options by source label, e.g. "
        "{node-power: {file: /sys/.../energy_uj, scale_j: 1e-6}} (docs/energy-formats.md)")


# --------------------------------------------------------------------------------------- eval
class EptConfig(Strict):
    prompts: PathStr | None = Field(default=None, description="text file, one prompt a line; "
                                "None: the bundled corpus")
    num_prompts: int = Field(default=64, gt=0)
    prompt_tokens: int = Field(default=128, gt=0)
    max_new_tokens: int = Field(default=64, gt=0)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8, 32])
    warmup_batches: int = Field(default=2, ge=0)
    # Engine and steady-state measurement (wattkd.eval.engine, wattkd.eval.ept_window).
    engine: Literal["auto", "graph", "static", "dynamic"] = Field(
        default="auto", description="auto: wattkd's graph engine on CUDA (static KV cache, "
        "decode steps captured as CUDA graphs; generation/graph_engine.py), HF's dynamic cache "
        "eager elsewhere; graph / static (HF generate, static cache) / dynamic force one")
    compile: bool | None = Field(default=None, description="compile decoding; None: on CUDA "
                                 "with the graph or static engine")
    compile_mode: str = Field(default="reduce-overhead", description="torch.compile mode")
    compile_backend: str = Field(default="inductor", description="torch.compile backend")
    attn_implementation: str | None = Field(default=None, description="e.g. sdpa, eager; "
                                            "None: the model's default")
    dtype: Dtype = Field(default="auto", description="weights/compute dtype for EPT; auto: "
                         "bf16 on CUDA, fp32 on CPU")
    repeats: int = Field(default=3, gt=0, description="measured windows per batch size and "
                         "phase; their spread is reported")
    min_window_s: float | None = Field(default=None, ge=0, description="each window lasts "
                                       "at least this; None: telemetry.min_window_s with a GPU "
                                       "energy counter, one pass over the prompts without")
    target_rel_uncertainty: float | None = Field(
        default=None, gt=0, lt=1, description="instead of min_window_s: window long enough "
        "that the counter's relative uncertainty is at most this")
    measure_prefill: bool = Field(default=True, description="separate prefill windows: J per "
                                  "input token, and decode = request - prefill")
    stop_when_saturated: float | None = Field(
        default=None, gt=0, description="stop the batch sweep once output tokens/s grows by "
        "less than this fraction from the previous batch size")


class SuiteTaskConfig(Strict):
    """One task of a suite written in the YAML: exactly one of `task` or `bigbench`."""

    task: str | None = Field(default=None, description="lm-eval task or group name: wattkd's "
                             "own, from eval.include_path, or lm-eval's registry (hub data)")
    bigbench: PathStr | None = Field(default=None, description="folder with a BIG-bench task.json "
                                 "(multiple choice or generative, detected)")
    name: str | None = Field(default=None, description="result name of a bigbench task "
                             "(default: the folder's name)")
    num_fewshot: int = Field(default=0, ge=0)
    metric: str | None = Field(default=None, description="'<metric>,<filter>' key of lm-eval's "
                               "results (default: the task's first metric)")
    limit: int | None = Field(default=None, gt=0, description="examples of this task")

    @model_validator(mode="after")
    def _one_source(self) -> SuiteTaskConfig:
        if (self.task is None) == (self.bigbench is None):
            raise ValueError("a suite task sets exactly one of 'task' (an lm-eval task name) "
                             "or 'bigbench' (a folder with task.json)")
        if self.name is not None:
            if self.task is not None:
                raise ValueError("'name' is for bigbench tasks; an lm-eval task keeps its name")
            _safe_name(self.name, "task name")
        if self.metric is not None and not re.match(r"^[\w.-]+,[\w.-]+$", self.metric):
            raise ValueError(f"metric {self.metric!r} must look like '<metric>,<filter>' "
                             "(e.g. 'acc,none', 'exact_match,extract')")
        return self


class SuiteConfig(Strict):
    """A suite written in the experiment YAML (`eval.suite: {name, tasks, ...}`)."""

    name: str = Field(default="custom", description="eval/<name>.json")
    description: str = ""
    tasks: list[SuiteTaskConfig] = Field(min_length=1)
    limit: int | None = Field(default=None, gt=0, description="examples per task")
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None
    fewshot_seed: int = 1234

    _name = field_validator("name")(lambda v: _safe_name(v, "suite name"))


# A preset's name or a suite written out; the empty tag keeps error keys `eval.suite.tasks.0`.
SuiteSpec = Annotated[Annotated[str, Tag("name")] | Annotated[SuiteConfig, Tag("")],
                      Discriminator(lambda v: "name" if isinstance(v, str) else "")]


class EvalConfig(Strict):
    suite: SuiteSpec | None = Field(default="offline", description="a preset suite name or a "
                                    "suite {name, tasks, ...}; null: held-out perplexity only")
    train_suite: SuiteSpec | None = Field(
        default=None, description="suite run every train.eval_every steps beside held-out loss "
        "(keep it small: few tasks, small limit)")
    include_path: list[PathStr] = Field(default_factory=list, description="folders of lm-eval task "
                                    "YAMLs that suite tasks may name")

    @field_validator("include_path", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v
    limit: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=8, gt=0)
    mmlu_path: PathStr | None = Field(default=None, description="JSONL of {subject, question, "
                                  "choices, answer}")
    bigbench_dir: PathStr | None = Field(default=None, description="folder of <task>/task.json")
    perplexity_tokens: int = Field(default=65536, gt=0)
    ept: EptConfig = Field(default_factory=EptConfig)


# -------------------------------------------------------------------------------------- slurm
class SlurmResources(Strict):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    nodes: int | None = Field(default=None, gt=0)
    gpus_per_node: int | None = Field(default=None, ge=0)
    cpus_per_task: int | None = Field(default=None, gt=0)
    mem: str | None = Field(default=None, pattern=r"^\d+[KMGT]?$")
    time: str | None = Field(default=None, pattern=r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")

    @field_validator("partition", "account", "qos", "constraint")
    @classmethod
    def _no_shell(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[A-Za-z0-9._,&|\[\]*:-]+$", v):
            raise ValueError(f"{v!r} contains characters not allowed in a Slurm resource value")
        return v


class SlurmConfig(Strict):
    defaults: SlurmResources = Field(default_factory=lambda: SlurmResources(
        nodes=1, cpus_per_task=4, mem="16G", time="02:00:00"))
    stages: dict[str, SlurmResources] = Field(default_factory=dict,
                                              description="per-stage overrides")
    signal_seconds: int = Field(default=300, gt=0, description="USR1 this long before the limit")
    requeue: bool = True
    venv: PathStr | None = Field(default=None, description="virtualenv activated in each job")
    modules: list[str] = Field(default_factory=list, description="environment modules to load")

    @field_validator("modules")
    @classmethod
    def _module_names(cls, v: list[str]) -> list[str]:
        for m in v:
            if not re.match(r"^[A-Za-z0-9._/+-]+$", m):
                raise ValueError(f"module name {m!r} contains characters not allowed")
        return v


# --------------------------------------------------------------------------------- experiment
class ExperimentConfig(Strict):
    name: str
    output_dir: PathStr = "runs/{name}"
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig
    student: StudentConfig
    distill: DistillConfig = Field(default_factory=DistillConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    _name = field_validator("name")(lambda v: _safe_name(v, "experiment name"))

    @model_validator(mode="after")
    def _fsdp_fits(self) -> ExperimentConfig:
        if self.train.strategy != "fsdp":
            return self
        lora = self.student.lora
        if lora is not None and lora.merge_on_save:
            raise ValueError("train.strategy fsdp saves LoRA students as adapters: set "
                             "student.lora.merge_on_save: false (merge afterwards with peft's "
                             "merge_and_unload on one process)")
        if self.teacher.device_map is not None and self.distill.teacher_signals == "online":
            raise ValueError("train.strategy fsdp shards an online teacher itself "
                             "(train.fsdp.shard_teacher); remove teacher.device_map, or use "
                             "distill.teacher_signals: cache (device_map then spreads the "
                             "teacher over the GPUs for the cache build only)")
        return self

    # Resolved paths: "{name}" and "{output_dir}" placeholders are expanded once, here.
    @property
    def out(self) -> Path:
        return Path(self.output_dir.format(name=self.name))

    def path(self, template: str) -> Path:
        return Path(template.format(name=self.name, output_dir=str(self.out)))

    @property
    def shards_dir(self) -> Path:
        return self.path(self.data.shards_dir)

    @property
    def cache_dir(self) -> Path:
        return self.path(self.distill.cache_dir)

    def method(self, name: str) -> MethodConfig:
        for m in self.distill.methods:
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.distill.methods)
        raise ConfigError(f"unknown method {name!r}; this config defines: {known}")

    def run_dir(self, method: str, repeat: int = 0) -> Path:
        return self.out / method / f"rep{repeat}"


# ------------------------------------------------------------------------------------ loading
def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"] if p != "") or "<top level>"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "missing":
        return f"{key}: required key is missing"
    got = err.get("input")
    got_s = f" (got {got!r})" if not isinstance(got, dict | list) else ""
    return f"{key}: {err['msg']}{got_s}"


def _inner_types(ann: Any) -> list[Any]:
    """Types inside unions, lists and Annotated (eval.suite's tagged union among them)."""
    out: list[Any] = []
    for a in getattr(ann, "__args__", ()) or ():
        out += [a] if isinstance(a, type) else _inner_types(a)
    return out


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Keys allowed at the parent of `loc`, for "did you mean" messages."""
    cls: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or part == "":
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann] + _inner_types(ann)
        nxt = next((c for c in candidates
                    if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        cls = nxt
    return sorted(getattr(cls, "model_fields", {}))


def validate(data: dict[str, Any], source: str = "<config>") -> ExperimentConfig:
    """Validate a dict as an experiment config; errors name `source` and each key."""
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            line = _describe(err)
            if err["type"] == "extra_forbidden":
                allowed = _allowed_keys(ExperimentConfig, tuple(err["loc"]))
                if allowed:
                    line += f"; expected one of: {', '.join(allowed)}"
            lines.append("  - " + line)
        raise ConfigError(f"invalid config {source}:\n" + "\n".join(lines)) from None
    _check_methods(cfg, source)
    _check_suites(cfg, source)
    return cfg


def _check_suites(cfg: ExperimentConfig, source: str) -> None:
    """Suites are checked at load time: task names, task.json files, metrics (eval/custom.py)."""
    from wattkd.eval.custom import check_eval_config

    for folder in cfg.eval.include_path:  # lm-eval reads them; a repeated key is refused here
        for task_file in sorted(Path(folder).rglob("*.yaml")) if Path(folder).is_dir() else ():
            check_duplicate_keys(task_file.read_text(), f"eval.include_path: {task_file}")
    problems = check_eval_config(cfg.eval)
    if problems:
        raise ConfigError(f"invalid config {source}:\n" + "\n".join(f"  - {p}" for p in problems))


def _check_methods(cfg: ExperimentConfig, source: str) -> None:
    """Methods, their params and checks, loss names and params are checked against the method
    and loss registries at load time."""
    # lazy: the registries load the methods and losses (torch); a config read for `--help`,
    # `config show` or Slurm status stays light
    from wattkd.distill.methods.registry import check_loss_term, check_method

    problems = []
    for i, method in enumerate(cfg.distill.methods):
        found = check_method(method, cfg)
        problems += [f"  - distill.methods.{i} ({method.name}): {p}" for p in found]
        if found:
            continue
        for j, term in enumerate(method.losses):
            msg = check_loss_term(term.name, term.params, method.method)
            if msg:
                problems.append(f"  - distill.methods.{i}.losses.{j} ({method.name}): {msg}")
    if problems:
        raise ConfigError(f"invalid config {source}:\n" + "\n".join(problems))


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate an experiment YAML. `overrides` maps dotted keys to values."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    data = load_yaml(p.read_text(), f"config {p}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {p}: top level must be a mapping, got {type(data).__name__}")
    if stored_by_wattkd(p):   # e.g. a Slurm pipeline frozen before a key was renamed
        data = migrate_stored(data)
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    return validate(data, str(p))


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a mapping")
    node[parts[-1]] = value


STORED_BESIDE = ("jobs.json", "run.json")   # `wattkd slurm submit`'s frozen config; a run's own


def stored_by_wattkd(path: Path) -> bool:
    """A config.yaml that wattkd wrote itself (beside a pipeline's jobs.json or a run's
    run.json): read with `migrate_stored`, so queued jobs and old runs outlive a key rename."""
    return path.name == "config.yaml" and any((path.parent / f).is_file() for f in STORED_BESIDE)


def migrate_stored(data: Any) -> Any:
    """A config a run folder stored (config.yaml) as today's keys: entries of
    distill.methods written before a key was renamed get the new name. The one place an old
    record is migrated; a user's config with an old key is refused instead (MethodConfig)."""
    methods = ((data.get("distill") or {}).get("methods") if isinstance(data, dict) else None)
    for entry in methods if isinstance(methods, list) else ():
        for old, new in RENAMED_METHOD_KEYS.items():
            if isinstance(entry, dict) and old in entry and new not in entry:
                entry[new] = entry.pop(old)
    return data


def dump(cfg: ExperimentConfig) -> str:
    """The resolved config (every default filled in) as YAML."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
