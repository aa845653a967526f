"""`wattkd slurm submit`: write one sbatch script per job and submit them in dependency order.

Files, all under `<output_dir>/slurm/`:
  config.yaml              the resolved config the jobs read (frozen at submission, so editing
                           the source YAML later cannot change a queued pipeline)
  <key>.sbatch             one script per job (readable; resubmit one by hand if needed)
  logs/<job-name>-<id>.out job output; a requeued job appends to its log
  jobs.json                what was submitted (format below), written atomically after each
                           sbatch so a half-submitted pipeline is still on record

jobs.json (format "wattkd-slurm-jobs", version 1):
  {"format", "version", "experiment", "config", "source_config", "workdir", "submitted",
   "status": "submitted" | "aborted",
   "jobs": [{"key", "stage", "method", "array": "0-4" | null, "job_id", "script", "log",
             "depends_on": [{"kind", "key", "job_id"}], "sbatch": [argv...]}]}
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from wattkd.atomic import atomic_write_json, atomic_write_text
from wattkd.config import ExperimentConfig, dump
from wattkd.slurm.graph import SlurmError, StageJob, build_graph, dependency_arg, format_graph
from wattkd.slurm.scripts import Target, render
from wattkd.slurm.status import load_jobs, query_states

log = logging.getLogger(__name__)

JOBS_FORMAT = "wattkd-slurm-jobs"
JOBS_VERSION = 1
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING",
                 "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT",
                 "RESV_DEL_HOLD", "STOPPED"}


def slurm_dir(out: Path) -> Path:
    return out / "slurm"


def _absolute(p: Path) -> Path:
    return p if p.is_absolute() else Path.cwd() / p


def _target(cfg: ExperimentConfig) -> Target:
    out = _absolute(cfg.out)
    sdir = slurm_dir(out)
    return Target(mode="pipeline", log_dir=sdir / "logs", workdir=Path.cwd(),
                  config=sdir / "config.yaml", out_dir=out, job_prefix=f"wattkd-{cfg.name}")


def plan(cfg: ExperimentConfig, only: set[str] | None = None
         ) -> tuple[list[StageJob], dict[str, str]]:
    """The jobs and their scripts (key -> text); validates everything, writes nothing."""
    jobs = build_graph(cfg, only)
    target = _target(cfg)
    return jobs, {j.key: render(j, cfg, target) for j in jobs}


def submit_pipeline(cfg: ExperimentConfig, *, config_path: Path, dry_run: bool,
                    only: set[str] | None = None) -> dict[str, Any]:
    """Write the scripts and submit them with afterok/aftercorr dependencies.

    `dry_run` prints the scripts and the dependency graph and touches nothing. `only` submits
    a subset of the stages (their dependencies on the others are dropped). Returns
    {"jobs": [...jobs.json entries], "graph": text, "scripts": {key: text},
     "jobs_file": path | None}.
    """
    jobs, scripts = plan(cfg, only)
    if not jobs:
        raise SlurmError("no stages left to submit")
    sdir = slurm_dir(_absolute(cfg.out))
    if dry_run:
        for job in jobs:
            print(f"==> {sdir / (job.key + '.sbatch')} <==")
            print(scripts[job.key])
        graph = format_graph(jobs)
        print("dependency graph (job <- what it waits for):")
        print(graph)
        return {"jobs": [], "graph": graph, "scripts": scripts, "jobs_file": None}

    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SlurmError("sbatch not found on PATH: submit from a cluster login node, or use "
                         "--dry-run to see the scripts")
    jobs_file = sdir / "jobs.json"
    _refuse_if_active(jobs_file)
    (sdir / "logs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(sdir / "config.yaml", dump(cfg))
    for job in jobs:
        atomic_write_text(sdir / f"{job.key}.sbatch", scripts[job.key])

    record: dict[str, Any] = {
        "format": JOBS_FORMAT, "version": JOBS_VERSION, "experiment": cfg.name,
        "config": str(sdir / "config.yaml"), "source_config": str(_absolute(config_path)),
        "workdir": str(Path.cwd()), "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "status": "submitted", "jobs": []}
    ids: dict[str, str] = {}
    for job in jobs:
        argv = [sbatch, "--parsable"]
        dep = dependency_arg(job.deps, ids)
        if dep:
            argv.append(f"--dependency={dep}")
        argv.append(str(sdir / f"{job.key}.sbatch"))
        try:
            job_id = _sbatch(argv)
        except SlurmError as exc:
            record["status"] = "aborted"
            atomic_write_json(jobs_file, record)
            cancelled = _cancel(list(ids.values()))
            raise SlurmError(f"{exc}\nsubmission stopped at {job.key}; "
                             f"{cancelled}") from None
        ids[job.key] = job_id
        record["jobs"].append({
            "key": job.key, "stage": job.stage, "method": job.method,
            "array": f"0-{job.array - 1}" if job.array else None, "job_id": job_id,
            "script": str(sdir / f"{job.key}.sbatch"), "log": str(_log_pattern(cfg, job)),
            "depends_on": [{"kind": d.kind, "key": d.key, "job_id": ids[d.key]}
                           for d in job.deps],
            "sbatch": argv})
        atomic_write_json(jobs_file, record)
        log.info("submitted %s as job %s", job.key, job_id)
    graph = format_graph(jobs, ids)
    print(f"submitted {len(jobs)} jobs for {cfg.name}; record: {jobs_file}")
    print(graph)
    print(f"follow with: wattkd slurm status {cfg.out}")
    return {"jobs": record["jobs"], "graph": graph, "scripts": scripts, "jobs_file": jobs_file}


def _log_pattern(cfg: ExperimentConfig, job: StageJob) -> Path:
    name = f"wattkd-{cfg.name}-{job.key}"
    suffix = "%A_%a.out" if job.array else "%j.out"
    return slurm_dir(_absolute(cfg.out)) / "logs" / f"{name}-{suffix}"


def _sbatch(argv: list[str]) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmError(f"sbatch could not run: {exc}") from None
    out = res.stdout.strip()
    m = re.match(r"^(\d+)", out)
    if res.returncode != 0 or m is None:
        raise SlurmError(f"sbatch {argv[-1]} failed (exit {res.returncode}): "
                         f"{res.stderr.strip() or out}")
    return m.group(1)


def _cancel(job_ids: list[str]) -> str:
    if not job_ids:
        return "nothing had been submitted"
    scancel = shutil.which("scancel")
    if scancel is None:
        return f"cancel the jobs already submitted by hand: {' '.join(job_ids)}"
    subprocess.run([scancel, *job_ids], capture_output=True, timeout=60, check=False)
    return f"cancelled the jobs already submitted: {' '.join(job_ids)}"


def _refuse_if_active(jobs_file: Path) -> None:
    """A second submission while the first is queued would run every stage twice."""
    if not jobs_file.exists():
        return
    try:
        record = load_jobs(jobs_file)
    except SlurmError:
        return
    states = query_states([j["job_id"] for j in record["jobs"]])
    active = sorted({jid for jid, tasks in states.items()
                     if any(t.state in ACTIVE_STATES for t in tasks.values())}, key=int)
    if active:
        raise SlurmError(f"{jobs_file}: jobs {' '.join(active)} of an earlier submission are "
                         "still queued or running; wait for them or `scancel` them first")
    stamp = record.get("submitted", "old").replace(":", "")
    jobs_file.rename(jobs_file.with_name(f"jobs-{stamp}.json"))


