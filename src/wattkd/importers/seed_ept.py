"""The original EPT benchmark's ept.json -> wattkd's ept.json (schema wattkd.ept/1).

Its file holds E_run_J, T_in, T_out and the three ratios, nothing about how they were made.
What the original scripts at the published commit say (eval/ept/*.sh, run_ept_benchmark.py):
100 Dolly-15k prompts (seed 42), HF `generate`, greedy, max_new_tokens 64 (EOS ends a sequence
early), batch 4 for students and 2 for the teacher, energy = NVML power x dt every 0.1 s on the
GPUs given by --gpu-indices (GPU 0), no warm-up. That is recorded as the protocol and labelled
as coming from the scripts; the batch sizes can be overridden.
"""

from __future__ import annotations

from typing import Any

from wattkd.energy.sources import NvmlSource
from wattkd.eval.protocol import protocol_hash
from wattkd.importers.seed_layout import need

__all__ = ["SCRIPT_BATCH", "ept_doc"]

SCRIPT_BATCH = {"student": 4, "teacher": 2}   # eval/ept/*.sh at the published commit
NUM_PROMPTS, MAX_NEW = 100, 64
PROTOCOL = {"kind": "ept", "format": "seed", "prompt_source": "databricks-dolly-15k, 100 "
            "prompts, shuffle seed 42 (original eval/ept/benchmark/ept_data.py)",
            "prompts_sha256": None, "num_prompts": NUM_PROMPTS, "prompt_tokens": None,
            "max_new_tokens": MAX_NEW, "min_new_tokens": None, "decoding": "greedy",
            "warmup_batches": 0, "dtype": "bfloat16", "device_name": None,
            "engine": {"name": "hf-generate", "cache": "dynamic", "compile": False},
            "energy": "NVML power x dt (0.1 s), GPUs of --gpu-indices", "prefill_split": False}


def ept_doc(doc: dict[str, Any], rel: str, batch_size: int, model: dict[str, Any]
            ) -> tuple[dict[str, Any], list[str]]:
    """(wattkd.ept/1 document, notes). Token counts and energy from the file; ratios
    recomputed and checked against the file's."""
    e = float(need(doc, "E_run_J", f"{rel}/ept.json"))
    t_in = int(need(doc, "T_in", f"{rel}/ept.json"))
    t_out = int(need(doc, "T_out", f"{rel}/ept.json"))
    notes, flags = [], ["imported", f"hf-generate-batch-{batch_size}"]
    total = t_in + t_out
    mine = {"EPT_in_J_per_tok": e / t_in if t_in else None,
            "EPT_out_J_per_tok": e / t_out if t_out else None,
            "EPT_total_J_per_tok": e / total if total else None}
    for k, v in mine.items():
        theirs = doc.get(k)
        if v is not None and isinstance(theirs, int | float) and abs(theirs - v) > 1e-6 * v:
            flags.append("ept-arithmetic-mismatch")
            notes.append(f"{rel}/ept.json: {k} = {theirs:.6g} but E_run_J / tokens = {v:.6g}")
    if t_out < NUM_PROMPTS * MAX_NEW:
        notes.append(f"{rel}/ept.json: {t_out} output tokens of {NUM_PROMPTS * MAX_NEW} possible: "
                     "EOS ended sequences early, so models generated different token counts")
    proto = {**PROTOCOL, "batch_sizes": [batch_size]}
    run = {"batch_size": batch_size, "input_tokens": t_in, "output_tokens": t_out,
           "total_tokens": total, "estimated": False, "flags": flags, "notes": notes,
           "energy": {"gpu": {"energy_j": e, "source": NvmlSource.POWER_LABEL,
                              "estimated": False, "ept_in_j": mine["EPT_in_J_per_tok"],
                              "ept_out_j": mine["EPT_out_J_per_tok"],
                              "ept_total_j": mine["EPT_total_J_per_tok"],
                              "uncertainty_j": None, "idle_power_w": None,
                              "input_tokens": t_in, "output_tokens": t_out,
                              "total_tokens": total}}}
    out = {"schema": "wattkd.ept/1", "model": model, "protocol": proto,
           "protocol_hash": protocol_hash(proto),
           "measurement": {"label": "imported: the original EPT benchmark's integral of NVML "
                                    "power (0.1 s) on the GPUs it was told to watch; protocol "
                                    "from the original scripts, not from ept.json"},
           "runs": [run], "imported": {"format": "seed", "file": f"{rel}/ept.json"}}
    return out, notes
