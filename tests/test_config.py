"""Settings declared once: derived flags, config files with overrides, config.yaml that reruns a command.

.venv/bin/python -m pytest tests/test_config.py -q
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import typer
import yaml

from kd.cli import app
from kd.errors import KdError
from kd.pipeline.onpolicy import OnPolicyConfig
from kd.pipeline.training.config import TrainConfig
from kd.pipeline.training.optim_settings import OptimizerSettings
from kd.stages.options import settings_of
from tests.helpers import assert_one_line_error, kd_env, run_kd, run_kd_in_process

DERIVED = {
    "train": "kd.pipeline.training.trainer:TrainConfig",
    "gen-traces": "kd.pipeline.traces.run:TracesConfig",
    "demo": "kd.pipeline.evaluation.demo:DemoConfig",
    "cache-logits": "kd.pipeline.capture.config:CacheConfig",
    "eval": "kd.pipeline.evaluation.model_eval:EvalConfig",
    "compare": "kd.pipeline.evaluation.compare:CompareConfig",
    "on-policy": "kd.pipeline.onpolicy:OnPolicyConfig",
}
"""Commands whose flags come from a settings dataclass, and that dataclass."""


def config_class(spec: str) -> type:
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def click_command(name: str):
    return typer.main.get_command(app).commands[name]


@pytest.mark.parametrize("command", sorted(DERIVED))
def test_every_setting_is_a_flag_with_the_dataclass_default(command):
    cls = config_class(DERIVED[command])
    params = {p.name: p for p in click_command(command).params}
    fields = {f.name for f in dataclasses.fields(cls)}
    settings = settings_of(cls)
    assert {s.name for s in settings} <= fields
    skipped = fields - {s.name for s in settings}
    assert skipped <= {"extra"}, skipped  # only non-scalar plumbing stays off the command line
    for setting in settings:
        param = params[setting.name]
        assert setting.flag in param.opts
        if not setting.required:
            # A variadic argument (kd compare's models) defaults to None on the command line, [] in the dataclass.
            assert param.default == setting.default or (setting.argument and param.default is None), setting.name
        assert param.help and param.help.replace("\\[", "[") == setting.help
    help_text = run_kd(command, "--help", env=kd_env(COLUMNS="400", TERMINAL_WIDTH="400")).stdout
    for setting in settings:
        assert setting.flag in help_text, setting.flag


def _cache_args(tmp_path: Path) -> list[str]:
    return ["train", "--from-cache", str(tmp_path / "c"), "--student-from-teacher", "--out", str(tmp_path / "o")]


def test_config_file_with_command_line_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("batch-size: 16\nlearning_rate: 0.002\nlayers: even:4\nseed: 7\n")
    proc = run_kd_in_process(*_cache_args(tmp_path), "--config", str(config), "--seed", "9", "--print-config")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["batch_size"] == 16 and printed["learning_rate"] == 0.002 and printed["layers"] == "even:4"
    assert printed["seed"] == 9  # the command line wins over the file
    assert printed["alpha"] == 0.5  # untouched settings keep their defaults
    assert "kd_version" in printed
    # JSON works too, and a file may supply a required flag.
    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({"out": str(tmp_path / "o2"), "from-cache": "c", "student_from_teacher": True}))
    proc = run_kd_in_process("train", "--config", str(as_json), "--print-config")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["out"] == str(tmp_path / "o2")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("top-kk: 3\n", ["unknown key 'top-kk'", "bad.yaml"]),
        ("batch_size: many\n", ["'batch-size' must be int", "bad.yaml"]),
        ("alpha: [1, 2]\n", ["'alpha' must be float", "bad.yaml"]),
        ("resume: 1\n", ["'resume' must be bool", "bad.yaml"]),
        ("- a list\n", ["expected a mapping", "bad.yaml"]),
        ("key: [unclosed\n", ["not valid YAML", "bad.yaml"]),
    ],
)
def test_bad_config_files_are_one_line_errors(tmp_path, text, fragments):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert_one_line_error(run_kd_in_process(*_cache_args(tmp_path), "--config", str(bad)), *fragments)


def test_missing_config_and_missing_required_flag(tmp_path):
    assert_one_line_error(
        run_kd_in_process(*_cache_args(tmp_path), "--config", str(tmp_path / "nope.yaml")), "no such file"
    )
    assert_one_line_error(
        run_kd_in_process("train", "--from-cache", "c", "--student-from-teacher"), "--out is required"
    )


def test_unknown_flag_and_bad_value_are_one_line_usage_errors(tmp_path):
    proc = run_kd_in_process(*_cache_args(tmp_path), "--no-such-flag")
    assert_one_line_error(proc, "No such option: --no-such-flag")
    assert proc.returncode == 2
    assert_one_line_error(run_kd_in_process(*_cache_args(tmp_path), "--alpha", "abc"), "'--alpha'")


def test_step_settings_are_declared_once_and_listed_after_each_commands_own():
    shared = [f.name for f in dataclasses.fields(OptimizerSettings)]
    for cls in (TrainConfig, OnPolicyConfig):
        assert [s.name for s in settings_of(cls)][-len(shared) :] == shared, cls.__name__
    # on-policy keeps its own default (a subclass redeclares the field for it)
    assert TrainConfig.learning_rate == 1e-4 and OnPolicyConfig.learning_rate == 5e-5


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("accumulation_steps", 0, "--accumulation-steps must be >= 1, got 0"),
        ("grad_clip", -1.0, "--grad-clip must be >= 0, got -1.0"),
        ("min_lr_ratio", float("nan"), "--min-lr-ratio must be in [0, 1], got nan"),
        ("dtype", "fp16", "--dtype fp16: expected auto, bfloat16 or float32"),
    ],
)
def test_step_settings_are_refused_alike_by_train_and_on_policy(tmp_path, key, value, message):
    train = {"out": str(tmp_path / "o"), "from_cache": "c", "student": "s"}
    on_policy = {"out": str(tmp_path / "run"), "prompts": "p.jsonl", "student_from_teacher": True}
    for cls, required in ((TrainConfig, train), (OnPolicyConfig, on_policy)):
        with pytest.raises(KdError) as info:
            cls(**required, **{key: value})
        assert str(info.value) == message, cls.__name__
