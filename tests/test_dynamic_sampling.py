"""Dynamic sampling (train.zero_std=dynamic) and the reflection-length control (train.overlong_buffer):
the cursor's per-query statistics and their resume, the draw loop with a fake rollout whose outcome
depends on the query, the overlong penalty in closed form, and a tiny-random run that logs draws."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fakes import trainer as trainer_fakes
from rrr.train_log import TIMING_KEYS
from rrr import grpo, train_log, trainer
from rrr.config import UserError, compose
from rrr.failure_set import FailureCursor

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- the cursor's statistics

def test_weights_are_the_posterior_mean_mixing_rate():
    c = FailureCursor(n=3, seed=0)
    assert c.weights().tolist() == [0.5, 0.5, 0.5]
    for mixed in (False, False, False):
        c.record(0, mixed)
    c.record(1, True), c.record(1, False)
    assert c.weights().tolist() == pytest.approx([1 / 5, 2 / 4, 1 / 2])
    assert (c.tries, c.mixes) == ([3, 2, 0], [0, 1, 0])


def test_a_query_that_never_mixes_is_drawn_less_but_never_excluded():
    c = FailureCursor(n=4, seed=1)
    for _ in range(8):
        c.record(0, False)                      # weight 1/10 against 1/2 for the others
    counts = np.bincount([i for _ in range(2000) for i in c.draw_weighted(1)], minlength=4)
    assert 0 < counts[0] < counts[1:].min() / 3
    assert counts[0] == pytest.approx(2000 * 0.1 / 1.6, rel=0.25)


def test_weighted_draws_are_distinct_avoid_exclusions_and_replay_from_state():
    c = FailureCursor(n=6, seed=2)
    c.record(3, True)
    first = c.draw_weighted(3, exclude=[0, 1])
    assert len(set(first)) == 3 and not {0, 1} & set(first)
    assert sorted(c.draw_weighted(10, exclude=[0, 1, 2])) == [3, 4, 5]   # capped by what is left
    assert c.draw_weighted(2, exclude=range(6)) == []
    saved = json.loads(json.dumps(c.state()))
    later = [c.draw_weighted(2) for _ in range(5)]
    resumed = FailureCursor.from_state(saved)
    assert (resumed.tries, resumed.mixes) == (c.tries, c.mixes)
    assert [resumed.draw_weighted(2) for _ in range(5)] == later


def test_a_checkpoint_from_before_dynamic_sampling_still_resumes():
    old = {"n": 3, "seed": 0, "epoch": 1, "index": 2, "held_back": [1]}
    c = FailureCursor.from_state(old)
    assert (c.epoch, c.index, c.held_back, c.tries, c.mixes, c.weighted_draws) == (1, 2, (1,), [0] * 3, [0] * 3, 0)
    with pytest.raises(ValueError, match="statistics cover"):
        FailureCursor(n=3, seed=0, tries=[1, 2])


# ----------------------------------------------------------------------------- the draw loop

# Which queries ever give a mixed group (the fake rollout's outcome depends only on the query).
MIXES = {"q0": True, "q1": False, "q2": False, "q3": True, "q4": False, "q5": False}


def episode(reward: float, length: int = 3, truncated: bool = False):
    return SimpleNamespace(reward=reward, texts={"reflection": "r"}, reflection_length=length,
                           truncated={"reflection": truncated})


@pytest.fixture
def fake_rollout(monkeypatch):
    calls: list[list[str]] = []

    def reflect_retry(ctx, queries, attempts1, step, seed=None):
        calls.append([q.id for q in queries])
        return [[episode(1.0), episode(0.0)] if MIXES[q.id] else [episode(0.0), episode(0.0)] for q in queries]

    monkeypatch.setattr(trainer, "reflect_retry", reflect_retry)
    examples = [SimpleNamespace(id=q) for q in MIXES]
    stored = [{"token_ids": [[1]], "truncated": [False], "reasons": ["wrong"]} for _ in examples]
    ctx = trainer.Rollouts(None, None, SimpleNamespace(answer_in=lambda ex, text: False), None, {}, seed=0,
                           group_size=2, leak="keep")
    return SimpleNamespace(calls=calls, examples=examples, stored=stored, ctx=ctx)


def test_draws_further_queries_until_the_step_holds_its_mixed_groups(fake_rollout):
    f = fake_rollout
    cursor = FailureCursor(n=len(f.examples), seed=0)
    queries, attempts1, groups, rewards, stats, draws = trainer.dynamic_sampling(
        f.ctx, cursor, f.examples, f.stored, "stored", want=2, max_draws=10, step=1)
    drawn = [q for call in f.calls for q in call]
    assert len(drawn) == len(set(drawn))                       # no query twice in a step
    assert [q.id for q in queries] == drawn and len(groups) == len(drawn) == rewards.shape[0]
    mixed = (~grpo.zero_std_groups(rewards)).sum().item()
    assert mixed == 2 and {"q0", "q3"} <= set(drawn)           # both mixable queries found
    assert draws == len(f.calls) and all(len(c) <= 2 for c in f.calls)
    assert [len(c) for c in f.calls][0] == 2                    # first draw: the whole batch
    assert sum(cursor.tries) == len(drawn) and sum(cursor.mixes) == 2
    assert stats == {"attempt1_pass_rate": None, "scored_attempt1": 0, "unscorable_attempt1": 0}


def test_max_draws_bounds_the_loop(fake_rollout):
    f = fake_rollout
    cursor = FailureCursor(n=len(f.examples), seed=0)
    *_, rewards, _, draws = trainer.dynamic_sampling(f.ctx, cursor, f.examples, f.stored, "stored", want=3,
                                                     max_draws=2, step=1)
    assert draws == 2 and len(f.calls) == 2
    # only 2 queries ever mix: with want = 3 the loop stops at the bound, or when the set runs out
    f.calls.clear()
    *_, draws = trainer.dynamic_sampling(f.ctx, FailureCursor(n=6, seed=0), f.examples, f.stored, "stored",
                                         want=3, max_draws=50, step=1)
    assert sorted(q for c in f.calls for q in c) == sorted(MIXES) and draws == len(f.calls) + 1


def test_statistics_steer_later_steps_away_from_queries_that_never_mix(fake_rollout):
    f = fake_rollout
    cursor = FailureCursor(n=len(f.examples), seed=0)
    for step in range(1, 41):
        trainer.dynamic_sampling(f.ctx, cursor, f.examples, f.stored, "stored", want=1, max_draws=6, step=step)
    first_draws = [c for c in f.calls]
    late = [q for c in first_draws[-40:] for q in c]
    assert cursor.weights()[0] > 3 * cursor.weights()[1]
    assert sum(q in ("q0", "q3") for q in late) / len(late) > 0.5       # uniform would give 1/3


# ----------------------------------------------------------------------------- reflection-length control

def test_overlong_penalty_closed_form():
    lengths = torch.tensor([[10, 24, 28, 32], [31, 32, 5, 0]])
    truncated = torch.tensor([[False, False, False, False], [False, True, True, False]])
    p = grpo.overlong_penalty(lengths, truncated, max_tokens=32, buffer=8, factor=0.5)
    # ramp from 24 (0) to 32 (0.5); truncated = 0.5 whatever the length
    assert torch.allclose(p, torch.tensor([[0.0, 0.0, 0.25, 0.5], [0.4375, 0.5, 0.5, 0.0]]))
    assert grpo.overlong_penalty(lengths, truncated, 32, 0).abs().sum() == 0


def test_length_penalty_shapes_advantages_but_not_mixedness():
    groups = [[episode(1.0, 4), episode(1.0, 31)], [episode(0.0, 4), episode(1.0, 10)]]
    pen = trainer.length_penalty(groups, 2, max_tokens=32, buffer=8, factor=1.0)
    assert torch.allclose(pen, torch.tensor([[0.0, 7 / 8], [0.0, 0.0]]))
    rewards = trainer.group_rewards(groups, 2)
    assert grpo.zero_std_groups(rewards).tolist() == [True, False]          # mixed by the verifier only
    adv = grpo.group_advantages(rewards - pen)
    assert adv[0, 0] > 0 > adv[0, 1]                                        # the shorter reflection wins


@pytest.mark.parametrize("override, message", [
    ("train.max_draws=0", "train.max_draws"),
    ("train.overlong_buffer=200", "train.overlong_buffer"),
    ("train.overlong_penalty=-1", "train.overlong_buffer"),
])
def test_bad_dynamic_settings_are_user_errors(tmp_path, override, message):
    from rrr.train_setup import validate

    cfg = compose(["task=countdown", "model=tiny-random", "train.zero_std=dynamic", override])
    with pytest.raises(UserError, match=message):
        validate(cfg)


# ----------------------------------------------------------------------------- a real (tiny) run

TIMING = TIMING_KEYS


def dynamic_config(failures, run, *extra):
    return compose(["task=countdown", "model=tiny-random", f"train.failures={failures}", f"run_dir={run}",
                    "train.steps=3", "train.batch_queries=2", "train.group_size=4", "train.micro_batch_size=4",
                    "train.save_every=1", "train.lr=0.01", "train.warmup_steps=0", "train.zero_std=dynamic",
                    "train.max_draws=3", "train.overlong_buffer=4", "train.sampling.attempt1.max_tokens=8",
                    "train.sampling.reflection.max_tokens=8", "train.sampling.attempt2.max_tokens=8",
                    "log.progress=false", "engine.max_logprob_diff=null", *extra])


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_dynamic_run_logs_draws_and_resumes_with_its_statistics(tmp_path, failures, monkeypatch):
    trainer_fakes.install(monkeypatch, trainer)
    straight = trainer.run(dynamic_config(failures, tmp_path / "straight"))
    rows = metrics(straight)
    cursor = json.loads((straight / "checkpoints" / "final" / "state.json").read_text())["cursor"]
    drawn = sum(r["groups"] for r in rows)
    assert sum(cursor["tries"]) == drawn and sum(cursor["mixes"]) == sum(r["mixed_groups"] for r in rows)
    assert cursor["weighted_draws"] == sum(r["draws"] for r in rows)
    for r in rows:
        assert 1 <= r["draws"] <= 3 and r["mixed_groups"] <= 2 and r["groups"] <= 3   # 3 queries in the set
        assert (r["mixed_groups_per_gen_s"] > 0) == (r["mixed_groups"] > 0)
    real = trainer_fakes.crash_in_step(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.run(dynamic_config(failures, tmp_path / "resumed"))
    monkeypatch.setattr(train_log, "peak_rss_gb", real)
    resumed = trainer.run(dynamic_config(failures, tmp_path / "resumed"))
    assert len(metrics(resumed)) == 3
    for a, b in zip(rows, metrics(resumed)):      # the cursor statistics came back with the checkpoint
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
