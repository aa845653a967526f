"""Energy sources through a simulated NVML library and a fake powercap sysfs tree."""

from __future__ import annotations

import pathlib

import pynvml
import pytest

from test_energy_fakes import FakeGpu, FakeNvml, make_powercap, set_uj, two_gpus
from wattkd.energy.counters import CounterTracker, PowerIntegrator
from wattkd.energy.sources import CpuSource, NvmlSource, RaplSource, parse_visible_devices


# ------------------------------------------------------------------------------ counters
def test_counter_deltas_are_exact_in_joules() -> None:
    tr = CounterTracker(1e-3)
    assert tr.update(1_000_000, 0.0) == 0.0          # first read is the reference
    assert tr.update(1_250_500, 1.0) == pytest.approx(250.5)
    assert tr.update(None, 1.5) == 0.0               # a failed read adds nothing...
    assert tr.update(1_300_500, 2.0) == pytest.approx(50.0)  # ...and loses nothing
    assert tr.total_j == pytest.approx(300.5)


def test_counter_reset_never_negative_and_counts_only_plausible_values() -> None:
    tr = CounterTracker(1e-3, max_power_w=1400)
    tr.update(5_000_000, 0.0)
    # driver reload: counter restarts; 60 J after 0.1 s would be 600 W: plausible, counted
    assert tr.update(60_000, 0.1) == pytest.approx(60.0)
    assert tr.resets == 1
    assert tr.update(100_000, 0.2) == pytest.approx(40.0)
    assert tr.update(1_000_000, 0.3) == pytest.approx(900.0)
    # a decrease to 500 J: that much cannot accumulate in 0.1 s at <= 1400 W, so it is not a
    # believable restart; the interval counts 0 rather than 500 J
    assert tr.update(500_000, 0.4) == 0.0
    assert tr.resets == 2
    assert tr.update(505_000, 0.5) == pytest.approx(5.0)
    assert tr.total_j == pytest.approx(60 + 40 + 900 + 5)


def test_rapl_wraparound_uses_max_energy_range() -> None:
    tr = CounterTracker(1e-6, wrap=262_143_328_850)
    tr.update(262_143_000_000, 0.0)
    assert tr.update(1_000_000, 1.0) == pytest.approx((328_850 + 1_000_000) * 1e-6)
    assert tr.wraps == 1 and tr.resets == 0


def test_power_integrator_trapezoid() -> None:
    p = PowerIntegrator()
    p.add(0.0, 100.0)
    p.add(1.0, 300.0)
    p.add(1.5, None)     # missing sample: skipped, not zero
    p.add(2.0, 300.0)
    assert p.joules == pytest.approx(200.0 + 300.0)
    assert p.samples == 3


# ---------------------------------------------------------------------------------- NVML
def test_nvml_reads_all_fields_by_uuid() -> None:
    gpus = two_gpus()
    src = NvmlSource(FakeNvml(gpus), visible=None).open()
    assert src.available and src.reason is None and src.driver == "550.54.15"
    assert [g.uuid for g in src.gpus] == [g.uuid for g in gpus]
    g = src.gpus[1]
    assert (g.index, g.cuda_index, g.energy, g.power_source) == (1, 1, True, "field-instant")
    assert g.power_limit_w == 700.0
    fast = src.read_fast(g)
    assert fast == {"energy_mj": 1_000_000, "power_w": 300.0, "power_avg_w": 290.0}
    slow = src.read_slow(g)
    assert slow == {"util_pct": 87, "mem_used_b": 10 * 2**30, "mem_total_b": 80 * 2**30,
                    "temp_c": 55, "sm_clock_mhz": 1980}
    assert src.unavailable == {}
    src.close()


def test_unsupported_fields_are_null_with_reason() -> None:
    old = FakeGpu(uuid="GPU-cccc", unsupported={"energy", "field_instant", "field_avg",
                                                 "temp", "clock"})
    src = NvmlSource(FakeNvml([old]), visible=None).open()
    g = src.gpus[0]
    assert not g.energy and g.power_source == "power-usage"
    fast = src.read_fast(g)
    assert fast["energy_mj"] is None and fast["power_avg_w"] is None
    assert fast["power_w"] == 290.0  # nvmlDeviceGetPowerUsage, labelled as such
    slow = src.read_slow(g)
    assert slow["temp_c"] is None and slow["sm_clock_mhz"] is None and slow["util_pct"] == 87
    un = src.unavailable
    assert "Volta" in un["gpu/GPU-cccc/energy_mj"]
    assert "nvmlDeviceGetPowerUsage" in un["gpu/GPU-cccc/power_w"]
    assert "Not Supported" in un["gpu/GPU-cccc/temp_c"]
    assert g.describe()["energy_source"] == "unavailable"


def test_mig_instance_meters_parent_and_util_is_null() -> None:
    gpus = two_gpus()
    gpus[0].mig = True
    mig_uuid = "MIG-" + gpus[0].uuid[4:12] + "-0000-0000-0000-000000000000"
    src = NvmlSource(FakeNvml(gpus), visible=mig_uuid).open()
    assert [g.uuid for g in src.gpus] == [gpus[0].uuid]
    g = src.gpus[0]
    assert g.mig and g.energy
    assert src.read_slow(g)["util_pct"] is None
    assert "MIG" in src.unavailable[f"gpu/{g.uuid}/util_pct"]
    assert "whole GPU" in src.unavailable[f"gpu/{g.uuid}/mig"]


def test_cuda_visible_devices_order_uuid_prefix_and_missing_gpu() -> None:
    gpus = two_gpus()
    lib = FakeNvml(gpus)
    src = NvmlSource(lib, visible="1,0").open()
    assert [(g.index, g.cuda_index) for g in src.gpus] == [(1, 0), (0, 1)]
    src = NvmlSource(lib, visible="GPU-bbbb").open()
    assert [g.uuid for g in src.gpus] == [gpus[1].uuid]
    # CUDA semantics: an invalid entry hides itself and everything after it
    src = NvmlSource(lib, visible="0,5,1").open()
    assert [g.index for g in src.gpus] == [0]
    assert "'5'" in src.unavailable["gpu/visible"] and "2 GPU(s)" in src.unavailable["gpu/visible"]
    src = NvmlSource(lib, visible="GPU-").open()  # ambiguous prefix
    assert not src.available and "several" in src.unavailable["gpu/visible"]
    src = NvmlSource(lib, visible="").open()
    assert not src.available and "hides every GPU" in src.reason
    assert parse_visible_devices(None) is None and parse_visible_devices("-1") == []


def test_missing_nvml_library_is_reported_not_raised() -> None:
    src = NvmlSource(FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)).open()
    assert not src.available and "Library Not Found" in src.reason
    src = NvmlSource(FakeNvml([]), visible=None).open()
    assert not src.available and "no NVIDIA GPU" in src.reason


def test_real_pynvml_on_this_machine_reports_unavailable() -> None:
    src = NvmlSource().open()   # the real library; this CPU machine has no driver
    if src.available:
        pytest.skip("a real NVIDIA GPU is present")
    assert src.reason and src.gpus == []
    src.close()


def test_read_failure_mid_run_gives_null_and_one_reason() -> None:
    gpus = two_gpus()
    src = NvmlSource(FakeNvml(gpus), visible=None).open()
    gpus[0].unsupported.add("energy")      # e.g. the GPU fell off the bus
    assert src.read_energy_mj(src.gpus[0]) is None
    assert "read failed" in src.unavailable[f"gpu/{gpus[0].uuid}/energy_mj"]


# ---------------------------------------------------------------------------------- RAPL
def test_rapl_reads_package_and_dram_only(tmp_path: pathlib.Path) -> None:
    root = make_powercap(tmp_path / "powercap", packages=2)
    src = RaplSource(root).open()
    assert src.available and src.reason is None
    assert [(z.name, z.kind) for z in src.zones] == [
        ("package-0", "package"), ("dram-0", "dram"), ("package-1", "package"),
        ("dram-1", "dram")]
    skipped = " ".join(src.skipped.values())
    assert "core" in skipped and "uncore" in skipped and "psys" in skipped
    set_uj(root, "intel-rapl:1", 7_000_000)
    assert src.read()["package-1"] == 7_000_000


def test_rapl_permission_error_says_how_to_fix(tmp_path: pathlib.Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_powercap(tmp_path / "powercap")
    target = root / "intel-rapl:0" / "energy_uj"
    real = pathlib.Path.read_text

    def guarded(self: pathlib.Path, *a, **k) -> str:
        if self == target:   # what a non-root user sees on Linux >= 5.10
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "read_text", guarded)
    src = RaplSource(root).open()
    assert not src.available
    assert "permission denied" in src.reason and "chmod a+r" in src.reason
    assert "root" in src.reason


def test_rapl_absent(tmp_path: pathlib.Path) -> None:
    src = RaplSource(tmp_path / "nope").open()
    assert not src.available and "absent" in src.reason
    (tmp_path / "empty").mkdir()
    assert "no RAPL package zone" in RaplSource(tmp_path / "empty").open().reason


# ----------------------------------------------------------------------------------- CPU
def test_cpu_source_is_non_blocking_and_counts_cpu_time() -> None:
    import time

    cpu = CpuSource()
    t = time.perf_counter()
    slow = cpu.read_slow()
    assert time.perf_counter() - t < 0.05
    assert 0 <= slow["util_pct"] <= 100 and 0 < slow["ram_used_b"] <= slow["ram_total_b"]
    before = cpu.process_cpu_seconds()
    x = 0
    for i in range(2_000_000):
        x += i
    assert cpu.process_cpu_seconds() > before


# ------------------------------------------------------------- plausibility (issue #16)
def _feed(reads: list[int | None], dt: float = 1.0, **kw) -> CounterTracker:
    tr = CounterTracker(1e-3, max_power_w=1400, **kw)
    for i, raw in enumerate(reads):
        tr.update(raw, i * dt)
    return tr


# 600 W for 14 s from a counter at 1000 J: 8400 J spent
GOOD = [1_000_000 + 600_000 * i for i in range(15)]


@pytest.mark.parametrize("bad", [0, -5, 3])
def test_one_bad_counter_read_is_a_glitch_not_a_reset(bad: int) -> None:
    """A single 0 / negative / near-0 read between good ones: excluded (before: a reset, then
    the whole counter counted again: 8400 + 3400 J)."""
    reads = list(GOOD)
    reads[5] = bad
    tr = _feed(reads)
    assert tr.total_j == pytest.approx(8400.0)
    assert tr.glitches == 1 and tr.resets == 0


def test_implausible_spike_and_bad_first_read_are_never_counted() -> None:
    reads = list(GOOD)
    reads[7] = 90_000_000                        # +85 kJ in 1 s: above 1400 W
    tr = _feed(reads)
    assert tr.total_j == pytest.approx(8400.0) and tr.glitches == 1
    big = [10**9 + r for r in GOOD]               # a counter at 1 MJ (since driver load)
    tr = _feed([0, *big[1:]])                    # the first read was the bad one
    assert tr.total_j == pytest.approx(8400.0 - 600.0) and tr.glitches == 1


def test_real_reset_restarts_near_zero_and_keeps_rising() -> None:
    reads = GOOD[:6] + [400_000 + 600_000 * i for i in range(9)]   # driver reload after 5 s
    tr = _feed(reads)
    assert tr.resets == 1 and tr.glitches == 0
    # 5 s before the reload + the 400 J the new counter holds + 8 s after it
    assert tr.total_j == pytest.approx(3000.0 + 400.0 + 4800.0)


def test_telemetry_with_one_bad_read_gives_the_true_energy(tmp_path: pathlib.Path) -> None:
    """The issue's case through the telemetry reader (the live meter uses the same tracker)."""
    import json

    from wattkd.energy.metrics import read_telemetry, telemetry_energy

    uuid = "GPU-aaaaaaaa-1111-2222-3333-444444444444"
    lines = [{"schema": 1, "type": "header", "host": "h", "session": "s", "t_wall": 0.0,
              "t_mono": 0.0, "gpus": [{"uuid": uuid, "power_limit_w": 700}], "rapl": []}]
    for i, raw in enumerate(GOOD):
        lines.append({"schema": 1, "type": "sample", "host": "h", "session": "s",
                      "t_wall": 100.0 + i, "t_mono": float(i), "slow": True,
                      "gpu": {uuid: {"power_w": 600.0, "energy_mj": 0 if i == 9 else raw}},
                      "rapl": {}})
    path = tmp_path / "h.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    got = telemetry_energy(read_telemetry(path))
    assert got["energy_j"] == pytest.approx(8400.0) and got["glitches"] == 1
