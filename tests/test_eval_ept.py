"""Inference EPT: arithmetic against a hand-computed ledger, and the benchmark on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_eval_common import one_thread, save_model_dir
from wattkd.config import EptConfig, TelemetryConfig
from wattkd.eval.ept import EptError, ept_for, ept_from_record, ept_metrics, load_prompts, run_ept
from wattkd.eval.protocol import protocol_hash

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

# A phases.jsonl record as the ledger writes it (schema 1), values chosen by hand.
LEDGER = {
    "schema": 1, "kind": "phase", "phase": "ept", "duration_s": 10.0, "tokens": 4000,
    "energy_j": {"gpu": 1200.0, "cpu": 300.0, "dram": None},
    "source": {"gpu": "nvml-counter", "cpu": "estimated-cpu-time", "dram": "unavailable"},
    "estimated": True,
    "uncertainty_j": {"gpu": 60.0, "cpu": None, "dram": None},
    "idle_power_w": {"gpu": 50.0, "cpu": 10.0, "dram": None},
    "flags": ["estimated-cpu"],
}


def test_ept_arithmetic_matches_hand_computed_ledger():
    e = ept_from_record(LEDGER, input_tokens=3000, output_tokens=1000)
    assert set(e) == {"gpu", "cpu"}  # dram was never read: left out
    g = e["gpu"]
    # E = 1200 J over 3000 in + 1000 out tokens, 10 s, idle 50 W, uncertainty 60 J
    assert g["ept_in_j"] == pytest.approx(0.4)
    assert g["ept_out_j"] == pytest.approx(1.2)
    assert g["ept_total_j"] == pytest.approx(0.3)
    assert g["average_power_w"] == pytest.approx(120.0)
    assert g["idle_energy_j"] == pytest.approx(500.0)
    assert g["dynamic_energy_j"] == pytest.approx(700.0)
    assert g["dynamic_ept_in_j"] == pytest.approx(700 / 3000)
    assert g["dynamic_ept_out_j"] == pytest.approx(0.7)
    assert g["dynamic_ept_total_j"] == pytest.approx(0.175)
    assert g["ept_total_uncertainty_j"] == pytest.approx(0.015)
    assert g["ept_out_uncertainty_j"] == pytest.approx(0.06)
    assert g["source"] == "nvml-counter" and g["estimated"] is False
    c = e["cpu"]
    assert c["ept_total_j"] == pytest.approx(0.075)
    assert c["dynamic_ept_total_j"] == pytest.approx((300 - 100) / 4000)
    assert c["estimated"] is True and c["uncertainty_j"] is None


def test_missing_energy_or_idle_gives_nulls_not_numbers():
    m = ept_metrics(energy_j=None, duration_s=2.0, input_tokens=10, output_tokens=5,
                    idle_power_w=40.0)
    assert m["ept_total_j"] is None and m["dynamic_ept_total_j"] is None
    assert m["idle_energy_j"] == 80.0 and m["total_tokens"] == 15
    m = ept_metrics(energy_j=30.0, duration_s=2.0, input_tokens=10, output_tokens=5)
    assert m["ept_total_j"] == 2.0 and m["dynamic_energy_j"] is None
    e = ept_from_record({**LEDGER, "energy_j": {"gpu": None, "cpu": None},
                         "source": {"gpu": "unavailable", "cpu": "unavailable"}},
                        input_tokens=1, output_tokens=1)
    assert e["gpu"]["source"] == "unavailable" and e["gpu"]["ept_total_j"] is None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model_dir(tmp_path_factory.mktemp("ept") / "model")


# One repeat: each window is one pass over the prompts (tests/test_ept_engine.py covers repeats).
CFG = EptConfig(num_prompts=4, prompt_tokens=12, max_new_tokens=4, batch_sizes=[1, 4],
                warmup_batches=1, repeats=1)


def test_run_ept_without_energy_counts_tokens_and_writes_schema(model_dir, tmp_path):
    res = run_ept(str(model_dir), CFG, None, tmp_path, device="cpu")
    on_disk = json.loads((tmp_path / "ept.json").read_text())
    assert on_disk["schema"] == "wattkd.ept/2"
    assert on_disk["protocol_hash"] == protocol_hash(on_disk["protocol"]) == res["protocol_hash"]
    p = on_disk["protocol"]
    assert (p["decoding"], p["max_new_tokens"], p["min_new_tokens"]) == ("greedy", 4, 4)
    assert p["prompt_source"].startswith("bundled:all@") and p["device_name"] == "cpu"
    assert [r["batch_size"] for r in on_disk["runs"]] == [1, 4]
    for run, batches in zip(on_disk["runs"], [4, 1], strict=True):
        assert run["batches"] == batches and run["prompts"] == 4 and run["passes"] == 1
        assert (run["input_tokens"], run["output_tokens"], run["total_tokens"]) == (48, 16, 64)
        assert run["tokens_per_s"] == pytest.approx(64 / run["duration_s"])
        assert run["latency"]["ms_per_output_token"] > 0
        assert run["energy"]["gpu"]["source"] == "unavailable"
        assert run["energy"]["gpu"]["ept_total_j"] is None
        assert run["energy"]["cpu"]["ept_total_j"] is None
    assert on_disk["short_prompts"] == 0
    assert ept_for(on_disk, 4, component="gpu") is None
    with pytest.raises(KeyError, match=r"measured: \[1, 4\]"):
        ept_for(on_disk, 2)


def test_run_ept_with_estimated_cpu_energy_is_labelled_and_consistent(model_dir, tmp_path):
    from wattkd.energy.ledger import EnergyMeter

    meter = EnergyMeter(TelemetryConfig(cpu_watts_per_core=10.0, idle_seconds=0.2,
                                        interval_s=0.05), tmp_path)
    res = run_ept(str(model_dir), CFG.model_copy(update={"batch_sizes": [2]}), meter, tmp_path,
                  device="cpu")
    run = res["runs"][0]
    cpu = run["energy"]["cpu"]
    assert cpu["source"] == "estimated-cpu-time" and cpu["estimated"] and run["estimated"]
    assert cpu["energy_j"] > 0
    assert cpu["ept_total_j"] * run["total_tokens"] == pytest.approx(cpu["energy_j"])
    assert cpu["ept_out_j"] * run["output_tokens"] == pytest.approx(cpu["energy_j"])
    assert res["idle_power_w"]["cpu"] == cpu["idle_power_w"] is not None
    records = [json.loads(ln) for ln in (tmp_path / "phases.jsonl").read_text().splitlines()]
    ept_rec = [r for r in records if r["kind"] == "phase" and r["phase"] == "ept"]
    assert len(ept_rec) == 1 and ept_rec[0]["tokens"] == run["total_tokens"] == 64
    assert ept_rec[0]["meta"]["batch_size"] == 2
    assert cpu["energy_j"] == ept_rec[0]["energy_j"]["cpu"]
    assert cpu["dynamic_energy_j"] == pytest.approx(ept_rec[0]["dynamic_energy_j"]["cpu"],
                                                    abs=1e-5)
    assert any(r["kind"] == "run" for r in records)  # the meter started here was stopped


def test_short_windows_repeat_whole_passes(model_dir, tmp_path):
    cfg = CFG.model_copy(update={"batch_sizes": [4], "warmup_batches": 0})
    run = run_ept(str(model_dir), cfg, None, tmp_path, device="cpu", min_window_s=0.3)["runs"][0]
    assert run["passes"] >= 2 and run["duration_s"] >= 0.3
    assert run["total_tokens"] == run["passes"] * 64  # every pass is the whole prompt set
    assert len(run["energy"]) == 2 and run["batches"] == 1


def test_prompt_file_short_lines_are_counted_as_they_are(model_dir, tmp_path):
    from transformers import AutoTokenizer

    lines = ["In the beginning", "God created the heaven and the earth", "And the earth",
             "was without form, and void", "unused fifth line"]
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(lines) + "\n\n")
    cfg = CFG.model_copy(update={"prompts": str(f), "batch_sizes": [4], "warmup_batches": 0})
    texts, source = load_prompts(cfg)
    assert texts == lines[:4] and source == "file:prompts.txt"
    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = [len(tok(t, truncation=True, max_length=12)["input_ids"]) for t in texts]
    assert min(lengths) < 12  # some prompts are shorter than prompt_tokens (left-padded)
    res = run_ept(str(model_dir), cfg, None, tmp_path / "out.json", device="cpu")
    assert res["runs"][0]["input_tokens"] == sum(lengths)
    assert res["short_prompts"] == sum(n < 12 for n in lengths)
    assert (tmp_path / "out.json").is_file()


def test_bad_settings_fail_before_loading_the_model(tmp_path):
    missing = str(tmp_path / "no-model")
    with pytest.raises(EptError, match=r"batch_sizes \[8\] exceed eval.ept.num_prompts 4"):
        run_ept(missing, CFG.model_copy(update={"batch_sizes": [1, 8]}), None, tmp_path)
    f = tmp_path / "p.txt"
    f.write_text("one\ntwo\n")
    with pytest.raises(EptError, match="has 2 non-empty lines; eval.ept.num_prompts is 4"):
        run_ept(missing, CFG.model_copy(update={"prompts": str(f)}), None, tmp_path)
    with pytest.raises(EptError, match="repeats"):
        run_ept(missing, CFG.model_copy(update={"batch_sizes": [2, 2]}), None, tmp_path)
