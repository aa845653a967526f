"""A node power meter (energy/sources/node_power.py) and a throwaway source with a component
of its own: each flows through the ledger, energy budgets, recovery, metrics, EPT, the cache
energy summary and the report from its one file, and a node figure is never added to the GPU
or CPU figures it contains (issue 29 item 1)."""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from report_synth import make_run
from test_energy_fakes import FakeCounterSource, FakeDevice, FakeNvml, two_gpus
from test_eval_common import build_model
from wattkd.cli import app
from wattkd.config import EptConfig, TelemetryConfig
from wattkd.energy.components import Component, additive, components, total_j
from wattkd.energy.ledger import EnergyMeter
from wattkd.energy.metrics import e_run, read_phases, read_telemetry, telemetry_energy
from wattkd.energy.recovery import recover_window
from wattkd.energy.sources import discover, register_source, unregister_source
from wattkd.energy.sources.node_power import NodePowerSource
from wattkd.errors import ConfigError
from wattkd.eval.ept import ept_from_record, run_ept
from wattkd.eval.ept_window import point_figures, window_from_record
from wattkd.report import build_report
from wattkd.report.analysis import analyze
from wattkd.report.collect import collect
from wattkd.report.plots import _logged_components
from wattkd.teacher_cache.build_energy import summarize_energy

FAST = {"idle_seconds": 0, "interval_s": 0.02, "slow_interval_s": 0.05}


def node_cfg(**opts: object) -> TelemetryConfig:
    return TelemetryConfig(**FAST, sources={"node-power": opts})


def meter_window(run: Path, cfg: TelemetryConfig, bump: object, *, gpus: list | None = None,
                 phase: str = "train", tokens: int = 1000, **kw: object) -> dict:
    """One `phase` window in which `bump()` adds energy; returns its record."""
    meter = EnergyMeter(cfg, run, host="node1", nvml_lib=FakeNvml(gpus or []),
                        powercap_root=run.parent / "no-powercap", **kw)
    with meter:
        with meter.phase(phase, tokens=tokens) as w:
            time.sleep(0.12)
            bump()
            time.sleep(0.12)
        meter.total_seen = meter.energy_j()  # type: ignore[attr-defined]
    w.record["_total"] = meter.total_seen  # type: ignore[attr-defined, index]
    return w.record  # type: ignore[return-value]


def node_source(cfg: TelemetryConfig) -> NodePowerSource:
    return next(s for s in discover(cfg) if isinstance(s, NodePowerSource))


# ------------------------------------------------------------------------ the node meter
def test_node_meter_from_a_file_is_metered_and_never_added_to_the_gpu(tmp_path: Path) -> None:
    f = tmp_path / "energy_j"
    f.write_text("5000.0\n")
    gpus = two_gpus()

    def bump() -> None:
        gpus[0].energy_mj += 100_000            # 100 J on a GPU, inside the node
        f.write_text("5250.5\n")                # the node meter saw 250.5 J in all

    rec = meter_window(tmp_path / "run", node_cfg(file=str(f)), bump, gpus=gpus)
    assert rec["source"]["node"] == "node-power"
    assert rec["energy_j"]["node"] == pytest.approx(250.5)
    assert rec["energy_j"]["gpu"] == pytest.approx(100.0)
    # the budget total counts the node only: the GPU is inside it (not 350.5)
    assert rec["_total"] == pytest.approx(250.5, abs=1e-6)
    assert total_j(rec["energy_j"]) == pytest.approx(250.5)
    phases = read_phases(tmp_path / "run")
    assert e_run(phases, component="node").value == pytest.approx(250.5)
    assert e_run(phases).value == pytest.approx(100.0)           # the GPU headline unchanged
    tel = read_telemetry(tmp_path / "run")
    assert telemetry_energy(tel, component="node")["energy_j"] == pytest.approx(250.5)
    # EPT: a node row beside the GPU's, each its own figure
    rows = ept_from_record(rec, input_tokens=600, output_tokens=400)
    assert rows["node"]["ept_total_j"] == pytest.approx(250.5 / 1000)
    assert rows["gpu"]["ept_total_j"] == pytest.approx(100.0 / 1000)
    win = window_from_record("request", rec, duration_s=1.0, batches=1, input_tokens=600,
                             output_tokens=400)
    figs = point_figures([win], [], batch_size=4, new_tokens=100)
    assert figs["energy"]["node"]["j_per_request"]["mean"] == pytest.approx(250.5 / 4)
    assert "dram" not in figs["energy"]                 # not read: not listed


def test_node_meter_from_a_command_run_without_a_shell(tmp_path: Path) -> None:
    f = tmp_path / "reading"
    f.write_text("7\n")
    script = tmp_path / "node-energy"
    script.write_text(f"#!/bin/sh\ncat {f}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    rec = meter_window(tmp_path / "run", node_cfg(command=[str(script)], scale_j=100.0),
                       lambda: f.write_text("9\n"))
    assert rec["energy_j"]["node"] == pytest.approx(200.0)      # 2 units x 100 J
    assert rec["_total"] == pytest.approx(200.0, abs=1e-6)


def test_node_meter_settings_are_checked(tmp_path: Path) -> None:
    f = tmp_path / "e"
    f.write_text("1\n")
    with pytest.raises(ConfigError, match="exactly one of"):
        discover(node_cfg(file=str(f), command=["/bin/cat", str(f)]))
    with pytest.raises(ConfigError, match="not found or not executable"):
        discover(node_cfg(command=["no-such-node-meter-xyz"]))
    with pytest.raises(ConfigError, match="shell"):
        discover(node_cfg(command=f"/bin/cat {f} | awk '{{print $1}}'"))
    with pytest.raises(ConfigError, match="unknown_key"):
        discover(node_cfg(file=str(f), unknown_key=1))
    with pytest.raises(ConfigError, match="no energy source has this label"):
        discover(TelemetryConfig(sources={"node-powr": {"file": str(f)}}))
    # not configured: not opened at all (no node key in any record)
    assert not any(isinstance(s, NodePowerSource) for s in discover(TelemetryConfig()))


def test_bad_node_counter_reads_give_no_figure_never_an_invented_one(tmp_path: Path) -> None:
    f = tmp_path / "e"
    f.write_text("not a number\n")
    src = node_source(node_cfg(file=str(f)))
    assert not src.available and "could not convert" in (src.reason or "")
    f.write_text("-5\n")
    src = node_source(node_cfg(file=str(f)))
    assert not src.available and ">= 0" in (src.reason or "")
    # a configured meter that cannot be read is named in every record's notes
    meter = EnergyMeter(node_cfg(file=str(tmp_path / "missing")), tmp_path / "run",
                        host="node1", nvml_lib=FakeNvml([]), powercap_root=tmp_path / "none")
    with meter, meter.phase("train") as w:
        pass
    assert "node" not in w.record["energy_j"]
    assert any(n.startswith("node unavailable") for n in w.record["notes"])


def test_a_node_run_in_the_report_and_the_cache_summary(tmp_path: Path) -> None:
    """The report tabulates the node beside GPU and CPU; what a meter summed is named
    without the contained GPU; the cache summary keeps the node total."""
    root = tmp_path / "exp"
    for rel, node_j in (("teacher", 900.0), ("response/rep0", 300.0)):
        d = make_run(root, rel, info={"method": rel.split("/")[0], "mode": "response",
                                      "repeat": 0}, metrics=False)
        f = tmp_path / f"{rel.replace('/', '_')}.j"
        f.write_text("100\n")
        gpus = two_gpus()

        def bump(f: Path = f, gpus: list = gpus, node_j: float = node_j) -> None:
            gpus[0].energy_mj += 120_000
            f.write_text(f"{100 + node_j}\n")

        meter_window(d, node_cfg(file=str(f)), bump, gpus=gpus)
    students, teacher = collect([root], root / "teacher")
    a = analyze(students, teacher)
    assert list(a.teacher.e_run) == ["gpu", "cpu", "node"]
    assert a.basis == "gpu"
    assert a.students[0].e_run["node"].value == pytest.approx(300.0)
    assert a.students[0].e_total.value == pytest.approx(120.0)   # the basis alone
    html = build_report([root], teacher=root / "teacher", out=tmp_path / "rep")
    runs = json.loads((html.parent / "tables" / "runs.json").read_text())
    text = json.dumps(runs)
    assert "E_run Node" in text and "node-power" in text
    md = (html.parent / "report.md").read_text()
    assert "it already contains GPU, CPU, DRAM" in md
    assert _logged_components(a) == "Node measured"    # what the budget total summed
    sessions = [{"session": "s", "record": rec} for rec in read_phases(root / "response/rep0")
                if rec.get("kind") == "phase"]
    summary = summarize_energy(tmp_path, sessions, tokens=1000)
    assert summary["components"]["node"] == pytest.approx(300.0)
    assert summary["component"] == "gpu" and summary["energy_j"] == pytest.approx(120.0)


# ----------------------------------------------------------------- a throwaway source
FPGA = Component("fpga", "FPGA", rank=3)


class FpgaSource(FakeCounterSource):
    """A source of a component nothing else knows: this class is all it takes."""

    LABEL = "fpga-counter"
    NAME = "FPGA"
    COMPONENTS = ("fpga",)
    DECLARES = (FPGA,)
    BLIND_TO = "FPGA board rail only"
    TELEMETRY_KEY = "fpga"
    POWER_LABEL = "fpga-power-integrated"


@pytest.fixture
def fpga() -> object:
    register_source(FpgaSource)
    yield FpgaSource
    unregister_source(FpgaSource)


def test_a_throwaway_source_flows_through_everything(tmp_path: Path, fpga: object) -> None:
    assert "fpga" in components() and additive(["gpu", "fpga"]) == ["gpu", "fpga"]
    dev = {"F0": FakeDevice()}
    gpus = two_gpus()

    def bump() -> None:
        gpus[1].energy_mj += 50_000                 # 50 J GPU
        dev["F0"].uj += 30_000_000                  # 30 J FPGA: a separate device, adds up

    run = tmp_path / "run"
    rec = meter_window(run, TelemetryConfig(**FAST), bump, gpus=gpus,
                       source_options={FpgaSource.LABEL: dev})
    assert rec["source"]["fpga"] == "fpga-counter"
    assert rec["energy_j"]["fpga"] == pytest.approx(30.0)
    assert rec["_total"] == pytest.approx(80.0, abs=1e-3)             # GPU + FPGA
    phases = read_phases(run)
    assert e_run(phases, component="fpga").value == pytest.approx(30.0)
    begin = next(json.loads(x) for x in (run / "phases.jsonl").read_text().splitlines()
                 if json.loads(x).get("kind") == "begin" and json.loads(x)["phase"] == "train")
    got = recover_window(begin, [], read_telemetry(run))
    assert got["energy_j"]["fpga"] == pytest.approx(30.0, abs=1e-6)
    assert ept_from_record(rec, input_tokens=500, output_tokens=500)["fpga"]["ept_total_j"] \
        == pytest.approx(0.03)
    make_run(tmp_path / "exp", "teacher", info={"method": "teacher", "mode": "none"},
             metrics=False)
    make_run(tmp_path / "exp", "response/rep0", info={"method": "response", "mode": "response",
                                                      "repeat": 0}, metrics=False)
    os.replace(run / "phases.jsonl", tmp_path / "exp" / "response/rep0" / "phases.jsonl")
    students, teacher = collect([tmp_path / "exp"], tmp_path / "exp" / "teacher")
    a = analyze(students, teacher)
    assert a.students[0].e_run["fpga"].value == pytest.approx(30.0)


def test_a_component_clash_is_refused() -> None:
    class Clash(FakeCounterSource):
        LABEL = "node-clash"
        COMPONENTS = ("node",)
        DECLARES = (Component("node", "Node", contains=()),)

    with pytest.raises(ValueError, match="already declared"):
        register_source(Clash)
    assert sys.modules["wattkd.energy.sources.node_power"]  # loaded by the package itself


def test_the_cli_refuses_a_bad_source_section_before_any_work(tmp_path: Path) -> None:
    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / "demo.yaml").read_text())
    cfg["telemetry"]["sources"] = {"node-power": {"command": "ipmitool dcmi power | awk x"}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["config", "show", str(path)])
    assert res.exit_code == 2
    assert "error: telemetry.sources.node-power.command" in res.output and "shell" in res.output


def tiny_model_dir(path: Path) -> Path:
    """A tiny real llama + a byte-level BPE trained on a few lines (no shared data needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["energy per token of a node meter"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=2048)
    build_model(fast).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_an_ept_run_reports_the_node_beside_the_gpu(tmp_path: Path) -> None:
    """`run_ept` on a tiny real model with a node meter (a file a 100 W stand-in keeps
    current): ept.json carries a node row whose EPT is its own energy over the tokens."""
    f, stop = tmp_path / "node_j", threading.Event()
    t0 = time.monotonic()

    def meter_file() -> None:
        while not stop.is_set():
            tmp = f.with_suffix(".tmp")
            tmp.write_text(f"{100.0 * (time.monotonic() - t0):.6f}\n")
            os.replace(tmp, f)                       # never a half-written reading
            time.sleep(0.005)

    meter_file_once = threading.Thread(target=meter_file, daemon=True)
    f.write_text("0\n")
    meter_file_once.start()
    try:
        meter = EnergyMeter(TelemetryConfig(**FAST, sources={"node-power": {"file": str(f)}}),
                            tmp_path / "run", nvml_lib=FakeNvml([]),
                            powercap_root=tmp_path / "none")
        cfg = EptConfig(num_prompts=2, prompt_tokens=8, max_new_tokens=3, batch_sizes=[2],
                        warmup_batches=0, repeats=1)
        res = run_ept(str(tiny_model_dir(tmp_path / "model")), cfg, meter, tmp_path / "run",
                      device="cpu", min_window_s=0.2)
    finally:
        stop.set()
        meter_file_once.join()
    run = res["runs"][0]
    node = run["energy"]["node"]
    assert node["source"] == "node-power" and not node["estimated"]
    assert node["average_power_w"] == pytest.approx(100.0, rel=0.25)
    assert node["ept_total_j"] * run["total_tokens"] == pytest.approx(node["energy_j"])
    steady = run["figures"]["energy"]["node"]
    assert steady["mean_power_w"]["mean"] == pytest.approx(100.0, rel=0.25)
    assert steady["j_per_request"]["mean"] > 0
    assert run["energy"]["gpu"]["source"] == "unavailable"
    assert "dram" not in run["energy"]
