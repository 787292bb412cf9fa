"""Configs are validated before any model loads; errors name the field."""

from __future__ import annotations

import json

import pytest
import torch

from halo import cli
from halo.config import ConfigError, load_config, parse_override


def test_file_then_overrides(tmp_path, tiny_settings):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"distill": {"steps": 7, "lr": 5e-4}}))
    config = load_config(path, ["distill.steps=9", "select.recall_multipliers=[1, 2.5]", "precision=fp32",
                                "finetune.gradient_checkpointing=false"], base=tiny_settings)
    assert config.distill.steps == 9 and config.distill.lr == 5e-4
    assert config.select.recall_multipliers == [1.0, 2.5]
    assert config.precision == "fp32" and config.finetune.gradient_checkpointing is False
    assert config.align.steps == 3  # from the base settings


def test_override_values_parse_as_json_else_string():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("teacher=/models/qwen3") == (["teacher"], "/models/qwen3")
    assert parse_override("select.num_attention=null") == (["select", "num_attention"], None)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("distill.steps")


@pytest.mark.parametrize("override, field", [
    ("distill.lr=-1", "distill.lr"),
    ("align.steps=0", "align.steps"),
    ("align.steps=2.5", "align.steps"),
    ("distill.micro_batch=3", "distill.global_batch"),
    ("finetune.min_lr=1", "finetune.min_lr"),
    ("finetune.warmup_steps=100", "finetune.warmup_steps"),
    ("finetune.schedule=linear", "finetune.schedule"),
    ("device=tpu", "device"),
    ("precision=fp8", "precision"),
    ("data.heldout_fraction=0", "data.heldout_fraction"),
    ("data.corpus=/does/not/exist.jsonl", "data.corpus"),
    ("select.method=random", "select.method"),
    ("select.num_attention=99", "select.num_attention"),
    ("alpha.grid=[0.5]", "alpha.grid"),
    ("eval.base_length=16", "eval.base_length"),
    ("teacher=/does/not/exist", "teacher"),
    ("distill.stepz=5", "'stepz'; did you mean 'steps'"),
    ("distill.gradient_checkpointing=1", "distill.gradient_checkpointing"),
    ("finetune.compile=yes", "finetune.compile"),
])
def test_bad_values_fail_naming_the_field(tiny_settings, override, field):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override], base=tiny_settings)
    assert field in str(error.value)


def test_teacher_must_be_qwen3(tmp_path, tiny_settings):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    with pytest.raises(ConfigError, match="model_type must be 'qwen3'"):
        load_config(None, [f"teacher={tmp_path}"], base=tiny_settings)


def test_cli_rejects_a_bad_config_before_loading_anything(monkeypatch, capsys, tiny_settings, tmp_path):
    def fail(*args, **kwargs):
        raise AssertionError("a model or corpus was touched before the config was validated")

    monkeypatch.setattr("halo.runtime.Runtime.create", fail)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(tiny_settings))
    assert cli.main(["distill", "--config", str(path), "distill.global_batch=5", "distill.micro_batch=2"]) == 2
    assert "distill.global_batch=5 must be a multiple of distill.micro_batch=2" in capsys.readouterr().err
    assert cli.main(["run", "--config", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_reports_a_nan_loss(monkeypatch, capsys, tiny_settings, tmp_path):
    from halo.train import NonFiniteLossError

    def nan_stage(runtime, stage, force=False):
        raise NonFiniteLossError(f"{stage}: the loss is nan at step 4; stopping.")

    monkeypatch.setattr("halo.pipeline.run_stage", nan_stage)
    monkeypatch.setattr("halo.runtime.Runtime.create", classmethod(lambda cls, config, progress=True: None))
    path = tmp_path / "run.json"
    path.write_text(json.dumps(tiny_settings))
    assert cli.main(["align", "--config", str(path)]) == 1
    assert "align: the loss is nan at step 4" in capsys.readouterr().err


@pytest.mark.parametrize("setting, device, expected", [(None, "cuda", True), (None, "cpu", False), (True, "cpu", True),
                                                      (False, "cuda", False)])
def test_compile_setting_defaults_to_cuda_only(tiny_settings, setting, device, expected):
    from halo.train import compile_enabled

    config = load_config(None, [f"distill.compile={json.dumps(setting)}"], base=tiny_settings)
    assert config.distill.compile is setting
    assert compile_enabled(config.distill.compile, torch.device(device)) is expected
