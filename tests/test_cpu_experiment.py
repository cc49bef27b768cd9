"""The pre-registered `make cpu-experiment`: its preset composes and validates for every stage, the
comparisons it pre-registers are computable from its controls, its script calls real commands, and
docs/results.md states the preset's sizes (a change to one without the other fails here)."""

from __future__ import annotations

import re
from pathlib import Path

from rrr import failure_eval
from rrr.report import failures as failure_report
from rrr.cli import app
from rrr.config import compose
from rrr.train_setup import validate as validate_train

ROOT = Path(__file__).resolve().parent.parent


def preset(*extra: str):
    return compose(["experiment=cpu-experiment", *extra])


def test_preset_validates_for_train_and_failure_eval(tmp_path):
    cfg = preset("train.failures=x")
    validate_train(cfg)
    assert cfg.train.zero_std == "dynamic" and int(cfg.train.max_draws) >= 2
    assert 0 < int(cfg.train.overlong_buffer) < int(cfg.train.sampling.reflection.max_tokens)
    failure_eval.validate(preset(f"eval.failures={tmp_path}"))


TRAINED_CONTROLS = "eval.controls=[retry_no_reflection]"     # what the script gives the trained run


def test_the_headline_comparisons_are_computable_from_the_runs_controls():
    conditions = {"vanilla": failure_eval.conditions_of(preset()),
                  "trained": failure_eval.conditions_of(preset(TRAINED_CONTROLS))}
    for ma, a, mb, b in failure_report.HEADLINE:
        assert a in conditions[ma] and b in conditions[mb], (ma, a, mb, b)
    trained_stage = next(line for line in (ROOT / "scripts" / "cpu_experiment.sh").read_text().split("\n$RRR")
                         if "fe-trained" in line)
    assert TRAINED_CONTROLS in trained_stage and "model.path=" in trained_stage


def test_the_script_calls_registered_commands_with_the_preset():
    script = (ROOT / "scripts" / "cpu_experiment.sh").read_text()
    commands = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    used = re.findall(r"\$RRR ([a-z-]+)", script)
    assert used and set(used) <= commands
    assert "failure-eval" in used and "experiment=cpu-experiment" in script


def test_results_md_preregisters_the_preset_sizes():
    cfg = preset()
    sections = (ROOT / "docs" / "results.md").read_text().split("\n## ")
    text = next(s for s in sections if s.split("\n")[0].endswith("(pre-registered before the run)"))
    assert f"R = {cfg.eval.reflections_per_failure}" in text
    assert f"{cfg.eval.failures_limit} failures" in text
    assert f"{cfg.train.steps} updates" in text


def test_every_variable_the_script_reads_is_set_in_it():
    """The script runs under `set -u`: a variable read but never set stops it (a merge once dropped PY=)."""
    script = (ROOT / "scripts" / "cpu_experiment.sh").read_text()
    used = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", script)) - {"BASHPID"}
    defined = set(re.findall(r"^\s*(?:export\s+)?([A-Z][A-Z0-9_]*)=", script, re.M))
    assert used <= defined, used - defined
