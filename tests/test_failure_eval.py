"""failure-eval: fixed held-out failures, R retries per failure and condition, the same seeds for every
model, clustered statistics, the vanilla/trained report and crash-safe resume (fake engine/task/rollout)."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import rrr.failure_eval as fe
import rrr.report.failures as report
from rrr.report import run as compare
import rrr.failures as failures
from fakes.failures import CrashingEngine, FakeEngine, FakeTask, fake_rollout, make_examples
from rrr.config import UserError, compose
from rrr.engines.base import derive_seed
from rrr.stats import clustered_se, min_detectable_effect
from rrr.verifiers import Verdict

R = 4
# Per query: attempt-1 successes of 2 samples (q0 is solved, so it is no failure), and how many of the R
# retries each condition fixes (retry g is correct iff g < count).
SOLVE = [
    {"attempt1": 2},
    {"attempt1": 0, "attempt2:model": 3, "attempt2:none": 1, "best_of_2": 2, "attempt2:generic": 0},
    {"attempt1": 1, "attempt2:model": 1, "attempt2:none": 1, "best_of_2": 0, "attempt2:generic": 4},
    {"attempt1": 0, "attempt2:model": 0, "attempt2:none": 2, "best_of_2": 0, "attempt2:generic": 1},
]


class StrictTask(FakeTask):
    def answer_in(self, example, text):             # q002's reflections leak an answer
        return example.fields["q"] == 2 and text.startswith("r ")

    def verify_strict(self, example, completion):
        ok = self.verify(example, completion).correct and not completion.endswith(":0")
        return Verdict(ok, "ok" if ok else "format")


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A held-out failure set collected by the fake collect-failures, and failure-eval on the fakes."""
    state = SimpleNamespace(task=StrictTask(make_examples(SOLVE)), engine=FakeEngine(), checked=[])
    monkeypatch.setitem(sys.modules, "rrr.rollout", fake_rollout)
    for module in (failures, fe):
        monkeypatch.setattr(module, "get_task", lambda name: state.task)
        monkeypatch.setattr(module, "build_generator", lambda cfg: (state.engine, None))
        monkeypatch.setattr(module, "model_provenance", lambda node: {"name": node.name, "path": node.get("path")})
    monkeypatch.setattr(fe, "check_prompts", lambda *a: state.checked.append(a))
    state.failures = failures.run(compose(["task=countdown", "model=tiny-random", f"out_root={tmp_path}",
                                           "data.split=test", "collect.samples_per_query=2",
                                           "collect.keep_attempts=2", "log.progress=false",
                                           f"run_dir={tmp_path / 'heldout'}"]))
    state.engine = FakeEngine()
    return state


def cfg_for(fake, tmp_path, *extra: str):
    return compose(["task=countdown", "model=tiny-random", f"out_root={tmp_path}", f"eval.failures={fake.failures}",
                    f"eval.reflections_per_failure={R}", "eval.bootstrap_samples=200", "eval.batch_queries=2",
                    "log.progress=false", *extra])


def test_fix_rates_are_means_of_R_retries_per_condition(fake, tmp_path, capsys):
    run = fe.run(cfg_for(fake, tmp_path))
    df = pd.read_parquet(run / "results.parquet")
    # q0 solved both times: no failure; q1 failed twice, q2 and q3 ... as stored (one attempt per query)
    assert df.pair_id.tolist() == ["q001#0", "q002#0", "q003#0"]
    assert df.reflection_fix_rate.tolist() == [0.75, 0.25, 0.0]
    assert df.retry_no_reflection_fix_rate.tolist() == [0.25, 0.25, 0.5]
    assert df.best_of_2_fix_rate.tolist() == [0.5, 0.0, 0.0]
    assert df.generic_reflection_fix_rate.tolist() == [0.0, 1.0, 0.25]
    assert [list(x) for x in df.reflection_correct] == [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert [len(x) for x in df.reflection_tokens] == [R] * 3
    # the reflections and the retries after them are kept apart
    assert list(df.reflection_texts[0]) == ["r " * 7] * R
    assert list(df.reflection_attempt2_texts[0]) == [f"attempt2:model:{g}" for g in range(R)]
    assert list(df.best_of_2_attempt2_texts[0]) == [f"best_of_2:{g}" for g in range(R)]
    assert [list(x) for x in df.reflection_leak] == [[False] * R, [True] * R, [False] * R]
    # strict: retry 0 is never in the leaderboard format here
    assert df.reflection_strict_fix_rate.tolist() == [0.5, 0.0, 0.0]
    s = json.loads((run / "summary.json").read_text())
    assert (s["n_failures"], s["n_queries"], s["R"]) == (3, 3, R)
    assert s["fix_rate"]["reflection"]["mean"] == pytest.approx(1 / 3)
    assert s["fix_rate"]["reflection"]["se"] == pytest.approx(np.std([0.75, 0.25, 0.0], ddof=1) / np.sqrt(3))
    d = s["within"]["reflection - retry_no_reflection"]
    assert d["delta"] == pytest.approx((0.5 + 0 - 0.5) / 3) and d["n"] == 3
    assert d["mde"] == pytest.approx(min_detectable_effect(clustered_se([0.5, 0.0, -0.5], [1, 2, 3])))
    assert s["failure_set"]["held_out"] == "held-out: test split" and s["failure_set"]["vanilla"]
    assert s["reflection"]["leak_share"] == pytest.approx(1 / 3) and s["reflection"]["tokens_mean"] == 7
    out = capsys.readouterr().out
    assert "3 failures of 3 queries (held-out: test split) · R = 4" in out and "33.3" in out


def test_several_stored_attempts_are_failures_clustered_by_query_with_their_own_seeds(fake, tmp_path):
    run = fe.run(cfg_for(fake, tmp_path, "eval.attempts_per_query=2"))
    df = pd.read_parquet(run / "results.parquet")
    assert df.pair_id.tolist() == ["q001#0", "q001#1", "q002#0", "q003#0", "q003#1"]
    s = json.loads((run / "summary.json").read_text())
    assert (s["n_failures"], s["n_queries"]) == (5, 3)
    # the stored attempt index is the seed step: attempt #1 of q001 gets other seeds than #0
    all_seeds = {x for call in fake.engine.seeds for per_prompt in call for x in per_prompt}
    assert {derive_seed(0, step, "q001", g, "attempt2") for step in (0, 1) for g in range(R)} <= all_seeds
    assert derive_seed(0, 1, "q002", 0, "attempt2") not in all_seeds          # q002 has one failure only
    assert {derive_seed(0, step, "q003", g, "best_of_2") for step in (0, 1) for g in range(R)} <= all_seeds


def test_vanilla_and_trained_see_the_same_failures_and_seeds(fake, tmp_path):
    vanilla = fe.run(cfg_for(fake, tmp_path / "v"))
    seeds, prompts = fake.engine.seeds, fake.engine.prompts
    fake.engine = FakeEngine()
    trained = fe.run(cfg_for(fake, tmp_path / "t", f"++model.path={tmp_path}/train/checkpoints/final"))
    assert fake.engine.seeds == seeds and fake.engine.prompts == prompts
    manifest = json.loads((trained / "manifest.json").read_text())
    assert manifest["model_label"] == "trained" and manifest["train_run"] == str(tmp_path / "train")
    comparison = report.compare_dirs(vanilla, trained, n_boot=200)
    head = comparison["headline"][0]
    assert (head["a"], head["b"], head["delta"], head["n"]) == ("trained reflection", "vanilla reflection", 0.0, 3)
    assert len(fake.checked) == 2           # each run checked the stored prompts against the rebuilt ones



def test_rrr_compare_puts_the_held_out_failure_comparison_first(fake, tmp_path, capsys):
    vanilla = fe.run(cfg_for(fake, tmp_path / "v"))
    trained = fe.run(cfg_for(fake, tmp_path / "t", f"++model.path={tmp_path}/train/checkpoints/final"))
    capsys.readouterr()
    out = compare([trained, vanilla], tmp_path / "report", n_boot=200)
    printed = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("run dir:")]
    assert printed[0] == "Held-out failures: 3 failures of 3 queries (fix rate = mean of R retries per failure; " \
        "95% CIs resample queries; pp)"
    assert printed[3].startswith("  vanilla  strict (leaderboard format): reflection 16.7")
    assert printed[5].startswith("  trained reflection − vanilla reflection: +0.0 [+0.0, +0.0]")
    md = (out / "report.md").read_text().splitlines()
    assert md[0] == "# Held-out failures (rrr failure-eval)" and md[3] == printed[0]
    saved = json.loads((out / "failure_eval.json").read_text())
    assert (saved["n_failures"], saved["vanilla"], saved["trained"]) == (3, str(vanilla), str(trained))
    with pytest.raises(UserError, match="one vanilla and one trained"):
        compare([vanilla, vanilla], tmp_path / "report2", n_boot=50)
    assert not (tmp_path / "report2").exists()


def test_resume_after_a_crash_repeats_no_failure(fake, tmp_path):
    fake.engine = FakeEngine(crash_on_call=5)      # batch 1 (2 failures): 4 engine calls; batch 2 crashes
    with pytest.raises(CrashingEngine):
        fe.run(cfg_for(fake, tmp_path, f"run_dir={tmp_path / 'fe'}"))
    fake.engine = FakeEngine()
    run = fe.run(cfg_for(fake, tmp_path, f"run_dir={tmp_path / 'fe'}"))
    assert {p[0] for p in fake.engine.prompts} == {1003}         # only q003 was left
    assert pd.read_parquet(run / "results.parquet").pair_id.tolist() == ["q001#0", "q002#0", "q003#0"]


@pytest.mark.parametrize("override, message", [
    ("eval.failures=null", "eval.failures is not set.*data.split=test"),
    ("eval.reflections_per_failure=0", "eval.reflections_per_failure must be >= 1"),
    ("eval.attempts_per_query=0", "eval.attempts_per_query must be >= 1"),
    ("eval.failures_limit=-1", "eval.failures_limit"),
])
def test_bad_settings_are_user_errors(fake, tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        fe.run(cfg_for(fake, tmp_path, override))


def test_a_training_failure_set_is_flagged_not_held_out(fake, tmp_path):
    manifest = json.loads((fake.failures / "manifest.json").read_text())
    (fake.failures / "manifest.json").write_text(json.dumps({**manifest, "split": "train"}))
    s = json.loads((fe.run(cfg_for(fake, tmp_path)) / "summary.json").read_text())
    assert s["failure_set"]["held_out"] == "NOT held out: train split"


# ----------------------------------------------------------------------------- vanilla vs trained, closed form

def frame(fix: dict[str, list[float]], queries: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"pair_id": [f"{q}#{i}" for i, q in enumerate(queries)], "example_id": queries,
                         **{f"{c}_fix_rate": v for c, v in fix.items()}})


def test_compare_runs_headline_deltas_and_mde():
    queries = ["a", "a", "b", "c", "d"]
    vanilla = frame({"reflection": [0.0, 0.25, 0.5, 0.0, 0.25], "retry_no_reflection": [0.0] * 5,
                     "best_of_2": [0.25, 0.25, 0.0, 0.0, 0.5]}, queries)
    trained = frame({"reflection": [0.5, 0.25, 0.75, 0.25, 0.25], "retry_no_reflection": [0.25] * 5,
                     "best_of_2": [0.0] * 5}, queries)
    c = report.compare_runs(vanilla, trained, n_boot=300)
    assert (c["n_failures"], c["n_queries"]) == (5, 4)
    h = {(x["a"], x["b"]): x for x in c["headline"]}
    primary = h[("trained reflection", "vanilla reflection")]
    d = np.array([0.5, 0.0, 0.25, 0.25, 0.0])
    assert primary["delta"] == pytest.approx(d.mean())
    assert primary["se"] == pytest.approx(clustered_se(d, queries))
    assert primary["mde"] == pytest.approx(2.801585 * clustered_se(d, queries), rel=1e-5)
    assert h[("trained reflection", "trained retry_no_reflection")]["delta"] == pytest.approx(0.4 - 0.25)
    assert h[("trained reflection", "vanilla best_of_2")]["delta"] == pytest.approx(0.4 - 0.2)
    assert c["trained_minus_vanilla"]["best_of_2"]["delta"] == pytest.approx(-0.2)
    assert c["fix_rate"]["vanilla"]["reflection"]["mean"] == pytest.approx(0.2)
    lines = report.report_lines(c)
    assert lines[0].startswith("Held-out failures: 5 failures of 4 queries")
    assert "vanilla" in lines[1] and "reflection 20.0" in lines[1]
    assert lines[3].startswith("  trained reflection − vanilla reflection: +20.0 [")
    assert f"MDE {100 * primary['mde']:.1f}" in lines[3]
    assert not any("strict" in line for line in lines)                      # no strict columns, no line


def test_report_carries_the_strict_fix_rates_beside_the_lenient_ones():
    v = frame({"reflection": [0.5, 0.0]}, ["a", "b"]).assign(reflection_strict_fix_rate=[0.25, 0.0])
    t = frame({"reflection": [0.5, 0.5]}, ["a", "b"]).assign(reflection_strict_fix_rate=[0.5, 0.0])
    lines = report.report_lines(report.compare_runs(v, t, n_boot=50))
    assert lines[3] == "  vanilla  strict (leaderboard format): reflection 12.5"
    assert lines[4] == "  trained  strict (leaderboard format): reflection 25.0"
    assert lines[5].startswith("  trained reflection − vanilla reflection: +25.0")


def test_compare_runs_drops_unscorable_failures_and_says_shown_only_when_ci_excludes_zero():
    queries = ["a", "b", "c", "d"]
    vanilla = frame({"reflection": [0.0, 0.0, 0.0, np.nan]}, queries)
    trained = frame({"reflection": [1.0, 1.0, 1.0, 1.0]}, queries)
    c = report.compare_runs(vanilla, trained, n_boot=200)
    primary = c["headline"][0]
    assert primary["n"] == 3 and primary["delta"] == 1.0 and primary["ci"] == [1.0, 1.0]
    assert "(shown; n = 3)" in report.report_lines(c)[3]
    same = report.compare_runs(vanilla, vanilla, n_boot=200)
    assert "(not shown; n = 3)" in report.report_lines(same)[3]


def test_compare_dirs_refuses_runs_that_are_not_paired(fake, tmp_path):
    a = fe.run(cfg_for(fake, tmp_path / "a"))
    b = fe.run(cfg_for(fake, tmp_path / "b", "eval.reflections_per_failure=2"))
    with pytest.raises(UserError, match="differ in R"):
        report.compare_dirs(a, b)
    with pytest.raises(UserError, match="not a failure-eval run"):
        report.compare_dirs(a, fake.failures)


def test_each_run_may_carry_only_the_controls_its_comparisons_need():
    queries = ["a", "b", "c"]
    vanilla = frame({"reflection": [0.0, 0.25, 0.5], "best_of_2": [0.5, 0.5, 0.5]}, queries)
    trained = frame({"reflection": [0.5, 0.5, 0.5], "retry_no_reflection": [0.25, 0.25, 0.25]}, queries)
    c = report.compare_runs(vanilla, trained, n_boot=100)
    assert [(h["a"], h["b"]) for h in c["headline"]] == [
        ("trained reflection", "vanilla reflection"), ("trained reflection", "trained retry_no_reflection"),
        ("trained reflection", "vanilla best_of_2")]
    assert [h["delta"] for h in c["headline"]] == pytest.approx([0.25, 0.25, 0.0])
    assert list(c["trained_minus_vanilla"]) == ["reflection"]
    assert list(c["fix_rate"]["trained"]) == ["reflection", "retry_no_reflection"]


def test_compare_runs_refuses_different_failures():
    with pytest.raises(UserError, match="different failures"):
        report.compare_runs(frame({"reflection": [0.0]}, ["a"]), frame({"reflection": [0.0]}, ["b"]))
