"""Tables and target verdicts of issue 30 for benchmarks/RESULTS.md, from the records that
benchmarks/gpu_issue30.sh writes (kd_throughput.json, kernel_tests.json and the optional
diagnosis run's kernel_tests.json). Nothing is computed that the records do not hold.

    python benchmarks/issue30_table.py --kd KD.json [--kernel KT.json] [--diag DIAG.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_tests_cuda import markdown as kernel_markdown

PEER = "liger_chunked"
TOPK_ROWS = ("wattkd_topk", "wattkd_topk_body_compile", "wattkd_topk_body_triton",
             "wattkd_topk_triton")
ONLINE_ROWS = ("wattkd", "wattkd_body_compile", "wattkd_body_triton")
TOPK_MIN_TPS = 220_000     # issue 30, on an H200
TOPK_OVER_PEER = 1.9
ONLINE_OVER_PEER = 1.25


def _best(records: list[dict], names: tuple[str, ...]) -> dict | None:
    ok = [r for r in records if r["status"] == "ok" and r["impl"] in names]
    return max(ok, key=lambda r: r["tokens_per_s"], default=None)


def _fmt(value, spec: str = "") -> str:
    return "—" if value is None else format(value, spec)


def kd_table(kd: dict) -> list[str]:
    records = kd["records"]
    peer = _best(records, (PEER,))
    lines = [(f"KD step throughput on {kd['card']} ({kd['date']}); command: "
              f"`{kd['command']}`"), "",
             (f"| implementation | batch | tokens/s | / {PEER} | peak GB (timed steps) | "
              "peak GB (build + setup + warm-up) | J/token | MFU | status |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        ok = r["status"] == "ok"
        ratio = (f"{r['tokens_per_s'] / peer['tokens_per_s']:.3f}x"
                 if ok and peer else "—")
        lines.append(f"| {r['impl']} | {r['batch']} | {_fmt(r.get('tokens_per_s'), ',.0f')} | "
                     f"{ratio} | {_fmt(r.get('peak_mem_gb'))} | "
                     f"{_fmt(r.get('setup_peak_mem_gb'))} | {_fmt(r.get('j_per_token'))} | "
                     f"{_fmt(r.get('mfu'))} | {r['status'][:120]} |")
    return lines


def verdicts(kd: dict, kernel: dict | None) -> list[str]:
    """One line per target of issue 30: figures, arithmetic and met / missed / not measured."""
    records = kd["records"]
    peer, topk = _best(records, (PEER,)), _best(records, TOPK_ROWS)
    online, plain = _best(records, ONLINE_ROWS), _best(records, ("wattkd",))
    out = []

    def line(target: str, met: bool | None, how: str) -> None:
        word = "not measured" if met is None else "**met**" if met else "**missed**"
        out.append(f"- {target}: {word} ({how})")

    h200 = "H200" in kd["card"]
    if topk:
        line(f"cached top-k step >= {TOPK_MIN_TPS:,} tokens/s on an H200",
             topk["tokens_per_s"] >= TOPK_MIN_TPS if h200 else None,
             f"{topk['impl']} {topk['tokens_per_s']:,.0f} tokens/s on {kd['card']}"
             + ("" if h200 else "; not an H200"))
    else:
        line("cached top-k step runs", False if any(r["impl"] in TOPK_ROWS for r in records)
             else None, "no ok top-k row: " + ", ".join(
                 f"{r['impl']} {r['status'][:60]}" for r in records if r["impl"] in TOPK_ROWS))
    for name, row, factor in (("cached top-k", topk, TOPK_OVER_PEER),
                              ("online dense", online, ONLINE_OVER_PEER)):
        if row and peer:
            ratio = row["tokens_per_s"] / peer["tokens_per_s"]
            line(f"{name} step >= {factor}x {PEER}, same run", ratio >= factor,
                 f"{row['impl']} {row['tokens_per_s']:,.0f} / {PEER} "
                 f"{peer['tokens_per_s']:,.0f} = {ratio:.3f}x")
        else:
            line(f"{name} step >= {factor}x {PEER}", None, "a row is missing or failed")
    if topk and plain and topk.get("peak_mem_gb") is not None:
        top = max(topk["peak_mem_gb"], topk.get("setup_peak_mem_gb") or 0.0)
        line("cached top-k at no more memory than the online step", top <= plain["peak_mem_gb"],
             f"{topk['impl']} peak {top} GB (incl. building the top-k tensors) vs wattkd online "
             f"{plain['peak_mem_gb']} GB (timed steps)")
    if kernel is not None:
        counts = kernel["counts"]
        good = kernel["cuda"] and set(counts) <= {"passed", "skipped"}
        line("Triton kernel tests pass on a GPU (every path, fp64 reference)",
             good if kernel["cuda"] else None,
             ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + f" on {kernel['card']}")
    return out


def diag_lines(diag: dict) -> list[str]:
    lines = [(f"Diagnosis: the JSD case at the fp32 tiles of before "
              f"({diag.get('fp32_blocks')}: BM,BV,BK,warps,stages), fresh Triton cache, "
              f"timeout {diag['timeout_s']} s:")]
    for case in diag["cases"]:
        compiles = ", ".join(f"{c['kernel']} {c['seconds']} s" for c in case.get("compiles", []))
        lines.append(f"- {case['node'].split('::', 1)[-1]}: {case['outcome']}, wall "
                     f"{case.get('wall_s', '—')} s, compiles: {compiles or 'none finished'}"
                     + (f"; killed while compiling {case['killed_while_compiling']}"
                        if case.get("killed_while_compiling") else ""))
    return lines


def _load(path: Path | None) -> dict | None:
    if path is None or not path.exists():
        return None
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kd", type=Path, required=True, help="kd_throughput.json")
    ap.add_argument("--kernel", type=Path, default=None, help="kernel_tests.json")
    ap.add_argument("--diag", type=Path, default=None, help="diagnosis kernel_tests.json")
    args = ap.parse_args(argv)
    kd, kernel, diag = _load(args.kd), _load(args.kernel), _load(args.diag)
    lines = ["# Issue 30 results", ""]
    if kd is None:
        lines.append(f"(no kd_throughput record at {args.kd})")
    else:
        lines += kd_table(kd) + ["", "Targets (issue 30):"] + verdicts(kd, kernel)
    if kernel is not None:
        lines += ["", kernel_markdown(kernel)]
    if diag is not None:
        lines += [""] + diag_lines(diag)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
