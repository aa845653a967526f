"""`wattkd slurm status RUN_DIR`: which stage jobs ran, their state and exit codes.

Works without Slurm accounting (many small clusters have no slurmdbd, so no `sacct`): a job's
state comes from the first source that knows it:
  1. `scontrol show job -o` — queued, running and recently finished jobs (MinJobAge);
  2. `sacct` — where accounting exists;
  3. the job-completion log (`JobCompType=jobcomp/filetxt`, path from `scontrol show config`),
     which keeps one line per finished (or requeued) attempt; the last line wins.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from wattkd.runinfo import effective_status
from wattkd.slurm.graph import SlurmError

FIELD = re.compile(r"(\w+)=(\S*)")
NO_TASK = "-"


@dataclass
class TaskState:
    state: str
    exit_code: str | None = None
    restarts: int | None = None
    reason: str | None = None
    job_id: str | None = None     # the task's own job id (array tasks have one each)
    source: str = ""


def load_jobs(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise SlurmError(f"no {path}: nothing was submitted for this output directory "
                         "(submit with `wattkd slurm submit CONFIG`)") from None
    except ValueError as exc:
        raise SlurmError(f"{path} is not valid JSON: {exc}") from None
    if record.get("format") != "wattkd-slurm-jobs" or record.get("version") != 1:
        raise SlurmError(f"{path}: format {record.get('format')!r} v{record.get('version')} is "
                         "not wattkd-slurm-jobs v1")
    return record


# ------------------------------------------------------------------------------- parsing
def parse_fields(line: str) -> dict[str, str]:
    return dict(FIELD.findall(line))


def expand_tasks(spec: str) -> list[str]:
    """Array task expression ("3", "0-4", "1,3-5", "0-9%2") -> task ids as strings."""
    spec = spec.split("%", 1)[0]
    out: list[str] = []
    for part in filter(None, spec.split(",")):
        if "-" in part:
            lo, hi = part.split("-", 1)
            step = 1
            if ":" in hi:
                hi, s = hi.split(":", 1)
                step = int(s)
            out += [str(i) for i in range(int(lo), int(hi) + 1, step)]
        else:
            out.append(part)
    return out


def _task_state(f: dict[str, str], source: str) -> TaskState:
    restarts = f.get("Restarts")
    reason = f.get("Reason")
    return TaskState(state=f.get("JobState", "UNKNOWN"), exit_code=f.get("ExitCode"),
                     restarts=int(restarts) if restarts and restarts.isdigit() else None,
                     reason=None if reason in (None, "None", "(null)") else reason,
                     job_id=f.get("JobId"), source=source)


def states_from_lines(lines: list[str], source: str) -> dict[str, dict[str, TaskState]]:
    """scontrol -o / jobcomp lines -> {array or plain job id: {task: state}}; later lines win."""
    out: dict[str, dict[str, TaskState]] = {}
    for line in lines:
        f = parse_fields(line)
        if "JobId" not in f:
            continue
        master = f.get("ArrayJobId") or f["JobId"]
        tasks = expand_tasks(f["ArrayTaskId"]) if f.get("ArrayTaskId") else [NO_TASK]
        st = _task_state(f, source)
        for t in tasks:
            out.setdefault(master, {})[t] = st
    return out


# -------------------------------------------------------------------------------- sources
def _run(argv: list[str]) -> subprocess.CompletedProcess[str] | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _from_scontrol(job_id: str) -> dict[str, TaskState]:
    res = _run(["scontrol", "show", "job", "-o", job_id])
    if res is None or res.returncode != 0:
        return {}
    return states_from_lines(res.stdout.splitlines(), "scontrol").get(job_id, {})


def _from_sacct(job_ids: list[str]) -> dict[str, dict[str, TaskState]]:
    res = _run(["sacct", "-n", "-P", "-X", "-j", ",".join(job_ids),
                "-o", "JobID,State,ExitCode,Reason"])
    out: dict[str, dict[str, TaskState]] = {}
    if res is None or res.returncode != 0:
        return out
    for line in res.stdout.splitlines():
        parts = line.split("|")
        if len(parts) < 3:
            continue
        jid, _, task = parts[0].partition("_")
        state = parts[1].split()[0] if parts[1] else "UNKNOWN"
        reason = parts[3] if len(parts) > 3 and parts[3] not in ("", "None") else None
        for t in (expand_tasks(task.strip("[]")) if task else [NO_TASK]):
            out.setdefault(jid, {})[t] = TaskState(state, parts[2], None, reason, source="sacct")
    return out


def jobcomp_file() -> Path | None:
    """The job-completion log, when the cluster keeps one as text."""
    res = _run(["scontrol", "show", "config"])
    if res is None or res.returncode != 0:
        return None
    conf = dict(re.findall(r"^(\w+)\s*=\s*(.*?)\s*$", res.stdout, re.MULTILINE))
    if conf.get("JobCompType") != "jobcomp/filetxt" or not conf.get("JobCompLoc"):
        return None
    return Path(conf["JobCompLoc"])


def _from_jobcomp(path: Path | None) -> dict[str, dict[str, TaskState]]:
    if path is None:
        return {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    return states_from_lines(lines, "jobcomp")


def query_states(job_ids: list[str]) -> dict[str, dict[str, TaskState]]:
    """{job id: {task ("-" when not an array): state}} from the best source that knows."""
    found: dict[str, dict[str, TaskState]] = {j: _from_scontrol(j) for j in job_ids}
    missing = [j for j, tasks in found.items() if not tasks]
    if missing:
        acct = _from_sacct(missing)
        comp = _from_jobcomp(jobcomp_file())
        for j in missing:
            found[j] = acct.get(j) or comp.get(j) or {}
    return found


# --------------------------------------------------------------------------------- report
def _run_note(out_dir: Path, job: dict[str, Any], task: str) -> str:
    if job["stage"] != "train" or task == NO_TASK:
        return ""
    try:
        run = json.loads((out_dir / job["method"] / f"rep{task}" / "run.json").read_text())
    except (OSError, ValueError):
        return ""
    step = f" step {run['step']}" if run.get("step") is not None else ""
    return f"run {effective_status(run)}{step}"


def _log_path(job: dict[str, Any], task: str) -> str | None:
    """The log file of one job or array task (jobs.json keeps sbatch's %j/%A/%a pattern)."""
    log = job.get("log")
    if not log:
        return None
    log = log.replace("%A", job["job_id"]).replace("%j", job["job_id"])
    return log.replace("%a", task) if task != NO_TASK else log


def collect_status(run_dir: Path) -> list[dict[str, Any]]:
    """One row per job, or per array task: key, stage, job id, task, state, exit code, ..."""
    record = load_jobs(run_dir / "slurm" / "jobs.json")
    states = query_states([j["job_id"] for j in record["jobs"]])
    rows = []
    for job in record["jobs"]:
        tasks = states.get(job["job_id"], {})
        wanted = expand_tasks(job["array"]) if job.get("array") else [NO_TASK]
        for task in wanted:
            st = tasks.get(task) or (tasks.get(NO_TASK) if len(tasks) == 1 else None)
            rows.append({
                "key": job["key"], "stage": job["stage"], "method": job.get("method"),
                "job_id": job["job_id"], "task": None if task == NO_TASK else int(task),
                "task_job_id": st.job_id if st else None,
                "state": st.state if st else "UNKNOWN",
                "exit_code": st.exit_code if st else None,
                "restarts": st.restarts if st else None,
                "reason": st.reason if st else "no record (purged and no accounting)",
                "source": st.source if st else None,
                "run": _run_note(run_dir, job, task), "log": _log_path(job, task)})
    return rows


STYLE = {"COMPLETED": "green", "RUNNING": "cyan", "PENDING": "yellow", "FAILED": "red",
         "CANCELLED": "red", "TIMEOUT": "red", "OUT_OF_MEMORY": "red", "NODE_FAIL": "red"}


def print_status(run_dir: Path) -> None:
    """A table of every stage job of the experiment in `run_dir` (its output directory)."""
    rows = collect_status(Path(run_dir))
    table = Table(title=f"Slurm jobs of {run_dir}")
    for col in ("job", "stage", "job id", "state", "exit", "restarts", "notes"):
        table.add_column(col)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
        jid = r["job_id"] if r["task"] is None else f"{r['job_id']}_{r['task']}"
        notes = "; ".join(x for x in (r["reason"], r["run"]) if x)
        if r["state"] not in ("COMPLETED", "RUNNING", "PENDING") and r["log"]:
            notes = "; ".join(x for x in (notes, f"log {r['log']}") if x)
        style = STYLE.get(r["state"], "")
        table.add_row(r["key"], r["stage"], jid,
                      f"[{style}]{r['state']}[/{style}]" if style else r["state"],
                      r["exit_code"] or "", "" if r["restarts"] is None else str(r["restarts"]),
                      notes)
    console = Console()
    console.print(table)
    console.print(", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())))
