"""Checks across the imported runs, as wattkd checks its own: each finding is a flag (name +
one sentence) on the runs it concerns, shown by the report ("Read first") and printed by the
import. Pure functions on the already converted documents.
"""

from __future__ import annotations

import statistics
from typing import Any

from wattkd.eval.protocol import diff_protocols

__all__ = ["CHANCE", "Flag", "check_runs"]

Flag = tuple[str, str]                 # (flag name, sentence)
# chance level of the multiple-choice tasks (4 options); a generative task's chance is 0
CHANCE = {"arc_challenge": 0.25, "hellaswag": 0.25, "mmlu": 0.25, "bbh": 0.0}
DURATION_SPREAD = 0.10                 # (max - min) / median of a method's repeat durations
BF16_BYTES = 2


def _scores(ev: dict[str, Any]) -> dict[str, float]:
    return {t: s["value"] for t, s in (ev.get("scores") or {}).items()
            if isinstance(s.get("value"), int | float)}


def collapsed(ev: dict[str, Any]) -> str | None:
    """A sentence when every known task scores at chance (within 3 stderr or 0.02)."""
    hits = []
    for t, s in (ev.get("scores") or {}).items():
        if t not in CHANCE or not isinstance(s.get("value"), int | float):
            continue
        tol = max(3 * (s.get("stderr") or 0.0), 0.02)
        if abs(s["value"] - CHANCE[t]) > tol:
            return None
        hits.append(f"{t} {s['value']:.3f} (chance {CHANCE[t]:g})")
    return ("every task at chance: " + ", ".join(hits) +
            "; the student collapsed (its scores carry no information)") if hits else None


def teacher_below(teacher: dict[str, Any], students: list[dict[str, Any]]) -> list[str]:
    """Tasks where the teacher scores below the median of its students, with the protocol
    differences that may explain it."""
    t = _scores(teacher)
    out = []
    for task, tv in t.items():
        vals = [_scores(s)[task] for s in students if task in _scores(s)]
        if vals and tv < statistics.median(vals):
            diffs = {f"{k}: {a!r} (teacher) vs {b!r}" for s in students
                     for k, a, b in diff_protocols(teacher["protocol"], s["protocol"])
                     if not k.startswith("tasks.") or k.startswith(f"tasks.{task}.")}
            out.append(f"teacher scores {tv:.3f} on {task}, below its students' median "
                       f"{statistics.median(vals):.3f}: protocol suspicion"
                       + (f" (protocol differs: {'; '.join(sorted(diffs))})" if diffs else ""))
    return out


def unequal_durations(durations: dict[str, float]) -> str | None:
    """A sentence when a method's repeats ran for clearly different times."""
    if len(durations) < 2:
        return None
    vals = list(durations.values())
    spread = (max(vals) - min(vals)) / statistics.median(vals)
    if spread <= DURATION_SPREAD:
        return None
    listed = ", ".join(f"{k} {v:.0f} s" for k, v in durations.items())
    return (f"repeats of unequal duration ({listed}; spread {100 * spread:.0f}% of the "
            "median): same configuration, different work or throughput, so E_run varies")


def check_runs(runs: list[Any], evals: dict[str, dict[str, Any]],
               durations: dict[str, float], gpu_mem_b: float | None) -> dict[str, list[Flag]]:
    """rel -> flags. `runs`: SeedRun list; `evals`: rel -> wattkd eval doc; `durations`:
    rel -> monitored seconds (trained runs); `gpu_mem_b`: largest GPU memory seen."""
    flags: dict[str, list[Flag]] = {r.rel: [] for r in runs}
    teacher = next(r for r in runs if r.is_teacher)
    students = [r for r in runs if not r.is_teacher]
    for r in students:
        why = collapsed(evals[r.rel])
        if why:
            flags[r.rel].append(("collapsed-at-chance", why))
    for sentence in teacher_below(evals[teacher.rel], [evals[r.rel] for r in students]):
        flags[teacher.rel].append(("teacher-below-students", sentence))
    for method in dict.fromkeys(r.method for r in runs):
        mine = {r.rel: durations[r.rel] for r in runs if r.method == method and r.rel in durations}
        why = unequal_durations(mine)
        for rel in mine if why else []:
            flags[rel].append(("unequal-repeat-duration", why))
    params = (evals[teacher.rel].get("model") or {}).get("parameters")
    if isinstance(params, int) and gpu_mem_b and params * BF16_BYTES > gpu_mem_b:
        flags[teacher.rel].append((
            "teacher-exceeds-metered-gpu",
            (f"the teacher's weights ({params / 1e9:.1f} B parameters, "
             f"{params * BF16_BYTES / 2**30:.0f} GiB in bf16) exceed one GPU "
             f"({gpu_mem_b / 2**30:.0f} GiB); the original EPT script asks for 1 GPU and meters "
             "GPU 0 only, so layers offloaded by device_map='auto' ran unmetered: its EPT is "
             "neither comparable nor complete")))
    for r in students:
        adapter = (evals[r.rel].get("model") or {}).get("adapter")
        if adapter:
            flags[r.rel].append((
                "lora-unmerged",
                ("eval.json shows a PEFT adapter applied by lm-eval (peft=..., not merged); the "
                "EPT script loaded the same adapter folder with from_pretrained, which attaches "
                "it unmerged: its EPT includes the adapter's extra matmuls (ept.json itself "
                "records no model, so this is what the scripts show, not the file)")))
    return flags
