"""Checks before expensive work: everything knowable from config.json files, weight-file headers
and manifests, checked before any model is loaded and before anything is written.

`check_stage_inputs(cfg, teacher_path, uses_teacher)` is the first check of every stage that
reads the training shards (training, the teacher cache): shards present, built with
data.tokenizer, a teacher trained here present, and the teacher agrees with the shards (its
folder's tokenizer maps the same ids, its positions cover seq_len).

`check_training(job, shards, resume)` is called once by `train()`: a mistake found here costs
seconds and leaves no folder behind (no `rep0/config.yaml`, no `rep-1/`), where the same
mistake found after loading a 70B teacher costs minutes and a half-made run directory.

What it checks:
  * the repeat index (>= 0) and the method's micro-batch (relation losses need >= 2 / 3);
  * teacher and student sources: a local path that does not exist is named as such (not as a
    malformed hub id); a folder's config.json is readable and agrees with its weights
    (vocab_size against the embedding rows in the safetensors header); no weight file is cut
    short; a folder's own tokenizer maps tokens to the shards' ids;
  * lengths: seq_len within both models' max_position_embeddings; train.max_tokens at least
    one optimizer step;
  * layer counts: layer_map and from_teacher_layers against num_hidden_layers;
  * vocabularies: heads smaller than the tokenizer are refused; a teacher head larger than the
    tokenizer only when the extra rows are provably padding (`padding_evidence`);
  * output folders: the run folder and checkpoints/ writable, with room for one checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import logging
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from wattkd.config import ConfigError, ExperimentConfig
from wattkd.data.manifest import ManifestError, read_manifest, verify_parts
from wattkd.data.tokenizer import load_tokenizer, tokenizer_sha256
from wattkd.distill.methods import get_method
from wattkd.models import ModelError, check_tokenizer_match, check_weight_files

log = logging.getLogger(__name__)

__all__ = [
    "ShardInputs",
    "check_stage_inputs",
    "check_training",
    "check_writable",
    "checkpoint_bytes",
    "model_config",
    "padding_evidence",
]

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
HEADROOM = 1.1  # a checkpoint is written next to the one it replaces; margin for metadata


# -------------------------------------------------------------------------- stage inputs
@dataclass(frozen=True)
class ShardInputs:
    """The training shards and the tokenizer they were checked against."""

    path: Path
    manifest: dict[str, Any]
    tokenizer: Any
    tokenizer_sha256: str

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])


def check_stage_inputs(cfg: ExperimentConfig, teacher_path: str | None,
                       uses_teacher: bool) -> ShardInputs:
    """Shards present (part sizes as in the manifest), built with data.tokenizer, and a teacher
    pretrained or fine-tuned here already there: the one check training and the teacher cache
    share, before any model is loaded."""
    shards = cfg.shards_dir / "train"
    if not (shards / "manifest.json").is_file():
        raise FileNotFoundError(f"no shards at {shards}: run `wattkd data build` first")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    manifest = read_manifest(shards)
    verify_parts(shards, manifest, "size")
    tok_sha = tokenizer_sha256(tokenizer)
    if manifest["tokenizer"]["sha256"] != tok_sha:
        raise ManifestError(f"stale shards: {shards} were built with a different tokenizer than "
                            f"data.tokenizer={cfg.data.tokenizer!r}; rebuild them "
                            "(`wattkd data build --overwrite`)")
    if uses_teacher and teacher_path and not Path(teacher_path).exists() \
            and (cfg.teacher.pretrain is not None or cfg.teacher.finetuned):
        stage = "finetune" if cfg.teacher.finetuned else "pretrain"
        raise FileNotFoundError(f"teacher {teacher_path} not found: run `wattkd teacher "
                                f"{stage}` first")
    inputs = ShardInputs(shards, manifest, tokenizer, tok_sha)
    if uses_teacher:
        _check_teacher_fits_shards(cfg, teacher_path, inputs)
    return inputs


def _check_teacher_fits_shards(cfg: ExperimentConfig, teacher_path: str | None,
                               shards: ShardInputs) -> None:
    """The teacher reads the shards' ids as its own tokens, over seq_len positions."""
    if teacher_path is not None:
        key = "teacher.model" if cfg.teacher.model else "teacher (pretrained here)"
        conf = model_config(teacher_path, key, cfg.teacher.revision,
                            cfg.teacher.trust_remote_code)
        check_tokenizer_match(teacher_path, shards.tokenizer, "teacher")
    else:
        key = "teacher.build"
        conf = _build_config(cfg.teacher.build or {}, len(shards.tokenizer), key)
    check_positions(conf, shards.seq_len, key)


def check_positions(conf: Any | None, seq_len: int, key: str) -> None:
    """A model whose position table is shorter than the shards' rows cannot read them (or, with
    RoPE, reads positions it was never trained on)."""
    limit = getattr(conf, "max_position_embeddings", None) if conf is not None else None
    if limit is not None and seq_len > int(limit):
        raise ModelError(f"{key}: the shards' rows are {seq_len} tokens (data.seq_len) but the "
                         f"model takes at most {int(limit)} positions (max_position_embeddings "
                         f"in its config); rebuild the shards with data.seq_len <= {int(limit)} "
                         "(`wattkd data build --overwrite`) or use a model with longer context")


def check_token_budget(job: Any, seq_len: int) -> None:
    """train.max_tokens counts whole optimizer steps: a budget below one step is refused (it
    would train a full step anyway), and the tokens a budget really trains are logged."""
    tc = job.train
    if tc.max_tokens is None:
        return
    world = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    step = tc.micro_batch_size * tc.grad_accum * seq_len * world
    key = "teacher.finetune.max_tokens" if job.role == "teacher_finetune" else "train.max_tokens"
    parts = (f"micro_batch_size {tc.micro_batch_size} x grad_accum {tc.grad_accum} x seq_len "
             f"{seq_len}" + (f" x {world} processes" if world > 1 else ""))
    if tc.max_tokens < step:
        raise ConfigError(f"{key} {tc.max_tokens:,} is less than one optimizer step, which "
                          f"trains {step:,} tokens ({parts}); set {key} >= {step:,}, or make "
                          "the step smaller")
    steps = math.ceil(tc.max_tokens / step)
    if steps * step != tc.max_tokens:
        log.info("%s %s: training stops after whole steps, %d steps = %s tokens (%s per "
                 "step)", key, f"{tc.max_tokens:,}", steps, f"{steps * step:,}", f"{step:,}")


# ------------------------------------------------------------------------------- sources
def looks_local(source: str) -> bool:
    """A path the user means as a folder: absolute, relative with ./ ../ ~, or more than one
    slash (a hub id is `name` or `org/name`)."""
    return (source.startswith(("/", "./", "../", "~")) or source.count("/") > 1
            or not HUB_ID.match(source))


def check_source(source: str, key: str) -> Path | None:
    """The local folder behind `source` (None: a hub id); refuses a missing local path."""
    p = Path(source).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"{key}: {p} is a file; expected a Hugging Face model folder "
                             "(config.json + weights) or a hub id")
        if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
            raise ModelError(f"{key}: {p} is not a Hugging Face model folder (no config.json)")
        return p
    if looks_local(source):
        raise ModelError(f"{key}: no such folder {p} (fix the path, or give a hub id as "
                         "org/name)")
    return None


def model_config(source: str, key: str, revision: str | None = None,
                 trust_remote_code: bool = False) -> Any | None:
    """The HF config of a folder or hub id (text config of multimodal ones); None when a hub
    id cannot be resolved here (offline): the load will report it."""
    folder = check_source(source, key)
    if folder is not None and not (folder / "config.json").is_file():
        return None  # an adapter folder: its base is checked when it is loaded
    try:
        conf = AutoConfig.from_pretrained(str(folder or source), revision=revision,
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if folder is not None:
            raise ModelError(f"{key}: cannot read {folder / 'config.json'} "
                             f"({type(exc).__name__}: {exc}); restore the file or point "
                             f"{key} at a complete model folder") from None
        log.debug("%s: config of %s not resolvable here (%s)", key, source, exc)
        return None
    if folder is not None:
        check_weight_files(folder, key)
        _check_weights_match(folder, conf, key)
    return conf.get_text_config() if hasattr(conf, "get_text_config") else conf


def _embedding_rows(folder: Path) -> tuple[str, str, int] | None:
    """(file, tensor, rows) of the input embedding in a folder's safetensors headers."""
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if not 0 < n < 1 << 28:
                    continue
                header = json.loads(fh.read(n))
        except (OSError, ValueError):
            continue
        for name, info in header.items():
            if name.endswith(("embed_tokens.weight", "wte.weight")):
                return f.name, name, int(info["shape"][0])
    return None


def _check_weights_match(folder: Path, conf: Any, key: str) -> None:
    text = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
    vocab = getattr(text, "vocab_size", None)
    found = _embedding_rows(folder)
    if vocab is None or found is None:
        return
    file, tensor, rows = found
    if rows != int(vocab):
        raise ModelError(f"{key}: {folder / 'config.json'} says vocab_size {vocab} but the "
                         f"weights ({file}: {tensor}) have {rows} rows; config.json was edited "
                         "or belongs to other weights: restore the folder's own config.json")


# ------------------------------------------------------------------------------ vocabulary
def padding_evidence(cfg: Any, teacher_source: str | None, tokenizer_size: int) -> str | None:
    """Why rows past the tokenizer in a teacher head are padding, or None if nothing shows it.

    Evidence: the teacher folder carries a tokenizer of exactly the data tokenizer's size (the
    folder's tokenizer is compared token by token with the data one before training:
    `check_tokenizer_match`), or the data tokenizer is the teacher's own hub repository."""
    if teacher_source is None:
        return "teacher built from config with the tokenizer's size"
    folder = Path(teacher_source).expanduser()
    if folder.is_dir():
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file():
            try:
                theirs = AutoTokenizer.from_pretrained(str(folder))
            except (OSError, ValueError):
                return None
            if len(theirs) == tokenizer_size:
                return f"the teacher folder's own tokenizer has {tokenizer_size} tokens"
        return None
    if str(cfg.data.tokenizer) == str(teacher_source):
        return f"data.tokenizer is the teacher's repository {teacher_source}"

    try:  # the hub repository's own tokenizer (from the local HF cache when offline)
        theirs = AutoTokenizer.from_pretrained(str(teacher_source), revision=cfg.teacher.revision)
    except (OSError, ValueError):
        return None
    if len(theirs) == tokenizer_size:
        return f"the teacher repository's own tokenizer has {tokenizer_size} tokens"
    return None


def check_vocab_sizes(cfg: Any, teacher_conf: Any, teacher_source: str | None,
                      tokenizer_size: int) -> None:
    t_vocab = getattr(teacher_conf, "vocab_size", None)
    if t_vocab is None:
        return
    t_vocab = int(t_vocab)
    where = teacher_source or "teacher.build"
    if t_vocab < tokenizer_size:
        raise ModelError(f"teacher {where} has vocab_size {t_vocab} but the shards' tokenizer "
                         f"({cfg.data.tokenizer}) has {tokenizer_size} tokens: build the shards "
                         "with the teacher's tokenizer (data.tokenizer)")
    if t_vocab > tokenizer_size:
        why = padding_evidence(cfg, teacher_source, tokenizer_size)
        if why is None:
            raise ModelError(
                f"teacher {where} has vocab_size {t_vocab}, the shards' tokenizer "
                f"({cfg.data.tokenizer}) {tokenizer_size} tokens, and nothing shows the "
                f"{t_vocab - tokenizer_size} extra rows are padding (no tokenizer of "
                f"{tokenizer_size} tokens beside the teacher): it may be a different "
                "vocabulary. Build the shards with the teacher's tokenizer (data.tokenizer: "
                f"{where}), or put the tokenizer files it was trained with into its folder")
        log.info("teacher vocab %d is the tokenizer's %d plus padding (%s): logits compared "
                 "over %d", t_vocab, tokenizer_size, why, tokenizer_size)


# ----------------------------------------------------------------------------------- layers
def check_layers(job: Any, teacher_conf: Any | None, student_conf: Any | None) -> None:
    t_layers = None if teacher_conf is None else int(teacher_conf.num_hidden_layers)
    layers = job.student.from_teacher_layers
    if layers is not None and t_layers is not None:
        bad = [i for i in layers if not 0 <= i < t_layers]
        if bad:
            raise ModelError(f"student.from_teacher_layers {bad} out of range: the teacher has "
                             f"{t_layers} layers (0..{t_layers - 1})")
    s_layers = None
    if layers is not None:
        s_layers = len(layers)
    elif student_conf is not None:
        s_layers = int(student_conf.num_hidden_layers)
    if s_layers is not None and t_layers is not None:
        student = student_conf
        if layers is not None:  # teacher layers copied: the teacher's widths, fewer layers
            student = copy.copy(teacher_conf)
            student.num_hidden_layers = s_layers
        try:  # the method's own model checks (distill/methods/<name>.py)
            get_method(job.method.method).check_models(job.method, student, teacher_conf)
        except ModelError as exc:
            raise ModelError(f"method {job.method.name!r}: {exc}") from None


def check_batch(job: Any) -> None:
    method = job.method
    need = get_method(method.method).min_batch(method)
    if job.train.micro_batch_size < need:
        raise ConfigError(f"train.micro_batch_size: method {method.name!r} compares sequences "
                          f"within a micro-batch ({', '.join(t.name for t in method.losses)}) "
                          f"and needs at least {need}, got {job.train.micro_batch_size}")


# ------------------------------------------------------------------------------ disk space
def checkpoint_bytes(student_conf: Any, lora: Any, full_weights: bool) -> int | None:
    """Estimated bytes of one checkpoint: trainable weights + two AdamW moments (fp32), from
    the student's config alone (parameters counted on the meta device)."""
    if student_conf is None:
        return None

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(student_conf)
    except Exception:  # noqa: BLE001 - an estimate only; the real build reports real errors
        return None
    if full_weights:
        params = sum(p.numel() for p in model.parameters())
        return params * 4 * 3
    targets = set(lora.target_modules or [])
    r = int(lora.r)
    params = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            params += r * (module.in_features + module.out_features)
    return params * 4 * 3


def _existing_parent(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(folder: Path, what: str) -> None:
    """Create and delete a file in `folder` (or its nearest existing parent): catches
    permissions, read-only mounts and full quotas before any step is spent."""
    target = folder if folder.is_dir() else _existing_parent(folder)
    probe = target / f".wattkd-write-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"x")
    except OSError as exc:
        exc.filename = exc.filename or str(target)
        raise OSError(exc.errno, f"{what} is not writable", str(target)) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def check_room(folder: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(_existing_parent(folder)).free
    if free < need * HEADROOM:
        raise OSError(errno.ENOSPC, f"{what}: needs about {_human(need)}, "
                      f"{_human(free)} free", str(_existing_parent(folder)))


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


human_bytes = _human


# ------------------------------------------------------------------------------------ entry
def check_training(job: Any, shards: ShardInputs, resume: str = "auto") -> None:
    """All pre-flight checks of one training run (see the module docstring); the teacher's
    agreement with the shards was checked by `check_stage_inputs`."""
    cfg = job.cfg
    tokenizer_size = len(shards.tokenizer)
    if job.repeat < 0:
        raise ConfigError(f"--repeat {job.repeat}: the repeat index must be >= 0 (seed = "
                          "train.seed + repeat; train.repeats says how many a study runs)")
    check_batch(job)
    check_token_budget(job, shards.seq_len)
    needs_teacher = job.method.needs_teacher
    uses_teacher = needs_teacher or job.student.from_teacher_layers is not None
    t_source = job.teacher_path or cfg.teacher.model
    teacher_conf = None
    if uses_teacher:
        if t_source is not None:
            teacher_conf = model_config(t_source, "teacher.model" if cfg.teacher.model
                                        else "teacher (pretrained here)",
                                        cfg.teacher.revision, cfg.teacher.trust_remote_code)
        elif cfg.teacher.build:
            teacher_conf = _build_config(cfg.teacher.build, tokenizer_size, "teacher.build")
        if teacher_conf is not None:
            check_vocab_sizes(cfg, teacher_conf, t_source, tokenizer_size)
    student_conf = _student_config(job, teacher_conf, tokenizer_size)
    if student_conf is not None and getattr(student_conf, "vocab_size", None) is not None \
            and int(student_conf.vocab_size) < tokenizer_size:
        raise ModelError(f"student has vocab_size {student_conf.vocab_size} but the shards' "
                         f"tokenizer has {tokenizer_size} tokens")
    student_key = "teacher.model" if job.role == "teacher_finetune" else "student.model"
    check_positions(student_conf, shards.seq_len, student_key if job.student.model
                    else "student.build" if job.student.build else "student")
    if job.student.model is not None and check_source(job.student.model, student_key):
        check_tokenizer_match(job.student.model, shards.tokenizer, student_key.split(".")[0])
    check_layers(job, teacher_conf, student_conf)
    run_dir = Path(job.run_dir)
    check_writable(run_dir, f"run folder {run_dir}")
    ckpts = run_dir / "checkpoints"
    if ckpts.exists():
        check_writable(ckpts, f"checkpoint folder {ckpts}")
    if job.train.checkpoint_every:
        need = checkpoint_bytes(student_conf, job.student.lora, job.student.lora is None)
        if need:
            check_room(ckpts, need, f"a checkpoint in {ckpts}")


def _build_config(kwargs: dict[str, Any], vocab: int, key: str) -> Any:
    kw = dict(kwargs)
    model_type = kw.pop("model_type", None)
    if model_type is None:
        raise ModelError(f"{key} needs `model_type` (e.g. llama, gemma3_text)")
    kw.setdefault("vocab_size", vocab)
    try:
        return AutoConfig.for_model(model_type, **kw)
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelError(f"cannot build a {model_type!r} config from {key}: {exc}") from None


def _student_config(job: Any, teacher_conf: Any | None, vocab: int) -> Any | None:
    s = job.student
    if s.model is not None:
        return model_config(s.model, "student.model", s.revision, s.trust_remote_code)
    if s.build is not None:
        return _build_config(s.build, vocab, "student.build")
    if teacher_conf is None:
        return None
    conf = copy.deepcopy(teacher_conf)
    conf.num_hidden_layers = len(s.from_teacher_layers or [])
    for key in ("layer_types",):
        value = getattr(conf, key, None)
        if isinstance(value, list):
            setattr(conf, key, [value[i] for i in s.from_teacher_layers or []
                                if i < len(value)])
    return conf

