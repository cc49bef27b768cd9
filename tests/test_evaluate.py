"""evaluate: first/second try, the three controls, reflection statistics, paired seeds, the `rrr compare`
contract and crash-safe resume (fake engine/task/rollout)."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from types import SimpleNamespace

import pandas as pd
import pytest
from omegaconf import OmegaConf

import rrr.evaluate as evaluate
from fakes.failures import CrashingEngine, FakeEngine, FakeTask, fake_rollout, make_examples
from rrr.config import UserError, compose
from rrr.verifiers import Verdict

# Which (segment, mode) sample 0 solves: q0 passes at once; the others fail attempt 1 and are fixed by
# the reflection (q1), a 2nd sample or a bare retry (q2), a bare or generic retry (q3), nothing (q4).
SOLVE = [
    {"attempt1": 1},
    {"attempt2:model": 1},
    {"best_of_2": 1, "attempt2:none": 1},
    {"attempt2:none": 1, "attempt2:generic": 1},
    {},
]
CONTRACT_COLUMNS = ["example_id", "attempt1_correct", "attempt2_correct", "second_try_correct",
                    "best_of_2_correct", "retry_no_reflection_correct", "generic_reflection_correct",
                    "attempt1_text", "reflection_text", "attempt2_text", "attempt1_reason", "attempt2_reason",
                    "reflection_tokens", "reflection_truncated"]


@pytest.fixture
def fake(monkeypatch):
    state = SimpleNamespace(task=FakeTask(make_examples(SOLVE)), engine=FakeEngine())
    monkeypatch.setitem(sys.modules, "rrr.rollout", fake_rollout)
    monkeypatch.setattr(evaluate, "get_task", lambda name: state.task)
    monkeypatch.setattr(evaluate, "build_generator", lambda cfg: (state.engine, None))
    monkeypatch.setattr(evaluate, "model_provenance", lambda node: {"name": node.name})
    return state


def cfg_for(tmp_path, *extra: str):
    return compose(["task=countdown", "model=tiny-random", f"out_root={tmp_path}", "eval.limit=5",
                    "eval.batch_queries=3", "eval.bootstrap_samples=200", "log.progress=false", *extra])


def test_first_try_second_try_and_controls(tmp_path, fake, capsys):
    run = evaluate.run(cfg_for(tmp_path))
    df = pd.read_parquet(run / "results.parquet")
    assert set(CONTRACT_COLUMNS) <= set(df.columns)
    assert df.example_id.tolist() == [f"q{i:03d}" for i in range(5)]
    assert df.attempt1_correct.tolist() == [True, False, False, False, False]
    assert df.attempt2_correct.tolist() == [False, True, False, False, False]   # no retry after a pass
    assert df.second_try_correct.tolist() == [True, True, False, False, False]
    assert df.best_of_2_correct.tolist() == [True, False, True, False, False]
    assert df.retry_no_reflection_correct.tolist() == [True, False, True, True, False]
    assert df.generic_reflection_correct.tolist() == [True, False, False, True, False]
    assert math.isnan(df.reflection_tokens[0]) and df.reflection_tokens[1:].tolist() == [7.0] * 4
    assert df.attempt2_text[1] == "attempt2:model:0" and df.attempt2_reason[2] == "wrong attempt2:model"

    s = json.loads((run / "summary.json").read_text())
    assert s["n"] == 5 and (s["task"], s["model"], s["label"]) == ("countdown", "tiny-random", "vanilla")
    assert [s[k]["acc"] for k in ("first_try", "second_try", "best_of_2", "retry_no_reflection",
                                  "generic_reflection")] == pytest.approx([0.2, 0.4, 0.4, 0.6, 0.4])
    lo, hi = s["second_try"]["ci"]
    assert 0.0 <= lo < 0.4 < hi <= 1.0
    r = s["reflection"]
    assert (r["tokens_mean"], r["tokens_p50"], r["tokens_p95"]) == (7.0, 7.0, 7.0)
    assert r["truncated_share"] == pytest.approx(0.5)                  # q1 and q3 of the 4 reflections
    assert r["distinct_3gram_ratio"] == pytest.approx(0.8)
    assert "wall_s" in s
    out = capsys.readouterr().out
    assert "second try" in out and "0.400" in out


class StrictTask(FakeTask):
    """A task with a leaderboard format: q1's outputs (and q2's 2nd sample) are never in it."""

    def verify_strict(self, example, completion):
        lenient = self.verify(example, completion)
        in_format = example.fields["q"] != 1 and not completion.startswith("best_of_2")
        return Verdict(lenient.correct and in_format, "ok" if lenient.correct and in_format else "format")


def test_strict_scores_are_reported_beside_the_lenient_ones(tmp_path, fake, capsys):
    fake.task = StrictTask(make_examples(SOLVE))
    run = evaluate.run(cfg_for(tmp_path))
    df = pd.read_parquet(run / "results.parquet")
    assert df.second_try_correct.tolist() == [True, True, False, False, False]          # lenient: unchanged
    assert df.attempt1_strict_correct.tolist() == [True, False, False, False, False]
    assert df.second_try_strict_correct.tolist() == [True, False, False, False, False]  # q1's fix is not in format
    assert df.best_of_2_strict_correct.tolist() == [True, False, False, False, False]
    assert df.retry_no_reflection_strict_correct.tolist() == [True, False, True, True, False]
    assert df.generic_reflection_strict_correct.tolist() == [True, False, False, True, False]
    s = json.loads((run / "summary.json").read_text())
    assert s["second_try"]["acc"] == pytest.approx(0.4)
    assert [s["strict"][k]["acc"] for k in ("first_try", "second_try", "best_of_2", "retry_no_reflection",
                                            "generic_reflection")] == pytest.approx([0.2, 0.2, 0.2, 0.6, 0.4])
    out = capsys.readouterr().out
    assert "strict (leaderboard format)" in out
    line = next(x for x in out.splitlines() if x.startswith("second try"))
    assert "0.400" in line and line.rstrip().endswith("]") and line.count("[") == 2


def test_no_strict_scores_for_a_task_without_a_strict_format(tmp_path, fake, capsys):
    run = evaluate.run(cfg_for(tmp_path))
    assert not any("strict" in c for c in pd.read_parquet(run / "results.parquet").columns)
    assert "strict" not in json.loads((run / "summary.json").read_text())
    assert "leaderboard" not in capsys.readouterr().out


def test_manifest_carries_the_compare_contract(tmp_path, fake):
    manifest = json.loads((evaluate.run(cfg_for(tmp_path)) / "manifest.json").read_text())
    ids = "\n".join(sorted(f"q{i:03d}" for i in range(5)))
    assert manifest["command"] == "evaluate"
    assert manifest["examples_sha256"] == hashlib.sha256(ids.encode()).hexdigest()
    assert (manifest["train_run"], manifest["model_label"]) == (None, "vanilla")
    assert manifest["test_sets"][0]["excluded_examples"] == []


def test_trained_checkpoint_is_labelled_and_paired_with_vanilla(tmp_path, fake):
    evaluate.run(cfg_for(tmp_path / "v", "eval.controls=[]"))
    vanilla_seeds = fake.engine.seeds[0]
    train_run = tmp_path / "outputs" / "train" / "run1"
    fake.engine = FakeEngine()
    run = evaluate.run(cfg_for(tmp_path / "t", f"++model.path={train_run}/checkpoints/step_10"))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["model_label"] == "trained" and manifest["train_run"] == str(train_run)
    assert fake.engine.seeds[0] == vanilla_seeds        # same attempt-1 seeds, controls on or off


def test_only_failures_are_reflected_on(tmp_path, fake):
    evaluate.run(cfg_for(tmp_path, "eval.limit=1"))       # q0 passes at once
    assert fake.engine.calls == 1


def test_resume_after_a_crash_repeats_no_example(tmp_path, fake):
    reference = pd.read_parquet(evaluate.run(cfg_for(tmp_path / "ref")) / "results.parquet")
    fake.engine = FakeEngine(crash_on_call=6)             # batch 1 takes 5 calls; dies in batch 2
    with pytest.raises(CrashingEngine):
        evaluate.run(cfg_for(tmp_path / "a"))
    run = next((tmp_path / "a" / "evaluate").iterdir())
    fake.engine = FakeEngine()
    evaluate.run(cfg_for(tmp_path / "a", f"run_dir={run}"))
    assert sorted({p[0] for p in fake.engine.prompts}) == [1003, 1004]   # batch 2 only
    pd.testing.assert_frame_equal(pd.read_parquet(run / "results.parquet"), reference)


def test_unknown_control_is_a_user_error(tmp_path, fake):
    with pytest.raises(UserError, match="best_of_2"):
        evaluate.run(cfg_for(tmp_path, "eval.controls=[best_of_3]"))


def test_train_run_of_finds_the_run_above_checkpoints(tmp_path):
    assert evaluate.train_run_of(str(tmp_path / "r" / "checkpoints" / "step_3")) == str(tmp_path / "r")
    assert evaluate.train_run_of(str(tmp_path / "some" / "model")) is None
    assert evaluate.train_run_of(None) is None


def test_cli_end_to_end_on_tiny_random_and_paired_attempt1(tmp_path):
    from typer.testing import CliRunner

    from rrr.cli import app

    def evaluate_cli(*extra: str) -> pd.DataFrame:
        result = CliRunner().invoke(app, [
            "evaluate", "task=countdown", "model=tiny-random", "model.device=cpu", "engine=hf", "eval.limit=3",
            *[f"eval.sampling.{s}.max_tokens=6" for s in ("attempt1", "reflection", "attempt2")],
            "log.progress=false", *extra])
        assert result.exit_code == 0, result.output
        assert "second try" in result.output
        return pd.read_parquet(next((tmp_path / extra[0].split("=")[1]).glob("evaluate/*")) / "results.parquet")

    full = evaluate_cli(f"out_root={tmp_path}/a", "eval.batch_queries=2")
    assert set(CONTRACT_COLUMNS) <= set(full.columns) and len(full) == 3
    run = next((tmp_path / "a" / "evaluate").iterdir())
    s = json.loads((run / "summary.json").read_text())
    assert {"n", "first_try", "second_try", *evaluate.CONTROLS, "reflection", "task", "model", "label",
            "wall_s"} <= set(s)
    # Pairing: another run (other batching, no controls) draws the same attempt 1 per example.
    bare = evaluate_cli(f"out_root={tmp_path}/b", "eval.batch_queries=3", "eval.controls=[]")
    assert bare.attempt1_text.tolist() == full.attempt1_text.tolist()


# ----------------------------------------------------------------------------- several test sets

@pytest.fixture
def two_tasks(monkeypatch):
    """Countdown and function calling as two fake tasks (5 and 3 examples), so sets differ in content."""
    tasks = {"countdown": FakeTask(make_examples(SOLVE)), "function_calling": FakeTask(make_examples(SOLVE[1:4]))}
    state = SimpleNamespace(tasks=tasks, engine=FakeEngine(), batches=[])
    monkeypatch.setitem(sys.modules, "rrr.rollout", fake_rollout)
    monkeypatch.setattr(evaluate, "get_task", lambda name: tasks[name])
    monkeypatch.setattr(evaluate, "build_generator", lambda cfg: (state.engine, None))
    monkeypatch.setattr(evaluate, "model_provenance", lambda node: {"name": node.name})
    batch = evaluate.evaluate_batch

    def spy(engine, tokenizer, task, examples, cfg, stats):
        state.batches.append((cfg.task.name, cfg.prompts.system[:20], [e.id for e in examples]))
        return batch(engine, tokenizer, task, examples, cfg, stats)

    monkeypatch.setattr(evaluate, "evaluate_batch", spy)
    return state


SETS = "eval.test_sets=[countdown,bfcl:multiple]"


def test_several_test_sets_are_scored_and_summarised_apart(tmp_path, two_tasks, capsys):
    run = evaluate.run(cfg_for(tmp_path, SETS))
    df = pd.read_parquet(run / "results.parquet")
    assert df.groupby("test_set", sort=False).size().to_dict() == {"countdown:generated": 5, "bfcl:multiple": 3}
    fc = df[df.test_set == "bfcl:multiple"]
    assert fc.second_try_correct.tolist() == [True, False, False]          # SOLVE[1:4]: only the 1st is fixed
    # each set ran with its own task and prompts
    assert {(t, p) for t, p, _ in two_tasks.batches} == {
        ("countdown", compose(["task=countdown"]).prompts.system[:20]),
        ("function_calling", compose(["task=function_calling"]).prompts.system[:20])}
    s = json.loads((run / "summary.json").read_text())
    assert s["n"] == 8 and set(s["test_sets"]) == {"countdown:generated", "bfcl:multiple"}
    assert s["test_sets"]["countdown:generated"]["second_try"]["acc"] == pytest.approx(0.4)
    assert s["test_sets"]["bfcl:multiple"]["second_try"]["acc"] == pytest.approx(1 / 3)
    assert len(s["test_sets"]["bfcl:multiple"]["second_try"]["ci"]) == 2
    manifest = json.loads((run / "manifest.json").read_text())
    assert [(t["name"], t["task"], t["examples"]) for t in manifest["test_sets"]] == [
        ("countdown:generated", "countdown", 5), ("bfcl:multiple", "function_calling", 3)]
    assert (run / "parts" / "bfcl_multiple").is_dir() and not list((run / "parts").glob("part_*.parquet"))
    out = capsys.readouterr().out
    assert "bfcl:multiple (function_calling)" in out and "countdown:generated (countdown)" in out


def test_one_source_keeps_todays_layout(tmp_path, two_tasks):
    run = evaluate.run(cfg_for(tmp_path))
    assert list((run / "parts").glob("part_*.parquet"))
    s = json.loads((run / "summary.json").read_text())
    assert s["n"] == 5 and s["second_try"]["acc"] == pytest.approx(0.4) and list(s["test_sets"]) == ["countdown:generated"]
    assert set(pd.read_parquet(run / "results.parquet").test_set) == {"countdown:generated"}


def test_resume_with_several_sets_repeats_no_example(tmp_path, two_tasks):
    reference = pd.read_parquet(evaluate.run(cfg_for(tmp_path / "ref", SETS)) / "results.parquet")
    two_tasks.engine = FakeEngine(crash_on_call=11)       # countdown takes 10 calls; dies in bfcl:multiple
    with pytest.raises(CrashingEngine):
        evaluate.run(cfg_for(tmp_path / "a", SETS))
    run = next((tmp_path / "a" / "evaluate").iterdir())
    two_tasks.batches.clear()
    two_tasks.engine = FakeEngine()
    evaluate.run(cfg_for(tmp_path / "a", SETS, f"run_dir={run}"))
    assert [t for t, _, _ in two_tasks.batches] == ["function_calling"]
    pd.testing.assert_frame_equal(pd.read_parquet(run / "results.parquet"), reference)
    with pytest.raises(UserError, match="different settings"):
        evaluate.run(cfg_for(tmp_path / "a", "eval.test_sets=[countdown]", f"run_dir={run}"))


def test_compare_has_a_section_per_set_and_flags_what_was_trained_on(tmp_path, two_tasks):
    from rrr import report as compare

    train = tmp_path / "outputs" / "train" / "run1"
    train.mkdir(parents=True)
    (train / "config.yaml").write_text(OmegaConf.to_yaml(compose(["task=countdown"]), resolve=True))
    vanilla = evaluate.run(cfg_for(tmp_path / "v", SETS))
    trained = evaluate.run(cfg_for(tmp_path / "t", SETS, f"++model.path={train}/checkpoints/final"))
    out = compare.run([vanilla, trained], tmp_path / "cmp", n_boot=200)
    report = (out / "report.md").read_text()
    assert "# R3 comparison: 2 test sets" in report
    assert "## Test set countdown:generated" in report and "## Test set bfcl:multiple" in report
    assert "trained source (trained on countdown:generated)" in report
    assert "unseen task (trained on countdown:generated)" in report
    assert (out / "accuracy_countdown_generated.png").exists() and (out / "accuracy_bfcl_multiple.png").exists()
    table = pd.read_csv(out / "table.csv")
    assert table.groupby("test_set").size().to_dict() == {"bfcl:multiple": 2, "countdown:generated": 2}
    trained_rows = table[table.label == "trained"].set_index("test_set")
    assert trained_rows.relation.to_dict() == {"countdown:generated": "trained source", "bfcl:multiple": "unseen task"}
    assert table.set_index(["test_set", "label"]).loc[("bfcl:multiple", "vanilla"), "n"] == 3
    # a run that shares no set with the others is refused
    only_fc = evaluate.run(cfg_for(tmp_path / "o", "eval.test_sets=[bfcl:parallel,bfcl:simple_python]"))
    with pytest.raises(UserError, match="share no test set"):
        compare.run([vanilla, only_fc], tmp_path / "cmp2", n_boot=200)
