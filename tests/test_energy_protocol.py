"""Energy sources behind one protocol: discovery, registration, and a new source end to end."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from test_energy_fakes import FakeCounterSource, FakeDevice, FakeNvml, make_powercap, two_gpus
from wattkd.config import TelemetryConfig
from wattkd.energy.components import components
from wattkd.energy.ledger import EnergyMeter
from wattkd.energy.metrics import (
    e_run,
    ept_train,
    read_phases,
    read_telemetry,
    telemetry_energy,
)
from wattkd.energy.recovery import recover_window
from wattkd.energy.sources import (
    CpuTimeSource,
    discover,
    register_source,
    source_types,
    unregister_source,
)

CFG = TelemetryConfig(idle_seconds=0, interval_s=0.02, slow_interval_s=0.1)


class AmdSmiLike(FakeCounterSource):
    """What an AMD GPU source takes: this class and its registration, nothing else."""

    LABEL = "amdsmi-counter"
    NAME = "AMD SMI"
    BLIND_TO = "AMD SMI: GPU board only"
    TELEMETRY_KEY = "amdsmi"
    POWER_LABEL = "amdsmi-power-integrated"


@pytest.fixture
def amd() -> object:
    register_source(AmdSmiLike)
    yield AmdSmiLike
    unregister_source(AmdSmiLike)


def test_a_new_source_reaches_ledger_metrics_and_telemetry(tmp_path: Path, amd: object) -> None:
    nv = two_gpus()
    dev = {"AMD-0": FakeDevice()}
    meter = EnergyMeter(CFG, tmp_path / "run", host="node1", nvml_lib=FakeNvml(nv),
                        powercap_root=make_powercap(tmp_path / "pc"),
                        source_options={AmdSmiLike.LABEL: dev})
    with meter:
        assert meter.sources["gpu"] == "nvml-counter+amdsmi-counter"
        with meter.phase("train", tokens=100) as w:
            time.sleep(0.25)                 # slow samples before and after the work
            nv[0].energy_mj += 100_000       # 100 J on an NVIDIA GPU
            dev["AMD-0"].uj += 40_000_000    # 40 J on the new source's device
            time.sleep(0.25)
        total = meter.energy_j()
    rec = w.record
    assert rec["energy_j"]["gpu"] == pytest.approx(140.0, abs=1e-3)
    assert rec["source"]["gpu"] == "nvml-counter+amdsmi-counter"
    assert rec["per_gpu"]["AMD-0"]["energy_j"] == pytest.approx(40.0, abs=1e-6)
    assert rec["per_gpu"]["AMD-0"]["power_samples"] >= 2
    # the new source does not characterise its uncertainty, so the sum has none either
    assert rec["uncertainty_j"]["gpu"] is None and rec["estimated"] is False
    assert total >= 140.0 - 1e-3
    phases = read_phases(tmp_path / "run")
    fig = e_run(phases)
    assert fig.value == pytest.approx(140.0, abs=1e-3)
    assert fig.source == "nvml-counter+amdsmi-counter"
    assert ept_train(phases) == pytest.approx(1.4, abs=1e-5)
    tel = read_telemetry(tmp_path / "run")
    slow = [s for s in tel if s["slow"]]
    assert slow and all("energy_uj" in s["amdsmi"]["AMD-0"] for s in slow)   # its own section
    got = telemetry_energy(tel)
    amd_j = [j for k, j in got["devices"].items() if k.endswith(":AMD-0")]
    assert amd_j == [pytest.approx(40.0)]
    assert got["source"] == "amdsmi-counter+nvml-counter"


def test_recovery_extends_a_new_sources_window_from_its_telemetry(tmp_path: Path,
                                                                 amd: object) -> None:
    """A killed session's window is closed from the new source's telemetry section."""
    dev = {"AMD-0": FakeDevice()}
    meter = EnergyMeter(CFG, tmp_path / "run", host="node1", nvml_lib=FakeNvml([]),
                        powercap_root=tmp_path / "none", source_options={AmdSmiLike.LABEL: dev})
    with meter:
        assert meter.sources["gpu"] == "amdsmi-counter"
        with meter.phase("train") as w:
            time.sleep(0.25)
            dev["AMD-0"].uj += 25_000_000
            time.sleep(0.25)
    begin = {"kind": "begin", "window": "phase", "phase": "train", "session": meter.session,
             "host": "node1", "start_wall": w.record["start_wall"], "interval_s": 0.02,
             "source": w.record["source"], "flags": [], "notes": []}
    rec = recover_window(begin, [], read_telemetry(tmp_path / "run"))
    assert rec["status"] == "recovered" and rec["recovered"]["closed_at"] == "telemetry sample"
    assert rec["energy_j"]["gpu"] == pytest.approx(25.0, abs=1e-6)
    assert rec["source"]["gpu"] == "amdsmi-counter"


def test_registration_checks_label_and_components() -> None:
    class Clash(FakeCounterSource):
        LABEL = "nvml-counter"

    class Odd(FakeCounterSource):
        LABEL = "odd-counter"
        COMPONENTS = ("soc",)

    with pytest.raises(ValueError, match="already registered"):
        register_source(Clash)
    with pytest.raises(ValueError, match="ledger schema"):
        register_source(Odd)
    with pytest.raises(TypeError, match="EnergySource"):
        register_source(dict)  # type: ignore[arg-type]


def test_every_source_says_what_it_is_and_cannot_see() -> None:
    for cls in source_types():
        assert cls.LABEL and cls.NAME and cls.BLIND_TO
        assert set(cls.COMPONENTS) <= set(components())
    assert [c.ESTIMATED for c in source_types()] == sorted(c.ESTIMATED for c in source_types())


def test_discovery_uses_an_estimate_only_where_nothing_measures(tmp_path: Path) -> None:
    cfg = TelemetryConfig(cpu_watts_per_core=10.0)
    with_rapl = discover(cfg, {"nvml_lib": FakeNvml([]),
                               "powercap_root": make_powercap(tmp_path / "pc")})
    assert [s.LABEL for s in with_rapl] == ["nvml-counter", "rapl"]
    assert not with_rapl[0].available and "no NVIDIA GPU" in with_rapl[0].reason
    without = discover(cfg, {"nvml_lib": FakeNvml([]), "powercap_root": tmp_path / "none"})
    est = [s for s in without if isinstance(s, CpuTimeSource)]
    assert len(est) == 1 and est[0].available and est[0].ESTIMATED
    off = discover(TelemetryConfig(), {"nvml_lib": FakeNvml([]),
                                       "powercap_root": tmp_path / "none"})
    hint = next(s for s in off if isinstance(s, CpuTimeSource))
    assert not hint.available and "cpu_watts_per_core" in hint.reason
