"""Validate wattkd's energy layer on a real NVIDIA GPU, in one ~3 minute invocation.

    python benchmarks/energy_validation.py --out DIR          # GPU (H100/H200 class)
    python benchmarks/energy_validation.py --out DIR --dry-run  # no GPU: checks the script

It measures, on GPU 0 (CUDA's first visible device):
  1. NVML read cost (wall and CPU ms per call) and the energy counter's update period, by polling
     the counter under load.
  2. A fixed bf16 matmul load (~60 s) inside an EnergyMeter phase with the sampler at 10 Hz:
     counter energy, integrated instant-power energy, integrated 1 s-average-power energy, their
     ratios to the counter, the sampler thread's own CPU time, and (if the `zeus` package is
     importable) ZeusMonitor's window energy over the same load.
  3. First, on a cool GPU: the step-time overhead of the 10 Hz sampler on two small transformer
     training loops, a launch-bound one (~5 M params, the worst case for a CPU-side sampler) and
     a GPU-bound one (~100 M params), each in 1 s blocks alternating sampler on/off in one run
     (ABBA order; adjacent on/off pairs cancel drift).
It writes DIR/energy_validation.json (figures, card, driver, date, versions, command), the
meter's phases.jsonl and telemetry under DIR/run-<time>/, and prints a markdown table.
Needs only torch, nvidia-ml-py, psutil and wattkd (zeus optional).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

try:
    import wattkd  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wattkd.config import TelemetryConfig
from wattkd.energy import versions
from wattkd.energy.counters import PowerIntegrator
from wattkd.energy.ledger import EnergyMeter
from wattkd.energy.metrics import read_telemetry
from wattkd.energy.monitor import Sampler, host_name
from wattkd.energy.sources import CpuSource, NvmlSource, RaplSource

log = logging.getLogger("energy_validation")


# --------------------------------------------------------------------------- measurements
def read_costs(nvml: NvmlSource, g: Any, n: int = 50) -> dict[str, Any]:
    """Mean wall and CPU ms of each NVML read the sampler makes."""
    lib = nvml._lib
    calls = {"total_energy": lambda: lib.nvmlDeviceGetTotalEnergyConsumption(g.handle),
             "power_usage": lambda: lib.nvmlDeviceGetPowerUsage(g.handle),
             "field_instant_power": lambda: lib.nvmlDeviceGetFieldValues(
                 g.handle, [lib.NVML_FI_DEV_POWER_INSTANT]),
             "field_energy": lambda: lib.nvmlDeviceGetFieldValues(
                 g.handle, [lib.NVML_FI_DEV_ENERGY]),
             "sampler_fast_read": lambda: nvml.read_fast(g, energy=False),
             "sampler_slow_read": lambda: (nvml.read_fast(g), nvml.read_slow(g))}
    out = {}
    for name, fn in calls.items():
        try:
            fn()
        except lib.NVMLError as exc:
            out[name] = {"error": str(exc)}
            continue
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            fn()
        out[name] = {"wall_ms": round((time.perf_counter() - w0) / n * 1e3, 4),
                     "cpu_ms": round((time.process_time() - c0) / n * 1e3, 4), "calls": n}
    # Does the energy field value track the counter API? (could make 10 Hz energy cheap)
    try:
        diffs = []
        for _ in range(10):
            fv = lib.nvmlDeviceGetFieldValues(g.handle, [lib.NVML_FI_DEV_ENERGY])[0]
            c = lib.nvmlDeviceGetTotalEnergyConsumption(g.handle)
            if fv.nvmlReturn == 0:
                diffs.append(c - int(fv.value.ullVal))
            time.sleep(0.03)
        out["field_energy_minus_counter_mj"] = (
            {"min": min(diffs), "max": max(diffs), "n": len(diffs)} if diffs
            else {"error": "field not supported"})
    except (lib.NVMLError, AttributeError) as exc:
        out["field_energy_minus_counter_mj"] = {"error": str(exc)}
    return out


def counter_period(nvml: NvmlSource, g: Any, seconds: float, load: Any) -> dict[str, Any]:
    """Poll the energy counter under load; the gaps between value changes are its period."""
    changes: list[tuple[float, int]] = []
    stop = threading.Event()

    def poll() -> None:
        last = None
        while not stop.is_set():
            v = nvml.read_energy_mj(g)
            t = time.monotonic()
            if v is not None and v != last:
                changes.append((t, v))
                last = v
            time.sleep(0.002)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    load(seconds)
    stop.set()
    th.join()
    used = changes[1:]  # the first change ends a partial period
    gaps = [b[0] - a[0] for a, b in pairwise(used)]
    steps = [(b[1] - a[1]) / 1000 for a, b in pairwise(used)]
    if len(gaps) < 3:
        return {"updates": len(gaps), "error": "fewer than 3 counter updates observed"}
    q = statistics.quantiles(gaps, n=10)
    return {"updates": len(gaps), "median_s": round(statistics.median(gaps), 4),
            "p10_s": round(q[0], 4), "p90_s": round(q[-1], 4),
            "median_step_j": round(statistics.median(steps), 3),
            "poll_interval_s": "~0.002 + read time"}


def matmul_load(device: torch.device, n: int) -> Any:
    """A fixed load: back-to-back n x n matmuls, synchronised every 20 (bf16 on GPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    done = {"matmuls": 0, "seconds": 0.0}

    def run(seconds: float) -> None:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(20):
                torch.mm(a, b)
            _sync(device)
            done["matmuls"] += 20
        done["seconds"] += time.perf_counter() - t0

    run.done = done  # type: ignore[attr-defined]
    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def integrate_field(tel: list[dict], uuid: str, key: str, t0: float, t1: float) -> float | None:
    """Trapezoid integral (J) of telemetry field `key` for GPU `uuid` in [t0, t1] (wall)."""
    integ = PowerIntegrator()
    for s in tel:
        if t0 <= s["t_wall"] <= t1 and uuid in s.get("gpu", {}):
            integ.add(s["t_mono"], s["gpu"][uuid].get(key))
    return integ.joules if integ.samples >= 2 else None


def zeus_window(gpu_index: int) -> tuple[Any, dict[str, Any]]:
    """(begin, end) callables around ZeusMonitor, or None with the reason it is unusable."""
    try:
        from zeus.monitor import ZeusMonitor
    except Exception as exc:  # noqa: BLE001 - optional: any import failure means 'no zeus'
        return None, {"available": False, "reason": f"zeus not importable: {exc}"}
    try:
        mon = ZeusMonitor(gpu_indices=[gpu_index])
    except Exception as exc:  # noqa: BLE001 - optional comparison, never fatal
        return None, {"available": False, "reason": f"ZeusMonitor failed: {exc}"}
    try:
        from importlib.metadata import version

        ver = version("zeus")
    except Exception:  # noqa: BLE001
        ver = None
    return mon, {"available": True, "version": ver}


# ------------------------------------------------------------------------ overhead test
class SmallLM(torch.nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True,
                                                 norm_first=True)
        self.body = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        return self.head(self.body(self.emb(x), mask=mask, is_causal=True))


# (vocab, d_model, layers, heads, batch, seq). launch_bound: ~10 ms steps dominated by kernel
# launches, the worst case for a CPU-side sampler; gpu_bound: ~100 M parameters, the regime of
# real KD training. `tiny` is the --dry-run stand-in for both.
MODELS = {"launch_bound": (4096, 256, 4, 4, 16, 128), "gpu_bound": (8192, 1024, 8, 16, 16, 512),
          "tiny": (512, 32, 2, 2, 4, 32)}


def step_overhead(device: torch.device, block_s: float, blocks: int, sampler_factory: Any,
                  size: str) -> dict[str, Any]:
    """Step time of a small LM with the sampler on vs off, alternating blocks ABBA."""
    torch.manual_seed(0)
    small = size == "tiny"
    vocab, d, layers, heads, batch, seq = MODELS[size]
    model = SmallLM(vocab, d, layers, heads).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, vocab, (batch, seq + 1), device=device)
    amp = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab),
                                                     x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    warm = 2 if small else 10
    for _ in range(warm):
        step()
    _sync(device)
    t_warm = time.perf_counter()
    while not small and time.perf_counter() - t_warm < 3.0:  # settle clocks after the load
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(warm):
        step()
    _sync(device)
    per_step = (time.perf_counter() - t0) / warm
    k = max(2 if small else 10, int(block_s / per_step))
    order = [("on", "off", "off", "on")[i % 4] for i in range(blocks)]
    times: dict[str, list[float]] = {"on": [], "off": []}
    sampler_cpu = 0.0
    for mode in order:
        s = sampler_factory() if mode == "on" else None
        if s is not None:
            s.start()
        _sync(device)
        t = time.perf_counter()
        for _ in range(k):
            step()
        _sync(device)
        times[mode].append((time.perf_counter() - t) / k)
        if s is not None:
            s.stop()
            sampler_cpu += s.cpu_s
    on, off = statistics.mean(times["on"]), statistics.mean(times["off"])
    # ABBA: on[i] and off[i] are adjacent blocks, so their ratio cancels slow drift
    pairs = [(times["on"][i] / times["off"][i] - 1) for i in range(min(len(times["on"]),
                                                                       len(times["off"])))]
    ci = (1.96 * statistics.stdev(pairs) / math.sqrt(len(pairs))) if len(pairs) > 1 else None
    med = statistics.median(pairs)
    return {"model": {"vocab": vocab, "d_model": d, "layers": layers, "batch": batch,
                      "seq": seq, "params": sum(p.numel() for p in model.parameters())},
            "steps_per_block": k, "blocks": len(order), "order": "ABBA (on, off, off, on)",
            "step_ms_off": round(off * 1e3, 4), "step_ms_on": round(on * 1e3, 4),
            "overhead_pct": round(statistics.mean(pairs) * 100, 3),
            "overhead_of_means_pct": round((on / off - 1) * 100, 3),
            "overhead_ci95_pct": round(ci * 100, 3) if ci is not None else None,
            "overhead_median_pct": round(med * 100, 3),
            "block_step_ms": {m: [round(v * 1e3, 4) for v in ts] for m, ts in times.items()},
            "sampler_cpu_s_on_blocks": round(sampler_cpu, 4)}


# ---------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU needed: tiny CPU load, short windows; checks the script")
    ap.add_argument("--load-seconds", type=float, default=None, help="matmul window (60)")
    ap.add_argument("--overhead-block-seconds", type=float, default=None,
                    help="(1.0: each sampler-on block then holds one slow tick, as at 1 Hz)")
    ap.add_argument("--overhead-blocks", type=int, default=None, help="(28, per model)")
    ap.add_argument("--idle-seconds", type=float, default=None, help="(5)")
    ap.add_argument("--matrix", type=int, default=None, help="matmul size (8192)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    dry = args.dry_run
    load_s = args.load_seconds or (1.0 if dry else 60.0)
    block_s = args.overhead_block_seconds or (0.15 if dry else 1.0)
    blocks = args.overhead_blocks or (4 if dry else 28)
    idle_s = args.idle_seconds if args.idle_seconds is not None else (0.3 if dry else 5.0)
    matrix = args.matrix or (256 if dry else 8192)
    if load_s <= 0 or block_s <= 0 or blocks < 2 or idle_s < 0 or matrix < 1:
        ap.error("--load-seconds, --overhead-block-seconds > 0, --overhead-blocks >= 2, "
                 "--idle-seconds >= 0, --matrix >= 1")
    if not dry and not torch.cuda.is_available():
        print("energy_validation: no CUDA GPU visible; use --dry-run to check the script "
              "without one", file=sys.stderr)
        return 2
    device = torch.device("cuda:0" if torch.cuda.is_available() and not dry else "cpu")
    if dry:
        torch.set_num_threads(1)  # a busy shared CPU box: avoid OpenMP oversubscription
    args.out.mkdir(parents=True, exist_ok=True)
    run_dir = args.out / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    t_start = time.perf_counter()

    nvml = NvmlSource().open()
    gpu = next((g for g in nvml.gpus if g.cuda_index == 0), None)
    result: dict[str, Any] = {
        "schema": 1, "benchmark": "energy_validation", "dry_run": dry,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "host": host_name(), "platform": platform.platform(),
        "device": str(device), "versions": versions(nvml.driver),
        "cuda": torch.version.cuda, "cuda_visible_devices": os.environ.get(
            "CUDA_VISIBLE_DEVICES"),
        "nvml": {"available": nvml.available, "reason": nvml.reason,
                 "unavailable": dict(nvml.unavailable)},
        "card": gpu.describe() if gpu else None,
        "settings": {"load_s": load_s, "matrix": matrix, "idle_s": idle_s,
                     "overhead_block_s": block_s, "overhead_blocks": blocks,
                     "sampler_interval_s": 0.1, "slow_interval_s": 1.0},
        "run_dir": str(run_dir)}
    try:
        import zeus  # noqa: F401
        has_zeus = True
    except Exception:  # noqa: BLE001 - optional
        has_zeus = False

    # ---- step-time overhead first, on a GPU not yet heated by the long load (less drift)
    rapl = RaplSource().open()
    cpu = CpuSource()
    ov_out = run_dir / "telemetry-overhead.jsonl"

    def factory() -> Sampler:
        return Sampler([nvml, rapl], stats=cpu, interval=0.1, slow_interval=1.0,
                       output=ov_out)

    result["overhead"] = {
        name: step_overhead(device, block_s, blocks, factory, "tiny" if dry else name)
        for name in ("launch_bound", "gpu_bound")}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    load = matmul_load(device, matrix)
    load(min(2.0, load_s / 4))                                        # warm-up / clocks up
    if gpu is not None:
        result["read_cost"] = read_costs(nvml, gpu)
        result["counter_period"] = counter_period(nvml, gpu, 1.0 if dry else 6.0, load)
    else:
        result["read_cost"] = result["counter_period"] = {"error": nvml.reason}

    # ---- the fixed load inside a metered phase, sampler at 10 Hz
    cfg = TelemetryConfig(interval_s=0.1, slow_interval_s=1.0, idle_seconds=idle_s,
                          min_window_s=10.0)
    meter = EnergyMeter(cfg, run_dir)
    zmon, zinfo = zeus_window(0) if (has_zeus and gpu is not None) else (
        None, {"available": False, "reason": "zeus not installed" if not has_zeus
               else "no NVML GPU"})
    load.done.update(matmuls=0, seconds=0.0)  # type: ignore[attr-defined]
    with meter:
        with meter.phase("matmul_load", matrix=matrix) as w:
            if zmon is not None:
                zmon.begin_window("matmul_load")
            load(load_s)
            if zmon is not None:
                zm = zmon.end_window("matmul_load")
                zinfo.update(energy_j=round(float(zm.gpu_energy[0]), 3),
                             time_s=round(float(zm.time), 4))
        sampler = meter._sampler
        sampler_stats = {"samples": sampler.samples, "late_ticks": sampler.late_ticks,
                         "cpu_s": round(sampler.cpu_s, 4)} if sampler else {}
        idle = meter.idle_power_w
    rec = w.record or {}
    done = load.done  # type: ignore[attr-defined]
    flops = 2 * matrix ** 3 * done["matmuls"]
    load_res: dict[str, Any] = {
        "duration_s": rec.get("duration_s"), "matmuls": done["matmuls"],
        "tflops": float(f"{flops / done['seconds'] / 1e12:.4g}") if done["seconds"] else None,
        "idle_power_w": idle, "flags": rec.get("flags"),
        "counter_period_s": rec.get("counter_period_s"),
        "counter_period_source": rec.get("counter_period_source")}
    if gpu is not None and rec:
        pg = rec["per_gpu"].get(gpu.uuid, {})
        e = pg.get("energy_j")
        load_res.update(counter_energy_j=e, uncertainty_j=pg.get("uncertainty_j"),
                        mean_power_w=round(e / rec["duration_s"], 2) if e else None,
                        integrated_instant_power_j=pg.get("integrated_power_j"),
                        power_source=gpu.power_source)
        if e and pg.get("integrated_power_j"):
            load_res["ratio_integrated_instant_to_counter"] = round(
                pg["integrated_power_j"] / e, 5)
        tel = read_telemetry(run_dir)
        avg = integrate_field(tel, gpu.uuid, "power_avg_w", rec["start_wall"], rec["end_wall"])
        load_res["integrated_avg_power_j"] = round(avg, 3) if avg is not None else None
        if e and avg:
            load_res["ratio_integrated_avg_to_counter"] = round(avg / e, 5)
        if zinfo.get("energy_j") and e:
            zinfo["ratio_to_counter"] = round(zinfo["energy_j"] / e, 5)
    if load_res.get("duration_s") and sampler_stats:
        sampler_stats["cpu_pct_of_one_core"] = round(
            100 * sampler_stats["cpu_s"] / (load_res["duration_s"] + idle_s), 3)
        if sampler_stats["samples"]:
            sampler_stats["cpu_ms_per_sample"] = round(
                1e3 * sampler_stats["cpu_s"] / sampler_stats["samples"], 4)
    result["load"] = load_res
    result["sampler"] = sampler_stats
    result["zeus"] = zinfo

    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    nvml.close()

    path = args.out / "energy_validation.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(path)
    print(markdown(result))
    print(f"\nwrote {path}")
    return 0


def markdown(r: dict[str, Any]) -> str:
    """A RESULTS.md-ready table of the headline figures."""
    ld, sm, ov, zs, cp = r["load"], r["sampler"], r["overhead"], r["zeus"], r["counter_period"]
    rc = r.get("read_cost", {})
    card = r["card"]["name"] if r.get("card") else f"no NVML GPU ({r['nvml']['reason']})"

    def f(v: Any, unit: str = "") -> str:
        return "n/a" if v is None else f"{v}{unit}"

    def cost(k: str) -> str:
        c = rc.get(k, {})
        return (f"{c['wall_ms']} ms wall, {c['cpu_ms']} ms CPU" if "wall_ms" in c
                else f(c.get("error")))

    rows = [
        ("Card / driver", f"{card} / {f(r['versions'].get('nvidia_driver'))}"),
        ("Date / host", f"{r['date']} / {r['host']}"),
        ("Counter update period (median, p10-p90)",
         f"{f(cp.get('median_s'), ' s')} ({f(cp.get('p10_s'))}-{f(cp.get('p90_s'))} s)"
         if "median_s" in cp else f(cp.get("error"))),
        ("Energy counter read cost", cost("total_energy")),
        ("Power field read (instant)", cost("field_instant_power")),
        ("Sampler fast read (power, 10 Hz)", cost("sampler_fast_read")),
        ("Sampler slow read (energy + slow fields, 1 Hz)", cost("sampler_slow_read")),
        ("Load window", (f"{f(ld.get('duration_s'), ' s')}, {r['settings']['matrix']}^2 "
                         f"matmul, {f(ld.get('tflops'), ' TFLOP/s')}")),
        ("Counter energy (± uncertainty)",
         f"{f(ld.get('counter_energy_j'), ' J')} ± {f(ld.get('uncertainty_j'), ' J')}"),
        ("Mean power (counter)", f(ld.get("mean_power_w"), " W")),
        ("Integrated instant power / counter",
         (f"{f(ld.get('integrated_instant_power_j'), ' J')} "
          f"(ratio {f(ld.get('ratio_integrated_instant_to_counter'))})")),
        ("Integrated 1 s-average power / counter",
         (f"{f(ld.get('integrated_avg_power_j'), ' J')} "
          f"(ratio {f(ld.get('ratio_integrated_avg_to_counter'))})")),
        ("Idle power (GPU)", f(ld.get("idle_power_w", {}).get("gpu"), " W")),
        ("Sampler CPU time (10 Hz)",
         (f"{f(sm.get('cpu_s'), ' s')} = {f(sm.get('cpu_pct_of_one_core'), '% of a core')}, "
          f"{f(sm.get('cpu_ms_per_sample'), ' ms/sample')}")),
        ("ZeusMonitor window / counter",
         (f"{f(zs.get('energy_j'), ' J')} (ratio {f(zs.get('ratio_to_counter'))}, zeus "
          f"{f(zs.get('version'))})") if zs.get("available") else f(zs.get("reason"))),
    ]
    for name, o in ov.items():
        label = name.replace("_", "-")
        params = f"{o['model']['params'] / 1e6:.1f} M params"
        rows.insert(-1, (f"Step time off / on, {label} model ({params})",
                         (f"{o['step_ms_off']} / {o['step_ms_on']} ms "
                          f"({o['steps_per_block']} steps x {o['blocks']} blocks, ABBA)")))
        rows.insert(-1, (f"Step-time overhead, {label} (95% CI)",
                         (f"{o['overhead_pct']}% ± {f(o['overhead_ci95_pct'])}% "
                          f"(median {o['overhead_median_pct']}%)")))
    lines = ["| Figure | Value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    lines.append(f"\nCommand: `{r['command']}`" + (" (DRY RUN: no GPU figures)" if r["dry_run"]
                                                   else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
