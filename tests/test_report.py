"""rrr.report end to end through `rrr compare` on hand-made evaluate runs: the table, paired deltas and
plots, pairing by example id, refusals of incomparable runs, the pre-registered comparisons and the
training summary."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from typer.testing import CliRunner

from rrr import report
from rrr.cli import app
from rrr.config import UserError

N = 120
IDS = [f"ex{i:04d}" for i in range(N)]


def _sha(ids):
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def make_eval_run(root: Path, name: str, model: str, label: str, first, second, *, task="countdown",
                  split="test", ids=IDS, train_run=None, shuffle=False, controls=None, sha=None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    first, second = np.asarray(first, bool), np.asarray(second, bool) | np.asarray(first, bool)
    df = pd.DataFrame({"example_id": ids, "attempt1_correct": first,
                       "attempt2_correct": np.where(first, np.nan, second.astype(float)),
                       "second_try_correct": second, "attempt1_text": "x", "reflection_text": "y",
                       "reflection_tokens": np.where(first, np.nan, 40.0)})
    controls = controls if controls is not None else {c: first for c in report.CONTROLS}
    for c, v in controls.items():
        df[f"{c}_correct"] = np.asarray(v, bool) | first
    if shuffle:
        df = df.sample(frac=1.0, random_state=0)
    df.to_parquet(run / "results.parquet", index=False)
    OmegaConf.save(OmegaConf.create({"task": {"name": task}, "model": {"name": model, "path": None},
                                     "eval": {"split": split, "limit": len(ids)}, "seed": 0}),
                   run / "config.yaml")
    (run / "manifest.json").write_text(json.dumps({
        "command": "evaluate", "examples_sha256": sha or _sha(ids),
        "train_run": str(train_run) if train_run else None, "model_label": label}))
    (run / "summary.json").write_text(json.dumps({
        "n": len(ids), "task": task, "model": model, "label": label,
        "reflection": {"tokens_mean": 41.5, "tokens_p50": 40.0, "tokens_p95": 77.0,
                       "truncated_share": 0.05, "distinct_3gram_ratio": 0.93}}))
    return run


def make_train_run(root: Path, steps=40) -> Path:
    run = root / "train"
    run.mkdir(parents=True)
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "reward_mean": min(0.9, 0.1 + 0.02 * s), "loss": 0.1,
                                "reflection_len_mean": 90 - s, "frac_zero_std": 0.5, "kl": 0.001}) + "\n")
    return run


def outcomes(seed, p):
    return np.random.default_rng(seed).random(N) < p


@pytest.fixture
def paper_like(tmp_path):
    """Model A vanilla and trained (trained solves everything vanilla did, plus more), and a bigger
    vanilla comparator B."""
    train = make_train_run(tmp_path)
    v1 = outcomes(0, 0.3)
    t1 = v1 | outcomes(1, 0.2)
    runs = [
        make_eval_run(tmp_path, "a-vanilla", "model-a", "vanilla", v1, outcomes(2, 0.1)),
        make_eval_run(tmp_path, "a-trained", "model-a", "trained", t1, outcomes(3, 0.3), train_run=train,
                      shuffle=True),
        make_eval_run(tmp_path, "b-vanilla", "model-b", "vanilla", outcomes(4, 0.5), outcomes(5, 0.1)),
    ]
    return runs, v1, t1


def test_report_table_deltas_and_plots(tmp_path, paper_like, capsys):
    runs, v1, t1 = paper_like
    out = report.run(runs, tmp_path / "cmp")

    table = pd.read_csv(out / "table.csv").set_index("run")
    assert list(table.index) == ["model-a vanilla", "model-a trained", "model-b vanilla"]
    assert table.loc["model-a vanilla", "first_try"] == pytest.approx(v1.mean())
    assert table.loc["model-a trained", "first_try"] == pytest.approx(t1.mean())
    for key in report.METRICS:
        assert (table[f"{key}_lo"] <= table[key]).all() and (table[key] <= table[f"{key}_hi"]).all()

    deltas = pd.read_csv(out / "deltas.csv")
    tv = deltas[deltas.comparison == "trained - vanilla"]
    assert len(tv) == 1  # model-b has no trained run
    row = tv.iloc[0]
    assert row.first_try == pytest.approx(t1.mean() - v1.mean())
    assert 0 < row.first_try_lo < row.first_try < row.first_try_hi  # trained ⊇ vanilla: CI excludes 0
    gaps = deltas[deltas.comparison == "2nd try - control"]
    assert len(gaps) == 3 and (gaps.best_of_2 >= 0).all()  # controls here solve only what attempt 1 did

    md = (out / "report.md").read_text()
    assert "| model | label | n | 1st try | 2nd try | best-of-2 |" in md
    assert f"{100 * v1.mean():.1f} [" in md
    assert "Trained − vanilla" in md and "2nd try − best-of-2" in md
    for png in ("accuracy.png", "train_reward.png", "reflection_length.png"):
        assert (out / png).stat().st_size > 10_000
        assert f"]({png})" in md
    printed = capsys.readouterr().out
    assert "| model-a | trained |" in printed and f"report: {out / 'report.md'}" in printed


def test_rows_are_paired_by_example_id_not_by_row_order(tmp_path):
    first = outcomes(7, 0.5)
    a = make_eval_run(tmp_path, "v", "m", "vanilla", first, first)
    b = make_eval_run(tmp_path, "t", "m", "trained", first, first, shuffle=True)
    out = report.run([a, b], tmp_path / "cmp")
    row = pd.read_csv(out / "deltas.csv").iloc[0]
    assert (row.first_try, row.first_try_lo, row.first_try_hi) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("change, words", [
    ({"task": "function_calling"}, "task"),
    ({"split": "train"}, "split"),
    ({"ids": IDS[:-1] + ["other"]}, "different example sets"),
    ({"sha": "f" * 64}, "examples_sha256"),
])
def test_refuses_runs_that_are_not_comparable(tmp_path, change, words):
    first = outcomes(8, 0.5)
    a = make_eval_run(tmp_path, "a", "m", "vanilla", first, first)
    b = make_eval_run(tmp_path, "b", "m", "trained", first, first, **change)
    with pytest.raises(UserError, match=words) as err:
        report.run([a, b], tmp_path / "cmp")
    assert str(a) in str(err.value) and str(b) in str(err.value)
    assert not (tmp_path / "cmp").exists()


def test_refuses_a_directory_that_is_not_an_evaluate_run(tmp_path):
    train = make_train_run(tmp_path)
    with pytest.raises(UserError, match="not an evaluate run"):
        report.run([train], tmp_path / "cmp")


def test_cli_prints_one_line_error(tmp_path):
    first = outcomes(9, 0.5)
    a = make_eval_run(tmp_path, "a", "m", "vanilla", first, first)
    b = make_eval_run(tmp_path, "b", "m", "vanilla", first, first, task="function_calling")
    result = CliRunner().invoke(app, ["compare", str(a), str(b), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 1
    assert "not comparable" in result.output and "Traceback" not in result.output


def test_without_train_runs_there_are_no_training_plots(tmp_path):
    first = outcomes(10, 0.4)
    a = make_eval_run(tmp_path, "a", "m", "vanilla", first, first)
    b = make_eval_run(tmp_path, "b", "m", "trained", first, first, train_run=tmp_path / "gone")
    out = report.run([a, b], tmp_path / "cmp")
    assert (out / "accuracy.png").exists()
    assert not (out / "train_reward.png").exists() and not (out / "reflection_length.png").exists()
    assert "has no metrics.jsonl" in (out / "report.md").read_text()


def test_missing_control_shows_as_dash_and_duplicate_labels_get_unique_names(tmp_path):
    first = outcomes(11, 0.4)
    a = make_eval_run(tmp_path, "t1", "m", "trained", first, first, controls={"best_of_2": first})
    b = make_eval_run(tmp_path, "t2", "m", "trained", first, first, controls={"best_of_2": first})
    out = report.run([a, b], tmp_path / "cmp")
    table = pd.read_csv(out / "table.csv")
    assert list(table.run) == ["m trained (t1)", "m trained (t2)"]
    assert table.generic_reflection.isna().all() and table.best_of_2.notna().all()
    assert "| — |" in (out / "report.md").read_text()


def test_preregistered_deltas_pair_the_right_runs_and_metrics(tmp_path, capsys):
    """trained 2nd − vanilla best-of-2, trained 2nd − trained retry-no-reflection, trained 1st − vanilla 1st:
    each equals the mean per-example difference of exactly those columns."""
    v1, t1 = outcomes(20, 0.3), outcomes(21, 0.4)
    v_best, t_retry = outcomes(22, 0.5), outcomes(23, 0.45)
    t_second = outcomes(24, 0.6)
    train = make_train_run(tmp_path, steps=4)
    v = make_eval_run(tmp_path, "v", "m", "vanilla", v1, v1, controls={c: v_best for c in report.CONTROLS})
    t = make_eval_run(tmp_path, "t", "m", "trained", t1, t_second, train_run=train, shuffle=True,
                      controls={**{c: t1 for c in report.CONTROLS}, "retry_no_reflection": t_retry})
    out = report.run([v, t], tmp_path / "cmp", note="Too small to measure an effect.")
    pre = pd.read_csv(out / "preregistered.csv").set_index("comparison")
    assert list(pre.index) == [p[0] for p in report.PREREGISTERED]
    expect = [(t_second | t1).mean() - (v_best | v1).mean(), (t_second | t1).mean() - (t_retry | t1).mean(),
              t1.mean() - v1.mean()]
    for (title, *_), value in zip(report.PREREGISTERED, expect):
        row = pre.loc[title]
        assert row.delta == pytest.approx(value)
        assert row.delta_lo <= row.delta <= row.delta_hi
    md = (out / "report.md").read_text()
    assert "Pre-registered comparisons" in md and "Too small to measure an effect." in md
    printed = capsys.readouterr().out
    assert "trained 2nd try − vanilla best-of-2" in printed and "Too small to measure an effect." in printed


def test_training_summary_counts_updates_with_gradient(tmp_path, capsys):
    run = tmp_path / "train"
    run.mkdir()
    rows = [{"step": 1, "grad_norm": 0.0, "mixed_groups": 0, "groups": 2, "reward_mean": 0.0},
            {"step": 2, "grad_norm": 0.31, "mixed_groups": 1, "groups": 2, "reward_mean": 0.5},
            {"step": 3, "grad_norm": 0.12, "mixed_groups": 2, "groups": 2, "reward_mean": 0.5},
            {"step": 4, "grad_norm": 0.002, "mixed_groups": 0, "groups": 2, "reward_mean": 0.0}]   # KL only
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = outcomes(25, 0.5)
    v = make_eval_run(tmp_path, "v", "m", "vanilla", first, first)
    t = make_eval_run(tmp_path, "t", "m", "trained", first, first, train_run=run)
    out = report.run([v, t], tmp_path / "cmp")
    line = "2 of 4 updates carried gradient (a mixed-reward group, grad norm > 0); mixed-reward groups 3 of 8"
    assert line in capsys.readouterr().out and line in (out / "report.md").read_text()


def test_cli_passes_the_note(tmp_path):
    first = outcomes(26, 0.5)
    a = make_eval_run(tmp_path, "a", "m", "vanilla", first, first)
    result = CliRunner().invoke(app, ["compare", str(a), "--out", str(tmp_path / "cmp"), "--note", "hello note"])
    assert result.exit_code == 0, result.output
    assert "hello note" in (tmp_path / "cmp" / "report.md").read_text()
