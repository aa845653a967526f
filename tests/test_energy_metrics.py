"""E_run, E_avg, EPT and average power against hand-computed examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wattkd.energy.metrics import (
    EnergyFigure,
    average_power,
    e_avg,
    e_metered,
    e_run,
    ept,
    ept_train,
    read_phases,
    read_telemetry,
    telemetry_energy,
)


def _rec(phase: str, gpu: float | None, cpu: float | None = None, *, kind: str = "phase",
         host: str = "n1", tokens: int = 0, depth: int = 0, unc: float | None = 1.0,
         cpu_src: str = "rapl") -> dict:
    return {"schema": 1, "kind": kind, "phase": phase, "depth": depth, "host": host,
            "session": host + "s", "tokens": tokens, "duration_s": 10.0,
            "energy_j": {"gpu": gpu, "cpu": cpu, "dram": None},
            "source": {"gpu": "nvml-counter" if gpu is not None else "unavailable",
                       "cpu": cpu_src if cpu is not None else "unavailable",
                       "dram": "unavailable"},
            "estimated": cpu_src.startswith("estimated") and cpu is not None,
            "uncertainty_j": {"gpu": unc, "cpu": None, "dram": None}, "flags": []}


def _write(path: Path, records: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


# Two hosts; host n1: GPU counters 1_000_000 -> 1_250_500 mJ and 2_000_000 -> 2_100_250 mJ in
# "train" = 350.750 J; host n2: 120.125 J. Train tokens 1000 + 1000.
PHASES = [
    _rec("teacher_cache", 50.0, tokens=500),
    _rec("train", 350.750, 20.0, tokens=1000, unc=71.5),
    _rec("step", 10.0, depth=1),
    _rec("train", 120.125, 5.0, host="n2", tokens=1000, unc=30.0),
    _rec("run", 520.875, 25.0, kind="run"),
    _rec("run", 120.125, 5.0, kind="run", host="n2"),
]


def test_e_run_and_ept_hand_computed(tmp_path: Path) -> None:
    phases = read_phases(_write(tmp_path / "phases.jsonl", PHASES))
    run = e_metered(phases)
    assert run.value == pytest.approx(641.000, abs=1e-3)
    assert (run.source, run.estimated, run.records) == ("nvml-counter", False, 2)
    train = e_run(phases, "train")
    assert train.value == pytest.approx(470.875, abs=1e-3)
    assert train.uncertainty == pytest.approx(101.5) and train.tokens == 2000
    assert ept(train.value, train.tokens) == pytest.approx(0.2354375, abs=1e-9)
    assert ept_train(phases) == pytest.approx(0.2354375, abs=1e-9)
    assert e_run(phases, "train", component="cpu").value == pytest.approx(25.0)
    assert e_run(phases, "train", component="cpu").uncertainty is None


def test_e_run_without_run_record_sums_top_level_phases_only() -> None:
    fig = e_metered([r for r in PHASES if r["kind"] == "phase"])
    assert fig.value == pytest.approx(50 + 350.75 + 120.125, abs=1e-3)   # "step" is nested
    assert any(f.startswith("no-run-record") for f in fig.flags)


def test_partial_or_unknown_inputs_are_refused_not_dropped(tmp_path: Path) -> None:
    fig = e_run(PHASES + [_rec("train", None, host="n3")], "train")
    assert fig.value is None and fig.source == "unavailable"
    assert any("partial: 1 of 3" in f for f in fig.flags)
    with pytest.raises(ValueError, match="no phase records named 'eval'.*train"):
        e_run(PHASES, "eval")
    with pytest.raises(ValueError, match="component"):
        e_run(PHASES, component="total")
    mixed = e_run([_rec("x", 1.0, 2.0), _rec("x", 1.0, 3.0, cpu_src="estimated-cpu-time")],
                  "x", "cpu")
    assert mixed.estimated and mixed.source == "mixed:estimated-cpu-time+rapl"
    bad = dict(PHASES[0], schema=7)
    with pytest.raises(ValueError, match="schema 7 is not supported"):
        read_phases(_write(tmp_path / "p.jsonl", [bad]))
    with pytest.raises(FileNotFoundError, match="phases.jsonl"):
        read_phases(tmp_path / "nowhere")


def test_truncated_last_phase_line_is_tolerated_but_middle_corruption_is_not(
        tmp_path: Path) -> None:
    p = _write(tmp_path / "phases.jsonl", PHASES[:2], tail='{"schema": 1, "kind": "pha')
    assert len(read_phases(p)) == 2
    p.write_text(json.dumps(PHASES[0]) + "\n{broken\n" + json.dumps(PHASES[1]) + "\n")
    with pytest.raises(ValueError, match=r"phases.jsonl:2"):
        read_phases(p)


def test_e_avg_ept() -> None:
    assert e_avg([10.0, 12.0, 14.0]) == (12.0, 2.0, 3)
    assert e_avg([EnergyFigure(5.0, "nvml-counter", False, 1.0)]) == (5.0, None, 1)
    with pytest.raises(ValueError, match="repeat 1"):
        e_avg([1.0, None])
    with pytest.raises(ValueError, match="at least one"):
        e_avg([])
    assert ept(None, 10) is None
    with pytest.raises(ValueError, match="positive token count"):
        ept(1.0, 0)


# ----------------------------------------------------------------------------- telemetry
def _session(host: str, sid: str, uuid: str, t0: float, counters: list[int],
             powers: list[float], rapl: list[int] | None = None) -> list[dict]:
    out = [{"schema": 1, "type": "header", "host": host, "session": sid,
            "gpus": [{"uuid": uuid, "power_limit_w": 700.0}],
            "rapl": [{"zone": "package-0", "kind": "package", "max_range_uj": 1_000_000}]}]
    for i, (c, p) in enumerate(zip(counters, powers)):
        s = {"schema": 1, "type": "sample", "host": host, "session": sid,
             "t_wall": t0 + i, "t_mono": 100.0 + i, "slow": False,
             "gpu": {uuid: {"energy_mj": c, "power_w": p, "power_avg_w": None}}, "rapl": {}}
        if rapl:
            s["rapl"] = {"package-0": rapl[i]}
        out.append(s)
    return out


def test_read_telemetry_merges_hosts_without_double_counting(tmp_path: Path) -> None:
    tdir = tmp_path / "run" / "telemetry"
    tdir.mkdir(parents=True)
    # host a: GPU A draws 100 J/s for 4 s (one counter reset: 400_000 -> 50_000 within 1 s
    # at <= 1400 W is believable, so the post-reset 50 J counts); RAPL wraps at 1 J.
    a = _session("a", "s1", "GPU-A", 1000.0, [0, 100_000, 200_000, 300_000, 400_000, 50_000],
                 [100.0] * 6, rapl=[900_000, 100_000, 300_000, 500_000, 700_000, 900_000])
    # host b: GPU B, 200 J over 5 s
    b = _session("b", "s2", "GPU-B", 1000.0, [0, 40_000, 80_000, 120_000, 160_000, 200_000],
                 [40.0] * 6)
    # a second sampler on host a, overlapping in time, also reporting GPU A: must be ignored
    dup = _session("a", "s3", "GPU-A", 1002.0, [200_000, 300_000], [100.0] * 2)
    _write(tdir / "a.jsonl", a + dup, tail='{"schema":1,"type":"sample","t_w')
    _write(tdir / "b.jsonl", b)
    tel = read_telemetry(tmp_path / "run")
    assert len(tel.headers) == 3 and len(tel) == 14 and tel.dropped
    assert [s["t_wall"] for s in tel] == sorted(s["t_wall"] for s in tel)
    e = telemetry_energy(tel)
    assert e["devices"] == {"s1:GPU-A": pytest.approx(450.0), "s2:GPU-B": pytest.approx(200.0)}
    assert e["energy_j"] == pytest.approx(650.0) and e["source"] == "nvml-counter"
    p = average_power(tel)
    assert p.value == pytest.approx(650.0 / 5.0) and p.duration_s == 5.0
    window = average_power(tel, start_wall=1001.0, end_wall=1003.0)
    assert window.value == pytest.approx((200.0 + 80.0) / 2.0)
    # RAPL: 900_000 -> 100_000 wraps at 1_000_000 uJ: 0.2 J, then 4 x 0.2 J
    cpu = telemetry_energy(tel, component="cpu")
    assert cpu["energy_j"] == pytest.approx(1.0) and cpu["source"] == "rapl"


def test_power_only_gpu_is_integrated_and_labelled(tmp_path: Path) -> None:
    s = _session("a", "s1", "GPU-P", 0.0, [None] * 3, [100.0, 200.0, 100.0])
    e = telemetry_energy(s[1:])
    assert e["energy_j"] == pytest.approx(300.0) and e["source"] == "nvml-power-integrated"
    empty = average_power(s[1:2])
    assert empty.value is None and empty.source == "unavailable"
