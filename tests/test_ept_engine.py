"""EPT engine, protocol and steady-state windows: hand-checked arithmetic on a fake clock and
energy source, the engine in the protocol (a student on another engine is refused, the key
named), and `wattkd ept` on a tiny real model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from test_eval_common import one_thread, save_model_dir
from wattkd.config import EptConfig
from wattkd.eval.engine import Engine, EngineError, generation_config, resolve_engine
from wattkd.eval.ept import measure_batch_size
from wattkd.eval.ept_protocol import compare_ept, ept_protocol, ept_ratios
from wattkd.eval.ept_window import (
    WindowError,
    point_figures,
    required_window_s,
    window_done,
)
from wattkd.eval.protocol import ProtocolMismatch, protocol_hash

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


# ------------------------------------------------------------------ fake clock and energy
class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class FakeWindow:
    def __init__(self, meter: FakeMeter, name: str, meta: dict) -> None:
        self.meter, self.name, self.meta, self.tokens, self.record = meter, name, meta, 0, None

    def add_tokens(self, n: int) -> None:
        self.tokens += n

    def __enter__(self) -> FakeWindow:  # noqa: PYI034
        self.t0 = self.meter.clock()
        return self

    def __exit__(self, *exc: object) -> None:
        d = self.meter.clock() - self.t0
        e = self.meter.watts * d
        # the ledger's uncertainty: counter period x (power at both edges) + gain x E
        u = self.meter.counter_period_s * 2 * self.meter.watts + self.meter.gain * e
        self.meter.seq += 1
        self.record = {"phase": self.name, "duration_s": d, "tokens": self.tokens,
                       "energy_j": {"gpu": e, "cpu": None, "dram": None},
                       "uncertainty_j": {"gpu": u, "cpu": None, "dram": None},
                       "source": {"gpu": "nvml-counter", "cpu": "unavailable",
                                  "dram": "unavailable"},
                       "flags": ["short-window"] if d < 10 else [], "notes": [],
                       "seq": self.meter.seq, "meta": self.meta}
        self.meter.records.append(self.record)


class FakeMeter:
    """A constant-power GPU energy source on a fake clock, shaped like EnergyMeter."""

    def __init__(self, clock: FakeClock, watts: float, idle_w: float) -> None:
        self.sources = {"gpu": "nvml-counter", "cpu": "unavailable", "dram": "unavailable"}
        self.clock, self.watts = clock, watts
        self.idle_power_w = {"gpu": idle_w, "cpu": None, "dram": None}
        self.counter_period_s, self.gain, self.seq, self.records = 0.1, 0.05, 0, []
        self.started = True

    def phase(self, name: str, tokens: int = 0, **meta: object) -> FakeWindow:
        return FakeWindow(self, name, meta)


def test_window_length_from_minimum_or_uncertainty_target():
    assert required_window_s(min_window_s=10.0) == 10.0
    # 2 x 0.1 s / (0.07 - 0.05) = 10 s; check against the ledger's formula at 300 W:
    t = required_window_s(min_window_s=0.0, target_rel_uncertainty=0.07, counter_period_s=0.1,
                          gain_error=0.05)
    assert t == pytest.approx(10.0)
    e = 300 * t
    assert (0.1 * (300 + 300) + 0.05 * e) / e == pytest.approx(0.07)
    with pytest.raises(WindowError, match=r"eval.ept.target_rel_uncertainty 0.04 cannot be "
                                          r"met.*telemetry.gpu_gain_error 0.05"):
        required_window_s(min_window_s=0, target_rel_uncertainty=0.04, gain_error=0.05)
    # closes at a batch boundary once long enough and after min_batches
    assert not window_done(0.0, 0, required_s=0.0, min_batches=1)
    assert window_done(0.0, 1, required_s=0.0, min_batches=1)
    assert not window_done(5.0, 3, required_s=0.0, min_batches=4)  # one pass = 4 batches
    assert not window_done(1.19, 9, required_s=1.2, min_batches=1)
    assert window_done(1.2, 1, required_s=1.2, min_batches=1)


def test_prefill_decode_split_hand_checked_on_a_fake_clock_and_energy_source():
    """Batch 4, prompts of 10 tokens, 5 new tokens; a request batch takes 0.5 s, a prefill
    batch 0.125 s, at 200 W against 50 W idle; windows of >= 1.2 s, 2 repeats."""
    clock = FakeClock()
    meter = FakeMeter(clock, watts=200.0, idle_w=50.0)
    calls: list[tuple[int, int, int]] = []

    def generate(lo: int, hi: int, new: int) -> tuple[int, int]:
        calls.append((lo, hi, new))
        clock.t += 0.5 if new == 5 else 0.125
        return (hi - lo) * 10, (hi - lo) * new

    cfg = EptConfig(num_prompts=8, prompt_tokens=10, max_new_tokens=5, batch_sizes=[4],
                    warmup_batches=1, repeats=2)
    run = measure_batch_size(generate, meter, cfg, 4, required=1.2, model="m",
                             engine="static-compiled", clock=clock)
    # warm-up: one request + one prefill batch, not metered
    assert calls[:2] == [(0, 4, 5), (0, 4, 1)] and run["warmup_s"] == pytest.approx(0.625)
    # each request window: 3 batches (1.5 s >= 1.2); each prefill window: 10 (1.25 s)
    assert [r["phase"] for r in meter.records] == ["ept", "ept_prefill"] * 2
    assert [w["batches"] for w in run["windows"]] == [3, 3, 10, 10]
    assert run["batches_run"] == 6 and run["passes"] == 3.0  # 2 batches per pass
    assert (run["input_tokens"], run["output_tokens"]) == (6 * 40, 6 * 20)
    # windows continue through the prompt set: request batches alternate 0..4, 4..8
    req = [c for c in calls[2:] if c[2] == 5]
    assert [c[0] for c in req] == [0, 4, 0, 4, 0, 4]
    f = run["figures"]
    assert f["split"] == "prefill-decode" and f["decode_steps"] == 4
    assert f["ms_per_step"]["mean"] == pytest.approx((500 - 125) / 4)   # 93.75 ms
    assert f["ms_per_step"]["n"] == 2 and f["ms_per_step"]["std"] == pytest.approx(0.0)
    assert f["output_tokens_per_s"]["mean"] == pytest.approx(60 / 1.5)  # 40 tokens/s
    g = f["energy"]["gpu"]
    assert g["source"] == "nvml-counter" and g["estimated"] is False
    # E per batch: request 200 W x 0.5 s = 100 J, prefill 200 W x 0.125 s = 25 J
    assert g["j_per_input_token"]["mean"] == pytest.approx(25 / 40)       # 0.625
    assert g["j_per_output_token"]["mean"] == pytest.approx(75 / 16)      # 4.6875
    assert g["j_per_request"]["mean"] == pytest.approx(25.0)
    assert g["mean_power_w"]["mean"] == pytest.approx(200.0)
    # dynamic: (200 - 50) W -> request 75 J, prefill 18.75 J per batch
    assert g["dynamic_j_per_input_token"]["mean"] == pytest.approx(18.75 / 40)
    assert g["dynamic_j_per_output_token"]["mean"] == pytest.approx((75 - 18.75) / 16)
    assert g["dynamic_j_per_request"]["mean"] == pytest.approx(75 / 4)
    # uncertainty: each window's (0.1 x 400 W + 0.05 E) per batch, combined in quadrature
    u_req, u_pre = (40 + 0.05 * 300) / 3, (40 + 0.05 * 250) / 10
    assert g["j_per_output_token"]["uncertainty"] == pytest.approx(math.hypot(u_req, u_pre) / 16)
    assert g["j_per_input_token"]["uncertainty"] == pytest.approx(u_pre / 40)
    assert "cpu" in f["energy"] and f["energy"]["cpu"]["j_per_request"] is None
    # legacy block: the request windows together (EPT_total = E / all tokens), flags kept
    assert run["energy"]["gpu"]["energy_j"] == pytest.approx(2 * 300.0)
    assert run["energy"]["gpu"]["ept_total_j"] == pytest.approx(600 / 360)
    assert run["flags"] == ["short-window"]


def test_repeats_spread_and_no_split():
    from wattkd.eval.ept_window import Window

    def w(d: float, e: float) -> Window:
        return Window("request", d, 2, 20, 16, {"gpu": e}, {"gpu": None},
                      {"gpu": "nvml-counter"})

    f = point_figures([w(1.0, 100.0), w(1.0, 120.0), w(1.0, 110.0)], [], batch_size=2,
                      new_tokens=8)
    assert f["split"] == "none" and f["ms_prefill_batch"] is None
    assert f["ms_per_step"]["mean"] == pytest.approx(500 / 8)
    j = f["energy"]["gpu"]["j_per_output_token"]
    assert j["mean"] == pytest.approx(110 / 2 / 16)  # no split: request energy / all outputs
    assert (j["min"], j["max"]) == pytest.approx((100 / 32, 120 / 32))
    assert j["std"] == pytest.approx(10 / 32) and j["n"] == 3 and j["uncertainty"] is None
    assert f["energy"]["gpu"]["j_per_input_token"] is None


# ------------------------------------------------------------------------------ engine
def test_engine_resolution_and_generation_config():
    cfg = EptConfig()
    graph = resolve_engine(cfg, "cuda")
    assert (graph.name, graph.cache, graph.compile, graph.compile_mode) == (
        "graph-compiled", "static", True, "default")
    assert resolve_engine(cfg, "cpu").name == "dynamic-eager"
    with pytest.raises(EngineError, match="engine: graph needs CUDA"):
        resolve_engine(cfg.model_copy(update={"engine": "graph"}), "cpu")
    eager = resolve_engine(cfg.model_copy(update={"engine": "dynamic"}), "cuda")
    assert (eager.cache, eager.compile) == ("dynamic", False)
    with pytest.raises(EngineError, match="eval.ept.compile: true needs eval.ept.engine: static"):
        resolve_engine(cfg.model_copy(update={"engine": "dynamic", "compile": True}), "cuda")
    hf_static = resolve_engine(cfg.model_copy(update={"engine": "static"}), "cuda")
    assert hf_static.name == "static-compiled"
    g = generation_config(hf_static, new_tokens=7, pad_id=0, eos_id=2)
    assert g.cache_implementation == "static" and g.compile_config.mode == "reduce-overhead"
    assert (g.max_new_tokens, g.min_new_tokens, g.do_sample) == (7, 7, False)
    g = generation_config(resolve_engine(cfg.model_copy(update={"engine": "static"}), "cpu"),
                          new_tokens=3, pad_id=0, eos_id=2)
    assert g.cache_implementation == "static" and g.disable_compile is True
    assert generation_config(eager, new_tokens=3, pad_id=0, eos_id=2).cache_implementation \
        is None


def _protocol(engine: Engine, **over) -> dict:
    cfg = EptConfig(num_prompts=4, prompt_tokens=12, max_new_tokens=4, batch_sizes=[1, 4])
    p = ept_protocol(cfg.model_copy(update=over), ["a", "b"], "bundled:all@x", dtype="bfloat16",
                     device_name="NVIDIA H200",
                     engine=engine.record(dtype="bfloat16", attn_implementation="sdpa"))
    return {"protocol": p, "protocol_hash": protocol_hash(p), "runs": []}


def test_student_measured_with_another_engine_is_refused_naming_the_key():
    static = Engine("static-compiled", "static", True, "reduce-overhead", "inductor", "cuda")
    dynamic = Engine("dynamic-eager", "dynamic", False, None, None, "cuda")
    teacher = _protocol(static)
    compare_ept(_protocol(static), teacher)                       # same engine: fine
    compare_ept(_protocol(static, batch_sizes=[4]), teacher)      # another sweep: fine
    with pytest.raises(ProtocolMismatch) as err:
        compare_ept(_protocol(dynamic), teacher)
    msg = str(err.value)
    assert "engine.cache: dynamic (student) vs static (teacher)" in msg
    assert "engine.compile" in msg and "engine.name" in msg and "prompt_tokens" not in msg
    with pytest.raises(ProtocolMismatch, match=r"max_new_tokens: 8 \(student\) vs 4"):
        compare_ept(_protocol(static, max_new_tokens=8), teacher)
    edited = _protocol(static)
    edited["protocol"]["engine"]["compile"] = False
    with pytest.raises(ProtocolMismatch, match="the file was edited"):
        compare_ept(edited, teacher)
    with pytest.raises(ProtocolMismatch, match="engine.cache"):
        ept_ratios(_protocol(dynamic), teacher)


def test_ratios_per_batch_size():
    static = Engine("static-compiled", "static", True, "reduce-overhead", "inductor", "cuda")

    def doc(vals: dict[int, float]) -> dict:
        d = _protocol(static)
        d["runs"] = [{"batch_size": b, "figures": {"ms_per_step": {"mean": v},
                                                  "energy": {"gpu": {"j_per_output_token":
                                                                     {"mean": v / 10}}}}}
                     for b, v in vals.items()]
        return d

    s, t = doc({1: 1.0, 8: 3.0}), doc({1: 4.0, 8: 6.0, 32: 8.0})
    assert ept_ratios(s, t) == pytest.approx({1: 0.25, 8: 0.5})
    assert ept_ratios(s, t, key="ms_per_step") == pytest.approx({1: 0.25, 8: 0.5})


# --------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model_dir(tmp_path_factory.mktemp("ept-engine") / "model")


def test_static_and_dynamic_engines_generate_the_same_tokens(model_dir):
    """The engine changes speed, not the work: greedy tokens agree (fp32, CPU)."""
    import torch

    from wattkd.eval.harness import load_model

    net, tok = load_model(str(model_dir), device="cpu")
    tok.padding_side = "left"
    enc = tok(["In the beginning God", "And the earth was without form"], padding=True,
              return_tensors="pt")
    outs = []
    for engine in ("static", "dynamic"):
        g = generation_config(resolve_engine(EptConfig(engine=engine), "cpu"), new_tokens=6,
                              pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
        with torch.no_grad():
            outs.append(net.generate(**enc, generation_config=g))
    assert outs[0].shape[1] == enc["input_ids"].shape[1] + 6
    assert torch.equal(outs[0], outs[1])


def _experiment(tmp_path: Path, model_dir: Path, **ept) -> Path:
    import yaml

    cfg = {"name": "ept-cli", "output_dir": str(tmp_path / "runs"),
           "teacher": {"model": str(model_dir)}, "student": {"model": str(model_dir)},
           "telemetry": {"idle_seconds": 0.2, "interval_s": 0.05, "cpu_watts_per_core": 10.0},
           "eval": {"suite": None, "ept": {"num_prompts": 4, "prompt_tokens": 12,
                                           "max_new_tokens": 4, "batch_sizes": [1, 4],
                                           "warmup_batches": 1, "repeats": 2, **ept}}}
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_cli_ept_on_a_tiny_model(model_dir, tmp_path):
    from typer.testing import CliRunner

    from wattkd.cli import app

    cfg = _experiment(tmp_path, model_dir)
    out = tmp_path / "ept.json"
    res = CliRunner().invoke(app, ["ept", str(model_dir), "--config", str(cfg), "--out",
                                   str(out), "--set", "eval.ept.engine=static"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["schema"] == "wattkd.ept/2"
    assert doc["engine"]["name"] == "static-eager" and doc["engine"]["device_type"] == "cpu"
    assert doc["protocol"]["engine"] == doc["engine"] and doc["model"]["lora_merged"] is False
    assert "estimated" in doc["measurement"]["label"] and doc["measurement"]["repeats"] == 2
    for run in doc["runs"]:
        f = run["figures"]
        assert f["ms_per_step"]["n"] == 2 and f["ms_per_step"]["mean"] > 0
        cpu = f["energy"]["cpu"]
        assert cpu["estimated"] is True and cpu["j_per_output_token"]["mean"] is not None
        assert cpu["j_per_input_token"]["mean"] >= 0  # CPU-time ticks: short windows may read 0
        # one pass over the prompts per window (no GPU counter): exact token counts
        assert run["passes"] == 2 and run["output_tokens"] == 2 * 4 * 4
        assert run["input_tokens"] == 2 * 4 * 12
    # a bad engine setting is one clear error, before the model is loaded
    res = CliRunner().invoke(app, ["ept", str(model_dir), "--config", str(cfg), "--out",
                                   str(tmp_path / "x.json"), "--set", "eval.ept.engine=dynamic",
                                   "--set", "eval.ept.compile=true"])
    assert res.exit_code == 2
    assert "error: eval.ept.compile: true needs eval.ept.engine: static" in res.output
    assert "Traceback" not in res.output


# ---------------------------------------------------------------------------- report
def _v2_doc(engine: Engine, watts: float, step_s: float) -> dict:
    """A wattkd.ept/2 result built by the real measure_batch_size on the fake clock/meter."""
    doc = _protocol(engine)
    doc.update({"schema": "wattkd.ept/2", "model": {"id": "m"},
                "engine": doc["protocol"]["engine"]})
    for b in (1, 4):
        clock = FakeClock()
        meter = FakeMeter(clock, watts=watts, idle_w=50.0)

        def generate(lo: int, hi: int, new: int, clock: FakeClock = clock) -> tuple[int, int]:
            clock.t += 0.1 + (step_s * 3 if new == 4 else 0.0)   # prefill 0.1 s + 3 steps
            return (hi - lo) * 12, (hi - lo) * new

        cfg = EptConfig(num_prompts=4, prompt_tokens=12, max_new_tokens=4, batch_sizes=[1, 4],
                        warmup_batches=0, repeats=2)
        doc["runs"].append(measure_batch_size(generate, meter, cfg, b, required=1.0,
                                              model="m", engine=engine.name, clock=clock))
    return doc


def test_report_ept_section_ratios_refusal_and_plots(tmp_path):
    from report_synth import ept_doc, make_run
    from wattkd.report.analysis import analyze
    from wattkd.report.collect import load_run
    from wattkd.report.ept_section import (
        decode_vs_batch,
        energy_vs_latency,
        ratio_table,
        steady_table,
    )

    static = Engine("static-compiled", "static", True, "reduce-overhead", "inductor", "cuda")
    dynamic = Engine("dynamic-eager", "dynamic", False, None, None, "cuda")
    info = {"mode": "response", "repeat": 0}
    t = make_run(tmp_path, "teacher", info={"method": "teacher", "mode": "none", "repeat": 0},
                 ept=_v2_doc(static, watts=300.0, step_s=0.2))
    s1 = make_run(tmp_path, "response/rep0", info={"method": "response", **info},
                  ept=_v2_doc(static, watts=150.0, step_s=0.1))
    s2 = make_run(tmp_path, "feature/rep0", info={"method": "feature", **info},
                  ept=_v2_doc(dynamic, watts=150.0, step_s=0.1))
    old = make_run(tmp_path, "baseline/rep0", info={"method": "baseline", **info},
                   ept=ept_doc({1: {"gpu": 48.0, "gpu_unc": 1.0}}))  # wattkd.ept/1 still read
    a = analyze([load_run(s1, "response/rep0"), load_run(s2, "feature/rep0"),
                 load_run(old, "baseline/rep0")], load_run(t, "teacher"))
    rows = {(r["run"], r["batch"]): r for r in ratio_table(a).rows}
    # decode: teacher 300 W x 0.6 s / 3 tokens/seq, student 150 W x 0.3 s: ratio 0.25;
    # prefill: same 0.1 s at half the power: 0.5; step time 0.5
    r = rows[("response/rep0", 4)]
    assert r["j_out"].value == pytest.approx(0.25) and r["j_in"].value == pytest.approx(0.5)
    assert r["ms_step"].value == pytest.approx(0.5)
    assert r["j_req"].value == pytest.approx(150 * 0.4 / (300 * 0.7))
    assert r["j_req"].unc is not None and r["j_out"].unc is not None
    gap = rows[("feature/rep0", 1)]["j_out"]
    assert not gap.ok and "engine.cache" in gap.gap
    assert not any(k[0] == "baseline/rep0" for k in rows)
    steady = steady_table(a)
    runs = {(x["run"], x["batch"]): x for x in steady.rows}
    tr = runs[("teacher", 1)]
    assert tr["engine"] == "static-compiled" and tr["ms_step"].value == pytest.approx(200.0)
    assert tr["j_out"].value == pytest.approx(300 * 0.6 / 3) and "n=2" in tr["spread"]
    assert tr["flags"] == "short-window" and ("baseline/rep0", 1) not in runs
    assert a.teacher.ept[1].ept_total.ok  # the legacy figure Eff_overall uses is still there
    base = next(r for r in a.students if r.label == "baseline/rep0")
    assert base.ept[1].ept_total.ok and not base.ept[1].steady  # /1: read, no steady fields
    for plot in (decode_vs_batch(a), energy_vs_latency(a)):
        assert plot.gap is None and plot.png.startswith(b"\x89PNG") and plot.svg
    assert "Pareto front" in energy_vs_latency(a).svg.decode()
