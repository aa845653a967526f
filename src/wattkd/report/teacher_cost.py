"""A student's share of the teacher fine-tune energy (`wattkd teacher finetune`).

The fine-tune run (<output_dir>/teacher, run.json role `teacher_finetune`) is a teacher-side
cost paid once, like the teacher cache: its `train` energy is split equally over the distinct
students registered in its users.jsonl (wattkd.teacher_adapt), and each student's E_total
carries its share. The fine-tune energy itself is the teacher row's E_run.
"""

from __future__ import annotations

from pathlib import Path

from wattkd.energy.components import label_of
from wattkd.report.collect import RunData, load_run
from wattkd.report.energy import phase_energy
from wattkd.report.metrics import Quantity


def finetune_share(run: RunData, comp: str) -> Quantity | None:
    """None when the run did not use a teacher fine-tuned in its experiment."""
    from wattkd.teacher_adapt import finetune_users

    rec = run.info.get("teacher_finetune")
    if not isinstance(rec, dict) or not rec.get("run_dir"):
        return None
    tdir = Path(rec["run_dir"])
    if not (tdir / "run.json").is_file():
        return Quantity.missing(f"teacher fine-tune run {tdir} not found: its energy cannot be "
                                "shared", "J")
    e, _ = phase_energy(load_run(tdir, "teacher"), "train", comp)
    if not e.ok:
        return Quantity.missing(f"teacher fine-tune: no {label_of(comp)} energy ({e.gap})",
                                "J")
    users = len(finetune_users(tdir))
    if users < 1:
        return Quantity.missing(f"teacher fine-tune {tdir}: no student registered in "
                                "users.jsonl to share its energy", "J")
    return Quantity(e.value / users, "J", None if e.unc is None else e.unc / users,  # type: ignore[operator]
                    e.source, e.estimated,
                    note=f"teacher fine-tune energy {e.value:.6g} J / {users} students")
