"""Config schema: defaults, named errors for unknown keys and wrong types, `config show`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from wattkd.cli import app
from wattkd.config import ConfigError, load

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))

MINIMAL = {
    "name": "t",
    "teacher": {"build": {"model_type": "llama", "hidden_size": 32}},
    "student": {"build": {"model_type": "llama", "hidden_size": 16}},
}


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_filled(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, MINIMAL))
    assert cfg.data.seq_len == 256
    assert cfg.train.max_steps == 100
    assert cfg.teacher.trust_remote_code is False
    assert cfg.out == Path("runs/t")
    assert cfg.shards_dir == Path("runs/t/shards")
    assert [m.name for m in cfg.distill.methods] == ["response", "baseline"]


def test_unknown_key_named_with_file_and_alternatives(tmp_path: Path) -> None:
    data = {**MINIMAL, "train": {"max_stepz": 5}}
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "train.max_stepz: unknown key" in msg
    assert "max_steps" in msg  # the expected keys are listed


def test_wrong_type_named(tmp_path: Path) -> None:
    data = {**MINIMAL, "data": {"seq_len": "long"}}
    with pytest.raises(ConfigError, match=r"data\.seq_len"):
        load(write(tmp_path, data))


def test_unknown_loss_and_param_refused(tmp_path: Path) -> None:
    bad_loss = {**MINIMAL, "distill": {"methods": [
        {"name": "r", "method": "response", "losses": [{"name": "forward_kld"}]}]}}
    with pytest.raises(ConfigError, match="unknown loss 'forward_kld'"):
        load(write(tmp_path, bad_loss))
    bad_param = {**MINIMAL, "distill": {"methods": [
        {"name": "r", "method": "response",
         "losses": [{"name": "forward_kl", "params": {"temprature": 2.0}}]}]}}
    with pytest.raises(ConfigError, match="temprature"):
        load(write(tmp_path, bad_param))


def test_loss_kind_must_fit_mode(tmp_path: Path) -> None:
    data = {**MINIMAL, "distill": {"methods": [
        {"name": "r", "method": "relation", "losses": [{"name": "forward_kl"}]}]}}
    with pytest.raises(ConfigError, match="method .relation. accepts"):
        load(write(tmp_path, data))


def test_feature_mode_needs_layer_map(tmp_path: Path) -> None:
    data = {**MINIMAL, "distill": {"methods": [
        {"name": "f", "method": "feature", "losses": [{"name": "hidden_mse"}]}]}}
    with pytest.raises(ConfigError, match="layer_map"):
        load(write(tmp_path, data))


@pytest.mark.parametrize("name", ["a;rm -rf /", "$(id)", "x y", "../up"])
def test_names_that_reach_a_shell_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="name"):
        load(write(tmp_path, {**MINIMAL, "name": name}))


def test_slurm_values_validated(tmp_path: Path) -> None:
    data = {**MINIMAL, "slurm": {"defaults": {"partition": "gpu; reboot"}}}
    with pytest.raises(ConfigError, match="slurm.defaults.partition"):
        load(write(tmp_path, data))


def test_student_source_exactly_one(tmp_path: Path) -> None:
    data = {**MINIMAL, "student": {"build": {"model_type": "llama"}, "model": "x"}}
    with pytest.raises(ConfigError, match="exactly one"):
        load(write(tmp_path, data))


def test_overrides_and_missing_file(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, MINIMAL), {"train.max_steps": 7})
    assert cfg.train.max_steps == 7
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "nope.yaml")


def test_config_show_prints_resolved_defaults(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["config", "show", str(write(tmp_path, MINIMAL))])
    assert res.exit_code == 0, res.output
    shown = yaml.safe_load(res.output)
    assert shown["telemetry"]["interval_s"] == 0.1
    assert shown["distill"]["logit_chunk_tokens"] == 1024


def test_config_show_error_is_one_clear_message(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["config", "show", str(write(tmp_path, {**MINIMAL, "x": 1}))])
    assert res.exit_code == 2
    assert "x: unknown key" in res.output


def test_the_old_mode_key_is_one_error_naming_the_new_key(tmp_path: Path) -> None:
    """`mode:` became `method:` (issue 29): a config still using it gets one error line naming
    both keys, with the config-error exit code, and nothing about `method` missing."""
    old = {**MINIMAL, "distill": {"methods": [
        {"name": "r", "mode": "response", "losses": [{"name": "forward_kl"}]}]}}
    res = CliRunner().invoke(app, ["config", "show", str(write(tmp_path, old))])
    assert res.exit_code == 2, res.output
    assert "distill.methods.0: Value error, key `mode` was renamed to `method`: write " \
        "`method: response`" in res.output
    assert "required key is missing" not in res.output and "Traceback" not in res.output


def test_a_stored_config_with_the_old_key_is_migrated_on_read() -> None:
    from wattkd.config import migrate_stored, validate

    stored = {**MINIMAL, "distill": {"methods": [
        {"name": "r", "mode": "response", "losses": [{"name": "forward_kl"}]},
        {"name": "b", "method": "none", "losses": [{"name": "ce"}]}]}}
    cfg = validate(migrate_stored(stored))
    assert [(m.name, m.method) for m in cfg.distill.methods] == [("r", "response"), ("b", "none")]


@pytest.mark.parametrize("beside", ["jobs.json", "run.json"])
def test_a_frozen_slurm_or_run_config_with_the_old_key_still_loads(tmp_path: Path,
                                                                   beside: str) -> None:
    """A Slurm pipeline frozen (slurm/config.yaml beside jobs.json) or a run's config.yaml
    written before the rename: its queued jobs load it with today's key; the same file as a
    user's own config is refused."""
    old = {**MINIMAL, "distill": {"methods": [
        {"name": "r", "mode": "response", "losses": [{"name": "forward_kl"}]}]}}
    frozen = tmp_path / "slurm" / "config.yaml"
    frozen.parent.mkdir()
    frozen.write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="renamed to `method`"):
        load(frozen)
    (frozen.parent / beside).write_text("{}")
    assert load(frozen).distill.methods[0].method == "response"


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO)) for p in CONFIGS])
def test_shipped_configs_validate(path: Path) -> None:
    load(path)


@pytest.mark.parametrize("name", ["report", "teacher", "shards"])
def test_method_names_of_stage_folders_refused(tmp_path: Path, name: str) -> None:
    data = {**MINIMAL, "distill": {"methods": [
        {"name": name, "method": "none", "losses": [{"name": "ce"}]}]}}
    with pytest.raises(ConfigError, match="reserved"):
        load(write(tmp_path, data))


def test_fsdp_settings_checked_at_load(tmp_path: Path) -> None:
    fsdp = {**MINIMAL, "train": {"strategy": "fsdp"}}
    assert load(write(tmp_path, fsdp)).train.fsdp.shard_teacher is True
    with pytest.raises(ConfigError, match="train.strategy"):
        load(write(tmp_path, {**MINIMAL, "train": {"strategy": "zero3"}}))
    lora = {**fsdp, "student": {"model": "meta-llama/Llama-3.1-8B", "lora": {"r": 4}}}
    with pytest.raises(ConfigError, match="merge_on_save: false"):
        load(write(tmp_path, lora))
    lora["student"]["lora"]["merge_on_save"] = False
    assert load(write(tmp_path, lora)).student.lora.merge_on_save is False
    mapped = {**fsdp, "teacher": {**MINIMAL["teacher"], "device_map": "auto"}}
    with pytest.raises(ConfigError, match="remove teacher.device_map"):
        load(write(tmp_path, mapped))
