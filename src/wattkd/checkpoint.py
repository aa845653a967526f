"""Checkpoints for exact resume, and the preemption signals that trigger them.

A checkpoint is a directory written under a temporary name and renamed, so a killed run never
leaves a half-written one that `latest()` would pick. It holds everything the next step depends
on: trainable weights (student + projector), optimizer, scheduler, every RNG, and the data
position, so a resumed run reproduces the uninterrupted one step for step.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wattkd.atomic import atomic_dir
from wattkd.errors import CheckpointFault
from wattkd.hashing import file_sha256
from wattkd.sealed import SealError, check_seal, seal
from wattkd.sharding import load_full_states

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step_(\d{7})$")
# Exit status of a run that saved a checkpoint on a preemption signal (sysexits EX_TEMPFAIL):
# "try again" — the Slurm wrapper requeues on it.
PREEMPTED_EXIT_CODE = 75
CHECKPOINT_FILES = ("model.pt", "optimizer.pt", "scheduler.pt", "rng.pt")
LOW_SPACE = 16 << 20  # bytes free under which a failed write is read as a full disk


class CheckpointError(CheckpointFault, RuntimeError):
    pass


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def trainable_state(module: nn.Module, full: bool,
                    state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Full state, or only trainable tensors (LoRA: the frozen base is rebuilt from its source).
    `state`: the module's state dict when already gathered (FSDP)."""
    state = module.state_dict() if state is None else state
    if full:
        return {k: v.detach().cpu().clone() for k, v in state.items()}
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in state.items() if k in names}


def rng_state() -> dict[str, Any]:
    # Plain lists/ints/tensors only, so checkpoints load with torch.load(weights_only=True):
    # resuming from a checkpoint folder never unpickles arbitrary objects.
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, step: int, *, module: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: Any, progress: dict[str, Any], full_weights: bool, keep_last: int,
         rank: int = 0, rng_by_rank: list[dict[str, Any]] | None = None,
         states: tuple[dict[str, Any], dict[str, Any]] | None = None) -> Path:
    """Write checkpoint `step` atomically (rank 0), then prune to the newest `keep_last`.
    `states`: (model, optimizer) state dicts gathered beforehand on every rank (FSDP)."""
    final = checkpoint_root(run_dir) / f"step_{step:07d}"
    if rank != 0:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final)
    try:
        with atomic_dir(final) as tmp:
            model_state, optim_state = states if states is not None else (
                None, optimizer.state_dict())
            torch.save(trainable_state(module, full_weights, model_state), tmp / "model.pt")
            torch.save(optim_state, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng_by_rank or [rng_state()], tmp / "rng.pt")
            # state.json is written last and lists every file's size and sha256, and is sealed
            # with the sha256 of its own content: a resume verifies all of it and skips a
            # checkpoint whose bytes changed (a flipped "step" included).
            files = {name: {"bytes": (tmp / name).stat().st_size,
                            "sha256": file_sha256(tmp / name)} for name in CHECKPOINT_FILES}
            meta = {"format": "wattkd-checkpoint", "version": FORMAT_VERSION, "step": step,
                    "full_weights": full_weights, **progress, "files": files}
            (tmp / "state.json").write_text(json.dumps(seal(meta), indent=2))
    except (OSError, RuntimeError) as exc:
        raise _write_error(exc, final) from exc
    prune(run_dir, keep_last)
    log.info("checkpoint saved: %s", final)
    return final


def _write_error(exc: BaseException, final: Path) -> OSError:
    """A failed checkpoint write as the OS error it is. torch's zip writer reports a full disk
    as `RuntimeError: [enforce fail at inline_container.cc] . unexpected pos ...`; a file write
    that fails with no space left is told as such, with the checkpoint's path."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return OSError(exc.errno, f"cannot write checkpoint {final.name} ({exc.strerror})",
                       str(exc.filename or final))
    try:
        free = shutil.disk_usage(final.parent).free
    except OSError:
        free = None
    text = str(exc)
    if free is not None and free < LOW_SPACE or "No space left" in text:
        return OSError(errno.ENOSPC, f"cannot write checkpoint {final.name}", str(final))
    if "unexpected pos" in text or "file write failed" in text or "PytorchStreamWriter" in text:
        return OSError(errno.EIO, f"cannot write checkpoint {final.name}: the file write "
                       f"failed ({text.splitlines()[0][:200]})", str(final))
    return exc if isinstance(exc, OSError) else OSError(errno.EIO, text, str(final))


def verify(path: Path) -> dict[str, Any]:
    """The checkpoint's state.json, after checking its files against the sizes and sha256s it
    lists; CheckpointError naming the file and what to do otherwise."""
    state_file = path / "state.json"
    hint = f"delete {path} to resume from the checkpoint before it"
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no state.json); {hint}")
    try:
        meta = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{state_file}: not valid JSON ({exc}; truncated or corrupt); "
                              f"{hint}") from None
    if not isinstance(meta, dict) or meta.get("format") != "wattkd-checkpoint" or \
            meta.get("version") != FORMAT_VERSION:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: checkpoint format {got} is not wattkd-checkpoint v"
                              f"{FORMAT_VERSION}; {hint}")
    try:  # unsealed: written before seals existed, trusted as before (its files still checked)
        check_seal(meta)
    except SealError as exc:
        raise CheckpointError(f"{state_file}: {exc}; {hint}") from None
    if not isinstance(meta.get("step"), int) or STEP_DIR.match(path.name) and \
            int(STEP_DIR.match(path.name).group(1)) != meta["step"]:
        raise CheckpointError(f"{state_file}: step {meta.get('step')!r} does not match the "
                              f"folder name {path.name}; {hint}")
    listed = meta.get("files")
    for name in CHECKPOINT_FILES:
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint; {hint}")
        if not isinstance(listed, dict):
            continue  # written before checksums were recorded: checked when loaded
        want = listed.get(name) or {}
        size = f.stat().st_size
        if size != want.get("bytes"):
            raise CheckpointError(f"{f}: {size} bytes, the checkpoint's state.json says "
                                  f"{want.get('bytes')} (truncated or replaced); {hint}")
        if file_sha256(f) != want.get("sha256"):
            raise CheckpointError(f"{f}: sha256 differs from the checkpoint's state.json "
                                  f"(corrupt); {hint}")
    return meta


def _torch_load(path: Path, name: str) -> Any:
    """torch.load with a CheckpointError that names the file (torch reports an empty file as
    EOFError, a truncated one as OSError 22 or a zip error, without the path)."""
    try:
        return torch.load(path / name, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a bad file
        raise CheckpointError(f"{path / name}: cannot be read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else 'empty'}); "
                              f"the checkpoint is corrupt: delete {path} to resume from the "
                              "one before it") from None


def _fit(path: Path, load_into: Any) -> Any:
    """Load a checkpoint's state into this run's model or optimizer; a state of another shape
    (torch: `RuntimeError: size mismatch`, the optimizer's `ValueError` about parameter groups)
    is a CheckpointError saying the checkpoint belongs to another setup."""
    try:
        return load_into()
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:300]
        raise CheckpointError(f"{path} does not fit this run's model or optimizer ({detail}): "
                              "it was written by another method, architecture or set of "
                              "trainable parameters; resume it with the config that wrote it, "
                              "or start over with --resume never") from None


def prune(run_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: p.name)


def latest(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies (`verify`); each newer one that does not is named
    in a warning with the reason. Refuses (CheckpointError) when checkpoints exist but none
    verifies: starting over silently would throw their steps away."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    found = sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)),
                   key=lambda p: p.name, reverse=True)
    skipped = []
    for path in found:
        try:
            verify(path)
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s", path.name, exc)
            skipped.append(f"{path.name}: {exc}")
            continue
        if skipped:
            log.warning("resuming from %s, the newest valid checkpoint (skipped %d newer)",
                        path, len(skipped))
        return path
    if skipped:
        raise CheckpointError(f"no valid checkpoint in {root}: {'; '.join(skipped)}. Delete "
                              f"{root} to train from step 0, or rerun with --resume never")
    return None


def load(path: Path, *, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
         rank: int = 0, sharded: bool = False) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG; return the progress record.
    `sharded`: `module` is FSDP-sharded; the full states are loaded into its shards."""
    meta = verify(path)
    written, running = meta.get("strategy", "ddp"), "fsdp" if sharded else "ddp"
    if written != running:  # the optimizer state formats differ (ids vs parameter names)
        raise CheckpointError(f"{path} was written under train.strategy {written}, this run "
                              f"uses {running}: resume with the strategy that wrote it")
    read = rank == 0 or not sharded   # FSDP: rank 0 reads and broadcasts
    weights = _torch_load(path, "model.pt") if read else {}
    optim = _torch_load(path, "optimizer.pt") if read else {}
    if sharded:
        missing, unexpected = _fit(path, lambda: load_full_states(
            module, optimizer, weights, optim, full=bool(meta.get("full_weights"))))
    else:
        missing, unexpected = _fit(path, lambda: module.load_state_dict(weights, strict=False))
        _fit(path, lambda: optimizer.load_state_dict(optim))
    if unexpected or (meta.get("full_weights") and missing):
        raise CheckpointError(f"{path}: checkpoint does not fit this model (missing "
                              f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}); was the "
                              "config changed since it was written?")
    scheduler.load_state_dict(_torch_load(path, "scheduler.pt"))
    rngs = _torch_load(path, "rng.pt")
    if rank >= len(rngs):
        raise CheckpointError(f"{path} holds RNG states of {len(rngs)} ranks; this is rank {rank}")
    set_rng_state(rngs[rank])
    log.info("resumed from %s (step %d)", path, meta["step"])
    return meta


class PreemptionSignal:
    """SIGUSR1/SIGTERM set a flag; the loop checkpoints at the next step boundary and exits."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signal.Signals(signum).name
        log.warning("received %s: will checkpoint and exit after this step", self.received)

    def __enter__(self) -> PreemptionSignal:  # noqa: PYI034
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a test runner thread)
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
