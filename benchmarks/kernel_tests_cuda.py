"""Run the Triton kernel tests (tests/test_lm_head_kd.py, tests/test_body_kernels.py) on a GPU,
each case under a timeout, and record per case: outcome, wall time, Triton compile time (kernel
by kernel) vs the rest (run), and, for a case that times out, where every thread stood 5 s
before it was killed.

    python benchmarks/kernel_tests_cuda.py --out DIR [--timeout 90] [--budget 300]

One pytest process runs the cases in order (one torch import); a case past --timeout is
killed with its process, recorded as `timeout`, and a fresh process goes on with the next
case. A fresh TRITON_CACHE_DIR makes every kernel compile for real, so compile times are
measured, not cache hits. Writes DIR/kernel_tests.json (and kernel_tests_tracebacks.txt when
something timed out); --dry-run lists the cases and writes the JSON without running them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_FILES = ("tests/test_lm_head_kd.py", "tests/test_body_kernels.py")


def _env(log: Path, tracebacks: Path, timeout: float, cache: str) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO / "benchmarks"), str(REPO / "src"), env.get("PYTHONPATH", "")]
    env.update(PYTHONPATH=os.pathsep.join(p for p in paths if p), KERNEL_TIMING_LOG=str(log),
               KERNEL_TIMING_TRACEBACKS=str(tracebacks), KERNEL_TIMING_TIMEOUT=str(timeout),
               TRITON_CACHE_DIR=cache, PYTHONUNBUFFERED="1")
    return env


def collect(test_files: list[str]) -> list[str]:
    """The test ids of `test_files`, in pytest's order."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", *test_files], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")},
                         check=False)
    ids = [line.strip() for line in out.stdout.splitlines() if "::" in line]
    if not ids:
        raise SystemExit(f"error: no test collected from {test_files}:\n{out.stdout[-2000:]}"
                         f"{out.stderr[-2000:]}")
    return ids


def _events(log: Path) -> list[dict]:
    if not log.exists():
        return []
    rows = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:   # a line cut by the kill
            continue
    return rows


def cuda_kernels() -> bool:
    """True when the kernels will run compiled on a GPU (CUDA present, TRITON_INTERPRET not
    asked for)."""
    import torch

    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"


def _where_killed(events: list[dict], node: str, ids: list[str]) -> dict:
    """The compiles a killed case finished, and the kernel it was compiling when killed
    (None: it was running, not compiling)."""
    starts = [i for i, e in enumerate(events)
              if e["event"] == "start" and _own_id(e["node"], ids) == node]
    mine = events[starts[-1] + 1:] if starts else []
    done = [{"kernel": e["kernel"], "seconds": e["seconds"]} for e in mine
            if e["event"] == "compile_end"]
    opened = [e["kernel"] for e in mine if e["event"] == "compile_start"]
    compiling = opened[-1] if len(opened) > len(done) else None
    return {"compiles": done, "compile_s": round(sum(c["seconds"] for c in done), 3),
            "killed_while_compiling": compiling}


def _own_id(node: str, ids: list[str]) -> str:
    """The id in `ids` pytest reports as `node` (pytest names a file outside its rootdir
    relative to the file's folder)."""
    return next((i for i in ids if i == node or i.endswith("/" + node)), node)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_cases(ids: list[str], out: Path, timeout: float, budget: float
              ) -> tuple[dict[str, dict], dict]:
    """(node id -> its record, how the compiles were timed: the plugin's session record);
    cases left when the budget runs out are `not run`."""
    log, tracebacks = out / "kernel_tests_events.jsonl", out / "kernel_tests_tracebacks.txt"
    for p in (log, tracebacks):
        p.unlink(missing_ok=True)
    cache = tempfile.mkdtemp(prefix="triton-cache-")
    env = _env(log, tracebacks, timeout, cache)
    if cuda_kernels():   # compiled kernels on the GPU, whatever tests/conftest.py guesses
        env["TRITON_INTERPRET"] = "0"
    results: dict[str, dict] = {}
    t_start = time.monotonic()
    while True:
        todo = [i for i in ids if i not in results]
        if not todo or time.monotonic() - t_start > budget:
            break
        seen = len(_events(log))
        console = Path(cache) / "pytest-output.txt"   # a file: a full pipe would block pytest
        with console.open("w") as sink:
            proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p",
                                     "no:cacheprovider", "-p", "kernel_case_timing", "-o",
                                     "faulthandler_timeout=0", *todo], cwd=REPO, env=env,
                                    start_new_session=True, stdout=sink,
                                    stderr=subprocess.STDOUT)
        started: dict[str, float] = {}
        current = None
        while proc.poll() is None:
            time.sleep(0.5)
            for ev in _events(log)[seen:]:
                seen += 1
                if ev["event"] == "start":
                    current = _own_id(ev["node"], ids)
                    started[current] = time.monotonic()
                elif ev["event"] == "end":
                    results[_own_id(ev["node"], ids)] = ev
                    current = None
            over_budget = time.monotonic() - t_start > budget
            if current and (time.monotonic() - started[current] > timeout or over_budget):
                _kill(proc)
                results[current] = {
                    "node": current, "outcome": "timeout" if not over_budget else "budget",
                    "wall_s": round(time.monotonic() - started[current], 1),
                    **_where_killed(_events(log), current, ids)}
                break
            if over_budget and not current:
                _kill(proc)
                break
        tail = console.read_text(errors="replace")
        for ev in _events(log)[seen:]:
            if ev["event"] == "end":
                results[_own_id(ev["node"], ids)] = ev
        if not any(i in results for i in todo):
            # no case of this process got a result (pytest could not start them, e.g. an
            # import error): record it once and stop rather than start it again
            results[todo[0]] = {"node": todo[0], "outcome": f"pytest exit {proc.returncode}",
                                "output": tail[-3000:]}
            break
    for i in ids:
        results.setdefault(i, {"node": i, "outcome": "not run"})
    sessions = [e for e in _events(log) if e["event"] == "session"]
    shutil.rmtree(cache, ignore_errors=True)
    return results, sessions[0] if sessions else {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds per case")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for all cases")
    ap.add_argument("--tests", nargs="+", default=list(TEST_FILES), help="test files")
    ap.add_argument("--match", default=None, help="only the cases whose id contains this")
    ap.add_argument("--fp32-blocks", default=None, metavar="BM,BV,BK,WARPS,STAGES",
                    help="lm_head_kd's fp32 tiles for this run (diagnosis of compile times)")
    ap.add_argument("--dry-run", action="store_true", help="list the cases, run none")
    args = ap.parse_args(argv)
    if args.timeout <= 0 or args.budget <= 0:
        ap.error("--timeout and --budget must be > 0 seconds")
    if args.fp32_blocks is not None:
        parts = args.fp32_blocks.split(",")
        if len(parts) != 5 or not all(p.isdigit() and int(p) > 0 for p in parts):
            ap.error(f"--fp32-blocks: expected five positive integers BM,BV,BK,WARPS,STAGES, "
                     f"got {args.fp32_blocks!r}")
        os.environ["KERNEL_TIMING_FP32_BLOCKS"] = args.fp32_blocks
    for name in args.tests:
        if not (REPO / name).exists():
            ap.error(f"--tests: {name} does not exist under {REPO}")
    args.out.mkdir(parents=True, exist_ok=True)
    ids = [i for i in collect(args.tests) if args.match is None or args.match in i]
    if not ids:
        ap.error(f"--match: no case of {args.tests} contains {args.match!r}")
    import torch

    cuda = cuda_kernels()
    t0 = time.monotonic()
    results, timing = (({i: {"node": i, "outcome": "not run (dry run)"} for i in ids}, {})
                       if args.dry_run else run_cases(ids, args.out, args.timeout, args.budget))
    counts: dict[str, int] = {}
    for r in results.values():
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    record = {"name": "kernel_tests_cuda", "date": datetime.now(timezone.utc).isoformat(
                  timespec="seconds"),
              "card": torch.cuda.get_device_name() if cuda else platform.processor(),
              "cuda": cuda, "versions": _versions(),   # cuda: kernels compiled on the GPU "command": " ".join(sys.argv),
              "timeout_s": args.timeout, "budget_s": args.budget,
              "fp32_blocks": args.fp32_blocks, "compile_timing": timing,
              "seconds": round(time.monotonic() - t0, 1), "counts": counts,
              "cases": [results[i] for i in ids]}
    (args.out / "kernel_tests.json").write_text(json.dumps(record, indent=2))
    print(markdown(record))
    return 0 if set(counts) <= {"passed", "skipped", "not run (dry run)"} else 1


def _versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "triton"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "missing"
    return out


def markdown(record: dict) -> str:
    """The per-case table for benchmarks/RESULTS.md."""
    lines = [f"Kernel tests on {record['card']} ({record['date']}, torch "
             f"{record['versions'].get('torch')}, triton {record['versions'].get('triton')}): "
             + ", ".join(f"{n} {k}" for k, n in sorted(record["counts"].items())), "",
             "| case | outcome | wall s | compile s | run s | kernels compiled |",
             "|---|---|---|---|---|---|"]
    for r in record["cases"]:
        kernels = ", ".join(f"{c['kernel']} {c['seconds']}" for c in r.get("compiles", []))
        if r.get("killed_while_compiling"):
            kernels += f" (killed while compiling {r['killed_while_compiling']})"
        lines.append(f"| {r['node'].split('::', 1)[-1]} | {r['outcome']} | "
                     f"{r.get('wall_s', '—')} | {r.get('compile_s', '—')} | "
                     f"{r.get('run_s', '—')} | {kernels or '—'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
