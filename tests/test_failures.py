"""collect-failures: rows, summary, crash-safe resume, and the trainer's loader (fake engine/task/rollout)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest

import rrr.failures as failures
from fakes.failures import CrashingEngine, FakeEngine, FakeTask, fake_rollout, make_examples
from rrr.config import UserError, compose
from rrr.engines.base import Sample
from rrr.verifiers import VERIFIER_VERSION, Verdict

# correct samples out of 4 per query: q1 always solved, q0 never
SOLVE = [{"attempt1": k} for k in (0, 4, 2, 1, 3)]


@pytest.fixture
def fake(monkeypatch):
    """Route the pipeline to a fake task, rollout and engine; `fake.engine` is replaced per run."""
    state = SimpleNamespace(task=FakeTask(make_examples(SOLVE)), engine=FakeEngine(), builds=0)

    def build_generator(cfg):
        state.builds += 1
        return state.engine, None

    monkeypatch.setitem(__import__("sys").modules, "rrr.rollout", fake_rollout)
    monkeypatch.setattr(failures, "get_task", lambda name: state.task)
    monkeypatch.setattr(failures, "build_generator", build_generator)
    monkeypatch.setattr(failures, "model_provenance", lambda node: {"name": node.name})
    return state


def cfg_for(tmp_path, *extra: str):
    return compose(["task=countdown", "model=tiny-random", f"out_root={tmp_path}", "data.limit=5",
                    "collect.samples_per_query=4", "collect.keep_attempts=2", "collect.batch_queries=2",
                    "log.progress=false", *extra])


def attempt(ok: bool, ids: list[int], truncated: bool = False):
    return SimpleNamespace(sample=Sample(ids, finish_reason="length" if truncated else "stop"),
                           text=f"t{ids[0]}", verdict=Verdict(ok, "ok" if ok else f"bad{ids[0]}"))


def test_query_row_keeps_the_first_failed_attempts_in_sample_order():
    ex = make_examples([{}])[0]
    atts = [attempt(False, [1]), attempt(True, [2]), attempt(False, [3], truncated=True), attempt(False, [4])]
    row = failures.query_row(ex, atts, [9, 9], keep=2)
    assert (row["n_samples"], row["n_correct"], row["pass_rate"]) == (4, 1, 0.25)
    assert row["failed_token_ids"] == [[1], [3]]
    assert row["failed_texts"] == ["t1", "t3"]
    assert row["failed_reasons"] == ["bad1", "bad3"]
    assert row["failed_truncated"] == [False, True]
    assert row["prompt_token_ids"] == [9, 9]
    assert json.loads(row["fields"]) == ex.fields


def test_unscorable_attempts_are_neither_passes_nor_kept_failures():
    from rrr.rollout import UNSCORABLE

    crashed = SimpleNamespace(sample=Sample([5]), text="t5", verdict=UNSCORABLE)
    row = failures.query_row(make_examples([{}])[0], [crashed, attempt(True, [2]), attempt(False, [3])], [9], 4)
    assert (row["n_samples"], row["n_correct"], row["n_unscorable"], row["pass_rate"]) == (2, 1, 1, 0.5)
    assert row["failed_token_ids"] == [[3]]


def test_collect_writes_failures_summary_and_provenance(tmp_path, fake, capsys):
    run = failures.run(cfg_for(tmp_path))
    df = pd.read_parquet(run / "failures.parquet")
    assert df.id.tolist() == ["q000", "q002", "q003", "q004"]          # q001 is always solved
    assert df.n_correct.tolist() == [0, 2, 1, 3] and set(df.n_samples) == {4}
    q2 = df.set_index("id").loc["q002"]
    assert [list(t) for t in q2.failed_token_ids] == [[1002, 102], [1002, 103]]
    assert list(q2.failed_texts) == ["attempt1:2", "attempt1:3"]
    assert list(df.set_index("id").loc["q000"].failed_truncated) == [False, True]   # sample 1 hit max_tokens
    assert len(pd.read_parquet(run / "all_queries.parquet")) == 5

    summary = json.loads((run / "summary.json").read_text())
    assert summary["pass_at_1"] == pytest.approx((0 + 1 + 0.5 + 0.25 + 0.75) / 5)
    assert (summary["never_solved"], summary["always_solved"], summary["kept"]) == (0.2, 0.2, 4)
    assert summary["generated_tokens"] == 5 * 4 * 2                   # queries × samples × 2 fake tokens
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["command"] == "collect-failures"
    assert manifest["verifier_version"] == VERIFIER_VERSION
    assert manifest["sampling"] == {"max_tokens": 512, "temperature": 1.0, "top_p": 1.0}
    assert manifest["summary"]["kept"] == 4 and len(manifest["examples_sha256"]) == 64
    assert "pass@1 0.500" in capsys.readouterr().out


def test_resume_after_a_crash_loses_and_repeats_nothing(tmp_path, fake):
    reference = pd.read_parquet(failures.run(cfg_for(tmp_path / "ref")) / "failures.parquet")

    fake.engine = FakeEngine(crash_on_call=2)      # dies on the second chunk
    with pytest.raises(CrashingEngine):
        failures.run(cfg_for(tmp_path / "a"))
    run = next((tmp_path / "a" / "collect-failures").iterdir())
    assert len(list((run / "parts").glob("part_*.parquet"))) == 1 and not (run / "failures.parquet").exists()

    fake.engine = FakeEngine()
    failures.run(cfg_for(tmp_path / "a", f"run_dir={run}"))
    assert [p[0] for p in fake.engine.prompts] == [1002, 1003, 1004]   # only the queries not yet done
    resumed = pd.read_parquet(run / "failures.parquet")
    assert resumed.id.is_unique
    pd.testing.assert_frame_equal(resumed, reference)

    builds = fake.builds
    failures.run(cfg_for(tmp_path / "a", f"run_dir={run}"))          # nothing left: no model is loaded
    assert fake.builds == builds


def test_resume_refuses_different_settings(tmp_path, fake):
    run = failures.run(cfg_for(tmp_path))
    with pytest.raises(UserError, match="samples_per_query"):
        failures.run(cfg_for(tmp_path, f"run_dir={run}", "collect.samples_per_query=8"))
    (tmp_path / "train_run").mkdir()
    (tmp_path / "train_run" / "manifest.json").write_text('{"command": "train"}')
    with pytest.raises(UserError, match="'train' run"):
        failures.run(cfg_for(tmp_path, f"run_dir={tmp_path / 'train_run'}"))


def test_load_failures_returns_examples_and_stored_attempts(tmp_path, fake):
    examples, attempts = failures.load_failures(failures.run(cfg_for(tmp_path)))
    assert [e.id for e in examples] == ["q000", "q002", "q003", "q004"]
    assert examples[1] == fake.task.examples[2]
    assert attempts[1]["token_ids"] == [[1002, 102], [1002, 103]]
    assert all(type(t) is int for t in attempts[1]["token_ids"][0])
    assert attempts[1]["reasons"] == ["wrong attempt1", "wrong attempt1"]
    assert attempts[1]["pass_rate"] == 0.5 and attempts[1]["prompt_token_ids"] == [1002, 7]


def test_load_failures_of_an_unfinished_run_says_how_to_continue(tmp_path):
    (tmp_path / "parts").mkdir()
    with pytest.raises(UserError, match="run_dir="):
        failures.load_failures(tmp_path)


@pytest.mark.parametrize("key", ["collect.samples_per_query=0", "collect.keep_attempts=0"])
def test_bad_budgets_are_user_errors(tmp_path, fake, key):
    with pytest.raises(UserError):
        failures.run(cfg_for(tmp_path, key))


def test_cli_end_to_end_on_tiny_random(tmp_path):
    from typer.testing import CliRunner

    from rrr.cli import app

    result = CliRunner().invoke(app, [
        "collect-failures", "task=countdown", "model=tiny-random", "model.device=cpu", "engine=hf",
        "data.limit=3", "collect.samples_per_query=2", "collect.max_tokens=8", "collect.batch_queries=2",
        "log.progress=false", f"out_root={tmp_path}"])
    assert result.exit_code == 0, result.output
    run = next((tmp_path / "collect-failures").iterdir())
    df = pd.read_parquet(run / "failures.parquet")
    assert len(df) == 3 and set(df.n_samples) == {2}     # a random model solves nothing
    assert {"id", "task", "source", "fields", "pass_rate", "failed_texts", "failed_token_ids",
            "failed_reasons", "failed_truncated", "prompt_token_ids"} <= set(df.columns)
    assert len(list((run / "parts").glob("part_*.parquet"))) == 2
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["model"]["source"] == "random" and manifest["engine"]["name"] == "hf"
    examples, attempts = failures.load_failures(run)
    assert len(examples) == 3 and all(len(ids) <= 8 for ids in attempts[0]["token_ids"])
    assert "pass@1 0.000" in result.output
