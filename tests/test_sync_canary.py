"""The post-sync canary `sync/logprob_diff` (issue #22, item 4): what the logged number is, end to end.

A sampler whose log-probs are the model's plus a known per-token offset makes the statistic known in
advance: the mean |offset| over the step's loss tokens (reflection tokens of untruncated reflections),
whatever the micro-batching. Below `engine.max_logprob_diff` the run goes on; above it, or NaN/inf, it
stops in one line. The expected value is computed from the episodes the run wrote, not by the trainer's
own functions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fakes import trainer as trainer_fakes
from rrr import sync, trainer
from rrr.config import UserError, compose
from rrr.episode import Segment

torch.set_num_threads(1)


def config(failures: Path, run: Path, *extra: str):
    return compose(["task=countdown", "model=tiny-random", f"train.failures={failures}", f"run_dir={run}",
                    "train.steps=2", "train.batch_queries=2", "train.group_size=4", "train.micro_batch_size=3",
                    "train.save_every=2", "train.lr=0.01", "train.warmup_steps=0", "log.progress=false",
                    "log.episodes_every=1", *[f"train.sampling.{s}.max_tokens=8" for s in
                                              ("attempt1", "reflection", "attempt2")], *extra])


def offset(delta: float):
    """Sampler log-prob = model's − δ on even token indices, + 3δ on odd ones: a sum, a mean of
    micro-batch means or a signed mean would not give the mean |gap| per token."""
    return lambda i: -delta if i % 2 == 0 else 3 * delta


def expected_diff(run: Path, step: int, delta: float) -> float:
    """Mean |offset| over the step's loss tokens, from the episodes parquet (reflections not truncated)."""
    episodes = pd.read_parquet(run / "episodes" / f"step_{step:05d}.parquet")
    gaps = [abs(offset(delta)(i)) for _, ep in episodes.iterrows() if not ep.reflection_truncated
            for i in range(int((np.asarray(ep.segment_ids) == Segment.REFLECTION).sum()))]
    assert len(gaps) >= 8 and 0 < np.mean([g > delta * 1.5 for g in gaps]) < 1   # both offsets occur
    return float(np.mean(gaps))


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def install_shifted(monkeypatch, shift) -> None:
    trainer_fakes.install(monkeypatch, trainer, canary=True)
    monkeypatch.setattr(trainer, "build_engine", lambda cfg, model, tok: trainer_fakes.ShiftedEngine(model, tok, shift))


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_logged_statistic_is_the_mean_gap_per_loss_token_and_a_gap_under_the_limit_runs(
        tmp_path, failures, monkeypatch, finetune):
    delta = 0.01                                     # mean |offset| between 0.01 and 0.03 < 0.05
    install_shifted(monkeypatch, offset(delta))
    run = trainer.run(config(failures, tmp_path / "run", f"train.finetune={finetune}", "engine.max_logprob_diff=0.05"))
    log = rows(run)
    assert [r["step"] for r in log] == [1, 2]       # step 2 samples the updated weights: the sync worked
    for r in log:
        want = expected_diff(run, r["step"], delta)
        assert r["sync/logprob_diff"] == pytest.approx(want, abs=1e-4) and r["sampler_logp_diff"] == r["sync/logprob_diff"]


def test_a_gap_over_the_limit_stops_the_run_in_one_line(tmp_path, failures, monkeypatch):
    delta = 0.05                                     # mean |offset| between 0.05 and 0.15, limit 0.04
    install_shifted(monkeypatch, offset(delta))
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"^step 1: sync/logprob_diff=\S+ > engine.max_logprob_diff=0.04: ") as e:
        trainer.run(config(failures, run, "engine.max_logprob_diff=0.04"))
    assert "\n" not in str(e.value)
    (row,) = rows(run)
    assert row["sync/logprob_diff"] == pytest.approx(expected_diff(run, 1, delta), abs=1e-4)


def test_a_nan_gap_stops_the_run_in_one_line_even_with_the_limit_off(tmp_path, failures, monkeypatch):
    install_shifted(monkeypatch, lambda i: math.nan if i == 0 else 0.0)
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"^step 1: sync/logprob_diff=nan: .* not finite") as e:
        trainer.run(config(failures, run, "engine.max_logprob_diff=null"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("diff", [math.nan, math.inf, -math.inf])
def test_non_finite_statistics_always_stop(diff):
    for limit in (0.05, 1e9, None):
        with pytest.raises(UserError, match="not finite"):
            sync.check_logprob_diff(3, diff, limit)


def test_the_limit_is_inclusive_and_none_turns_the_size_check_off():
    sync.check_logprob_diff(1, 0.05, 0.05)
    sync.check_logprob_diff(1, 10.0, None)
    with pytest.raises(UserError, match="> engine.max_logprob_diff=0.05"):
        sync.check_logprob_diff(1, 0.0501, 0.05)
