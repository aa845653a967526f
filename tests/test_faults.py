"""Fault injection (issue #16): real training / teacher-cache sessions in subprocesses, killed
with a real SIGKILL (at a random point, inside a ledger append, inside a checkpoint write,
inside a teacher-cache part), fed bad counter reads and a full disk; then resumed.

Every case asserts: per-step losses identical to an undisturbed run; E_run (killed sessions
included) within its stated uncertainty of the energy actually spent — the simulated counter
is a known function of wall time, and the telemetry brackets it too; every recovered or
skipped item is labelled in report.json. The GPU is simulated (tests/fault_runner.py: no NVML
on CPU machines); everything else is the real code. `FAULT_LOG` (env) collects per-case
figures for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from fault_runner import BASE_MJ, install, run
from wattkd.cli import app
from wattkd.config import validate
from wattkd.energy.metrics import e_run, read_phases, read_telemetry, telemetry_energy

WATTS = 100.0
RUNNER = Path(__file__).with_name("fault_runner.py")
LAYERS = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 64, "tie_word_embeddings": True}
EPOCH = time.time() - 5.0
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                      os.environ.get("PYTHONPATH", "")])}


def experiment(root: Path, name: str) -> dict[str, Any]:
    return {"name": name, "output_dir": str(root / name),
            "data": {"tokenizer": "bundled:bpe-4096", "seq_len": 32, "total_tokens": 20_000,
                     "shards_dir": str(root / "shards"), "rows_per_part": 64,
                     "heldout_fraction": 0.0},
            "teacher": {"build": LAYERS}, "student": {"build": LAYERS},
            "distill": {"methods": [{"name": "baseline", "method": "none",
                                     "losses": [{"name": "ce"}]}],
                        "cache_top_k": 8, "cache_dir": str(root / name / "cache")},
            "train": {"max_steps": 40, "micro_batch_size": 4, "lr": 3e-3, "log_every": 5,
                      "checkpoint_every": 5, "tensorboard": False, "device": "cpu"},
            "telemetry": {"idle_seconds": 0, "interval_s": 0.05, "slow_interval_s": 0.2,
                          "progress_every_s": 0.3, "min_window_s": 0}}


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Shards, and the per-step losses of an undisturbed run (same simulated GPU)."""
    from wattkd.data.shards import build_shards

    root = tmp_path_factory.mktemp("faults")
    cfg = validate(experiment(root, "ref"))
    build_shards(cfg.data, cfg.shards_dir, progress=False)
    teacher = root / "teacher"
    teacher.mkdir()
    (teacher / "run.json").write_text(json.dumps({"method": "teacher", "mode": "none"}))
    ws = {"root": root, "teacher": teacher}
    run_dir = case_dir(ws, "ref")
    in_process(ws, "ref", {})
    ws["losses"] = losses(run_dir)
    assert sorted(ws["losses"]) == list(range(1, 41))
    return ws


def case_dir(ws: dict[str, Any], name: str) -> Path:
    path = ws["root"] / f"{name}.yaml"
    if not path.exists():
        path.write_text(yaml.safe_dump(experiment(ws["root"], name)))
    return ws["root"] / name / "baseline" / "rep0"


def session(ws: dict[str, Any], name: str, spec: dict[str, Any], *, cmd: list[str] | None = None,
            kill_after_s: float | None = None) -> tuple[int, float]:
    """Run one session; (return code, wall time it was seen to end). `kill_after_s`: SIGKILL it
    from here that long after its train window opened (a random point of the run)."""
    config = str(ws["root"] / f"{name}.yaml")
    spec = {"epoch": EPOCH, "watts": WATTS,
            "cmd": cmd or ["train", config, "--method", "baseline", "--resume", "auto"], **spec}
    proc = subprocess.Popen([sys.executable, str(RUNNER), json.dumps(spec)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_after_s is not None:
        ledger = case_dir(ws, name) / "phases.jsonl"
        opened = ledger.read_text().count('"kind":"begin","window":"phase"') \
            if ledger.exists() else 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if ledger.exists() and ledger.read_text().count(
                    '"kind":"begin","window":"phase"') > opened:
                break
            time.sleep(0.01)
        time.sleep(kill_after_s)
        assert proc.poll() is None, "the run ended before the random kill; make it longer"
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    ended = time.time()
    if proc.returncode not in (0, -9):
        raise AssertionError(f"session failed (rc {proc.returncode}):\n{err[-3000:]}")
    return proc.returncode, ended


def in_process(ws: dict[str, Any], name: str, spec: dict[str, Any], *,
               cmd: list[str] | None = None) -> tuple[int, float]:
    """A session in this process (no interpreter start-up: the suite stays fast), with the
    same simulated GPU and faults; single-threaded like the subprocesses."""
    import torch

    config = str(ws["root"] / f"{name}.yaml")
    spec = {"epoch": EPOCH, "watts": WATTS,
            "cmd": cmd or ["train", config, "--method", "baseline", "--resume", "auto"], **spec}
    undo, threads = install(spec), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = run(spec)
    finally:
        undo()
        torch.set_num_threads(threads)
    return rc, time.time()


def losses(run_dir: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a cut line a kill left (the reader names it)
        if rec.get("kind") in ("train", "step"):
            out[rec["step"]] = rec["loss"]
    return out


def true_j(t0: float, t1: float) -> float:
    """Energy the simulated counter counted between two wall times (0.1 s steps)."""
    def f(t: float) -> float:
        return math.floor((t - EPOCH) / 0.1) * 0.1 * WATTS
    return f(t1) - f(t0)


def telemetry_bracket(tel: Any, rec: dict[str, Any]) -> tuple[float, float]:
    """(inner, outer) telemetry energy of a window: counter samples inside it, and from the last
    sample before to the first after it; the energy spent lies between."""
    mine = [s for s in tel if s.get("session") == rec["session"]
            and any(v.get("energy_mj") is not None for v in s["gpu"].values())]
    t = [s["t_wall"] for s in mine]
    a, b = rec["start_wall"], rec["end_wall"]
    before = max((x for x in t if x <= a), default=a)
    after = min((x for x in t if x >= b), default=b)
    sub = type(tel)(s for s in mine)
    sub.headers = tel.headers
    inner = telemetry_energy(sub, a, b)["energy_j"] or 0.0
    outer = telemetry_energy(sub, before, after)["energy_j"] or 0.0
    return inner, outer


def check_energy(run_dir: Path, ended: list[float], sessions: int) -> dict[str, Any]:
    """E_run ± U against the simulated truth and the telemetry, killed sessions included."""
    phases = read_phases(run_dir)
    tel = read_telemetry(run_dir)
    fig = e_run(phases)
    train = [r for r in phases if r.get("kind") == "phase" and r["phase"] == "train"]
    assert len({r["session"] for r in train}) == sessions == len(train)
    assert fig.value is not None and fig.uncertainty is not None and fig.value >= 0
    lo = hi = inner = outer = 0.0
    for r in train:
        lo += true_j(r["start_wall"], r["end_wall"])
        # a recovered window's session died between its last sign of life and when it was
        # seen to end: the truth is anywhere in that interval
        end = min((t for t in ended if t >= r["end_wall"]), default=r["end_wall"]) \
            if r.get("status") == "recovered" else r["end_wall"]
        hi += true_j(r["start_wall"], end)
        i, o = telemetry_bracket(tel, r)
        inner, outer = inner + i, outer + o
    u = fig.uncertainty
    assert lo - u <= fig.value <= hi + u, (fig.value, u, lo, hi)
    assert inner - u <= fig.value <= outer + u + 2 * WATTS * 0.2 * sessions, (fig, inner, outer)
    out = {"e_run_j": fig.value, "unc_j": u, "truth_j": [lo, hi], "telemetry_j": [inner, outer],
           "sessions": sessions, "recovered": sum(r.get("status") == "recovered" for r in train)}
    if os.environ.get("FAULT_LOG"):
        with open(os.environ["FAULT_LOG"], "a") as fh:
            fh.write(json.dumps({"case": run_dir.parents[1].name, **out}) + "\n")
    return out


def report(ws: dict[str, Any], name: str) -> dict[str, Any]:
    out = ws["root"] / name / "report"
    res = CliRunner().invoke(app, ["report", str(ws["root"] / name), "--teacher",
                                   str(ws["teacher"]), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return json.loads((out / "report.json").read_text())


# ------------------------------------------------------------------------------- cases
def test_killed_twice_and_resumed_counts_all_three_sessions(ws: dict[str, Any]) -> None:
    """SIGKILL inside a ledger append (a cut line), then inside a checkpoint write, then a resume
    to the end; bad counter reads (0, negative) in every session. `wattkd report` exits 0."""
    run_dir = case_dir(ws, "twice")
    bad = {"4": 0, "9": -5}
    ended = []
    for kill in ({"where": "ledger-append", "n": 7}, {"where": "checkpoint-write", "n": 9}):
        rc, t = session(ws, "twice", {"kill": kill, "bad_reads": bad})
        assert rc == -9
        ended.append(t)
    rc, t = in_process(ws, "twice", {"bad_reads": bad})
    assert rc == 0
    ended.append(t)
    assert losses(run_dir) == ws["losses"]
    fig = check_energy(run_dir, ended, sessions=3)
    assert fig["recovered"] == 2
    rep = report(ws, "twice")
    notes = rep["read_notes"]["baseline/rep0"]
    assert sum("`train` phase window" in n and "recovered" in n for n in notes) == 2
    assert any("phases.jsonl" in n and "truncated line skipped" in n for n in notes)
    assert all(any(n in w for w in rep["warnings"]) for n in notes)   # in "Read first"
    runs = next(t for t in rep["tables"] if t["name"] == "runs")["rows"]
    cell = next(r for r in runs if r["run"] != "teacher")["e_run_gpu"]
    assert cell["value"] == pytest.approx(fig["e_run_j"]) and "recovered" in cell["note"]
    assert "truncated line" in cell["note"]
    plot = next(p for p in rep["plots"] if p["name"] == "energy_vs_quality")
    assert plot["gap"] or any("recovered" in n for n in plot["notes"])


def test_random_kill_bad_reads_and_a_full_disk(ws: dict[str, Any]) -> None:
    """SIGKILL from outside at a random point of the train window; a 0 and a negative counter
    read in each session are excluded (before: a reset plus the whole counter again); the
    resumed session meets ENOSPC on ledger appends 2-6 and writes the records later, whole."""
    run_dir = case_dir(ws, "random")
    kill_after = random.Random(16).uniform(0.2, 1.2)
    bad = {"6": 0, "9": -1, "14": 0}              # reads inside the train window
    rc, t1 = session(ws, "random", {"bad_reads": bad}, kill_after_s=kill_after)
    assert rc == -9
    rc, t2 = in_process(ws, "random", {"bad_reads": bad, "disk_full": {"ledger": [2, 6]}})
    assert rc == 0
    assert losses(run_dir) == ws["losses"]
    fig = check_energy(run_dir, [t1, t2], sessions=2)
    assert fig["e_run_j"] < BASE_MJ / 1000          # the whole counter was never re-counted
    metered = [r for r in read_phases(run_dir) if r.get("phase") in ("train", "run")]
    assert any("counter-glitch" in r["flags"] for r in metered)
    assert not any("counter-reset" in r["flags"] for r in metered)
    notes = report(ws, "random")["read_notes"]["baseline/rep0"]
    assert any("recovered" in n for n in notes)


def test_killed_teacher_cache_build_energy_includes_the_killed_session(
        ws: dict[str, Any]) -> None:
    from wattkd.teacher_cache import read_cache_manifest

    case_dir(ws, "cache")
    cmd = ["cache", str(ws["root"] / "cache.yaml"), "topk:8"]
    cache = ws["root"] / "cache" / "cache"
    rc, killed = session(ws, "cache", {"kill": {"where": "cache-encode", "n": 3}}, cmd=cmd)
    assert rc == -9
    assert in_process(ws, "cache", {}, cmd=cmd)[0] == 0
    energy = read_cache_manifest(cache)["energy"]
    assert [s["status"] for s in energy["sessions"]] == ["recovered", "metered"]
    assert energy["complete"] is True
    phases = read_phases(cache)
    recs = [r for r in phases if r.get("phase") == "teacher_cache"]
    assert {r.get("status") for r in recs} == {"recovered", "ok"}
    assert any("teacher_cache" in n and "recovered" in n for n in phases.labels())
    fig = e_run(phases, "teacher_cache")
    assert energy["components"]["gpu"] == pytest.approx(fig.value)
    lo = sum(true_j(r["start_wall"], r["end_wall"]) for r in recs)
    hi = sum(true_j(r["start_wall"], killed if r.get("status") == "recovered"
                    else r["end_wall"]) for r in recs)
    assert lo - fig.uncertainty <= fig.value <= hi + fig.uncertainty
    if os.environ.get("FAULT_LOG"):
        with open(os.environ["FAULT_LOG"], "a") as fh:
            fh.write(json.dumps({"case": "cache", "e_run_j": fig.value, "unc_j": fig.uncertainty,
                                 "truth_j": [lo, hi], "sessions": 2, "recovered": 1}) + "\n")


def spawn(ws: dict[str, Any], config: Path, spec: dict[str, Any]) -> subprocess.Popen[str]:
    """A real `wattkd train` of `config` in a fresh process (simulated GPU), not waited for."""
    spec = {"epoch": EPOCH, "watts": WATTS,
            "cmd": ["train", str(config), "--method", "baseline", "--resume", "auto"], **spec}
    return subprocess.Popen([sys.executable, str(RUNNER), json.dumps(spec)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_second_train_process_on_the_same_folder_is_refused(ws: dict[str, Any]) -> None:
    """Two real `wattkd train` on one run folder (issue 26): the second stops with one
    `error:` line naming the first one's pid, writes nothing; the first finishes with the
    undisturbed run's losses, every step logged once, its energy counted once."""
    run_dir = case_dir(ws, "twoproc")
    release = ws["root"] / "twoproc-go"
    first = spawn(ws, ws["root"] / "twoproc.yaml", {"hold": {"n": 5, "until": str(release)}})
    lock, ckpts = run_dir / ".wattkd.lock", run_dir / "checkpoints"
    deadline = time.monotonic() + 120   # held inside its second checkpoint (step 10)
    while time.monotonic() < deadline and first.poll() is None and not (
            any(ckpts.glob(".step_0000010.tmp-*")) and f'"pid": {first.pid}' in lock.read_text()):
        time.sleep(0.02)
    assert first.poll() is None, first.communicate()[1][-3000:]
    records = ("config.yaml", "run.json", "metrics.jsonl")
    before = [(run_dir / n).read_bytes() for n in records]
    second = spawn(ws, ws["root"] / "twoproc.yaml", {})
    _, err = second.communicate(timeout=300)
    assert [(run_dir / n).read_bytes() for n in records] == before   # the second wrote nothing
    release.touch()
    _, err_first = first.communicate(timeout=300)
    ended = time.time()
    assert first.returncode == 0, err_first[-3000:]
    assert second.returncode == 2, err[-3000:]
    assert err.count("error:") == 1 and "Traceback" not in err
    assert f"pid {first.pid} on host" in " ".join(err.split())
    assert losses(run_dir) == ws["losses"]
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))                # each step once
    check_energy(run_dir, [ended], sessions=1)
    log_case("twoproc", {"processes": 2, "refused": 1, "steps_logged": len(steps)})


def test_resume_with_a_changed_config_is_refused_then_resumes_exactly(
        ws: dict[str, Any]) -> None:
    """SIGKILL inside a checkpoint write; a resume with another lr is refused (exit 2, the key
    named, config.yaml and run.json untouched); the resume with the run's own config then
    reproduces the undisturbed losses, both sessions' energy counted."""
    run_dir = case_dir(ws, "cfgchange")
    rc, killed = session(ws, "cfgchange", {"kill": {"where": "checkpoint-write", "n": 9}})
    assert rc == -9
    changed = experiment(ws["root"], "cfgchange")
    changed["train"]["lr"] = 1e-3
    other = ws["root"] / "cfgchange-lr.yaml"
    other.write_text(yaml.safe_dump(changed))
    config_before = (run_dir / "config.yaml").read_text()
    run_before = (run_dir / "run.json").read_text()
    refused = spawn(ws, other, {})
    _, err = refused.communicate(timeout=300)
    assert refused.returncode == 2, err[-3000:]
    assert "train.lr: 0.003 -> 0.001" in " ".join(err.split()) and "Traceback" not in err
    assert (run_dir / "config.yaml").read_text() == config_before
    assert (run_dir / "run.json").read_text() == run_before
    rc, ended = in_process(ws, "cfgchange", {})
    assert rc == 0
    assert losses(run_dir) == ws["losses"]
    check_energy(run_dir, [killed, ended], sessions=2)
    log_case("cfgchange", {"refused_rc": refused.returncode, "resumed_losses_equal": True})


def log_case(case: str, figures: dict[str, Any]) -> None:
    if os.environ.get("FAULT_LOG"):
        with open(os.environ["FAULT_LOG"], "a") as fh:
            fh.write(json.dumps({"case": case, **figures}) + "\n")
