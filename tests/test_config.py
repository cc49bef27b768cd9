"""Config composition and the CLI's override errors (no model, no data)."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from rrr.cli import app
from rrr.config import ConfigError, compose, group_options

runner = CliRunner()


def test_defaults_compose_and_prompts_follow_task():
    cfg = compose([])
    assert cfg.task.name == "function_calling"
    cfg = compose(["task=countdown", "train.lr=1e-6"])
    assert cfg.task.name == "countdown" and cfg.train.lr == 1e-6
    # the prompt group follows the task unless overridden
    assert cfg.prompts == compose(["task=countdown", "prompts=countdown"]).prompts


@pytest.mark.parametrize("override, needle", [
    (["train.lrr=1"], "unknown config key 'train.lrr'; valid keys under 'train':"),
    (["nonsense=1"], "unknown config key 'nonsense'"),
    (["task=foo"], "unknown task option 'foo'; valid choices: countdown, function_calling"),
    (["model=gpt5"], "unknown model option 'gpt5'; valid choices:"),
    (["train.lr=fast"], "train.lr='fast' has type str, but train.lr expects float"),
    (["train.steps=1.5"], "train.steps=1.5 has type float, but train.steps expects int"),
    (["train.steps=true"], "expects int"),
    (["train.lr"], "is not key=value"),
])
def test_bad_overrides_fail_with_one_clear_message(override, needle):
    with pytest.raises(ConfigError) as e:
        compose(override)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_int_accepted_for_float_and_null_defaults_take_anything():
    cfg = compose(["train.lr=1", "data.limit=5", "run_dir=/tmp/x"])
    assert cfg.train.lr == 1 and cfg.data.limit == 5


def test_every_group_option_composes():
    for group in ("task", "model", "engine", "prompts", "train", "eval", "logger", "collect"):
        for option in group_options(group):
            compose([f"{group}={option}"])


@pytest.mark.parametrize("cmd", ["collect-failures", "train", "evaluate", "verify"])
def test_cli_cfg_prints_resolved_config(cmd):
    res = runner.invoke(app, [cmd, "--cfg", "task=countdown", "train.lr=1e-6"])
    assert res.exit_code == 0, res.output
    assert "name: countdown" in res.output and "lr: 1.0e-06" in res.output


def test_cli_bad_override_exits_2_before_any_work():
    res = runner.invoke(app, ["train", "task=countdown", "train.lrr=1"])
    assert res.exit_code == 2
    assert "unknown config key 'train.lrr'" in res.output
    assert "Traceback" not in res.output


def test_cli_lists_commands():
    res = runner.invoke(app, ["--help"])
    for cmd in ("collect-failures", "train", "evaluate", "compare", "verify"):
        assert cmd in res.output


def test_experiment_preset_wins_over_root_and_group_defaults_and_cli_wins_over_it():
    cfg = compose(["experiment=demo"])
    assert cfg.data.limit == 16 and cfg.train.group_size == 4 and cfg.prompts.feedback_with_reason is True
    assert compose(["experiment=demo", "data.limit=3"]).data.limit == 3


def test_the_train_schema_is_the_one_source_of_choices_and_types():
    """Hydra refuses a train choice or type that rrr/config_schema.py does not allow, naming the valid
    values, and the composed values are typed (no casts needed downstream)."""
    from rrr import config_schema, grpo, leak

    assert grpo.LOSS_AGGREGATIONS == config_schema.values(config_schema.LossAgg)
    assert leak.LEAK_MODES == config_schema.values(config_schema.Leak)
    cfg = compose(["train.finetune=full", "train.lr=1", "train.steps=3"])
    assert cfg.train.finetune == "full" and f"{cfg.train.finetune}" == "full"
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.train.steps, int)
    with pytest.raises(ConfigError, match=r"^train.zero_std='often'; valid choices: keep, skip, resample, dynamic$"):
        compose(["train.zero_std=often"])
    with pytest.raises(ConfigError, match=r"train.micro_batch_size='two' has type str, but .* expects int"):
        compose(["train.micro_batch_size=two"])
    yaml_keys = set(compose([]).train.keys())
    assert yaml_keys == {f.name for f in dataclasses.fields(config_schema.TrainConfig)}
