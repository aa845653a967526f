"""final/: the trained student as an HF folder `from_pretrained` loads, plus what made it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from wattkd.atomic import atomic_dir
from wattkd.jobs import TrainJob
from wattkd.models import store_frozen_linears
from wattkd.sharding import drop_tied_duplicates


def save_final(run_dir: Path, objective: Any, tokenizer: Any, job: TrainJob, *, step: int,
               tokens: int, state: dict[str, torch.Tensor] | None = None) -> Path:
    """final/: an HF folder `from_pretrained` loads, plus projector.pt and wattkd.json.
    `state`: the objective's full state dict gathered from FSDP shards (else read here)."""
    final = run_dir / "final"
    student = objective.student
    lora = job.student.lora
    with atomic_dir(final) as tmp:  # replaces an older final/ only once the new one is whole
        if state is not None:
            own = {k.removeprefix("student."): v for k, v in state.items()
                   if k.startswith("student.")}
            # PeftModel.save_pretrained keeps the adapter's entries of a full state dict.
            student.save_pretrained(tmp, state_dict=drop_tied_duplicates(student, own))
        elif isinstance(student, PeftModel):
            if lora is not None and lora.merge_on_save:
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
            "method": job.method.name, "mode": job.method.method, "repeat": job.repeat,
            "teacher": job.teacher_path or job.cfg.teacher.model, "steps": step,
            "tokens": tokens, "layer_map": job.method.layer_map}, indent=2))
    return final
