"""The trainer's RL wiring, one test per way it can silently go wrong (issue #12, item 2): β·KL in the
loss, each advantage paired with its own episode, unscorable = NaN and out of the loss, the resampled
group kept, a batch larger than the failure set refused, unscorable counts logged, stored prompts that
no longer match refused, and reflections that leak the answer. (No query twice in a step:
test_failure_set.py; the reference = the starting policy: test_train_setup.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from fakes import trainer as trainer_fakes
from rrr import grpo, leak, rollout, trainer
from rrr.config import UserError, compose
from rrr.engines.base import Sample
from rrr.tasks import get_task
from rrr.verifiers import Verdict

torch.set_num_threads(1)
NAN = float("nan")


def config(failures: Path, run: Path, *extra: str):
    return compose(["task=countdown", "model=tiny-random", f"train.failures={failures}", f"run_dir={run}",
                    "train.steps=1", "train.batch_queries=2", "train.group_size=4", "train.micro_batch_size=4",
                    "train.save_every=5", "train.lr=0.01", "train.warmup_steps=0", "log.progress=false",
                    *[f"train.sampling.{s}.max_tokens=8" for s in ("attempt1", "reflection", "attempt2")], *extra])


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def episode(reward, tag=None, reflection=""):
    return SimpleNamespace(reward=reward, tag=tag, texts={"reflection": reflection})


# ----------------------------------------------------------------------------- the loss: + β·KL

@pytest.mark.parametrize("kl_kind", ["k1", "k3"])
def test_loss_is_policy_loss_plus_beta_times_kl(kl_kind):
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(3, 6, generator=g, dtype=torch.float64) * 2).requires_grad_()
    ref = logp.detach() + 0.7 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    adv, mask = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64), torch.rand(3, 6, generator=g) > 0.3
    args = dict(eps_low=0.2, eps_high=0.2, kl_kind=kl_kind)
    base, stats = grpo.grpo_loss(logp, None, ref, adv, mask, beta=0.0, **args)
    assert abs(stats["kl"]) > 1e-3                                   # a KL that matters
    for beta in (0.5, 2.0):
        loss, _ = grpo.grpo_loss(logp, None, ref, adv, mask, beta=beta, **args)
        assert loss.item() == pytest.approx(base.item() + beta * stats["kl"], rel=1e-9, abs=1e-12)
        # and the gradient: β·∂KL/∂logp on top of the policy gradient (a sign flip changes it)
        (grad,) = torch.autograd.grad(loss, logp)
        (grad0,) = torch.autograd.grad(base, logp, retain_graph=True)
        kl_grad = torch.autograd.grad(grpo.aggregate(grpo.kl_penalty(logp, ref, kl_kind), mask,
                                                     "seq_mean_token_mean"), logp)[0]
        assert torch.allclose(grad, grad0 + beta * kl_grad)


# ----------------------------------------------------------------------------- advantages ↔ episodes

def test_training_batch_pairs_each_episode_with_its_own_advantage_and_drops_unscorable():
    groups = [[episode(1.0, (q, g)) for g in range(3)] for q in range(3)]
    advantages = torch.tensor([[10.0 * q + g for g in range(3)] for q in range(3)])   # [Q, G]
    rewards = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, NAN, 1.0]])
    keep = torch.tensor([True, False, True])
    episodes, adv = trainer.training_batch(groups, rewards, advantages, keep)
    assert [e.tag for e in episodes] == [(0, 0), (0, 1), (0, 2), (2, 0), (2, 2)]   # unscorable (2, 1) left out
    assert adv.tolist() == [10.0 * q + g for q, g in (e.tag for e in episodes)]
    assert trainer.training_batch(groups, rewards, advantages, torch.zeros(3, dtype=torch.bool))[0] == []


def test_the_update_gets_each_episodes_advantage_in_the_real_step(tmp_path, failures, monkeypatch):
    """Wiring through run(): the advantages the update receives are those of the episodes' own groups."""
    trainer_fakes.install(monkeypatch, trainer)
    seen = []
    real = trainer.policy_update

    def spy(cfg, model, reference, optimizer, tokenizer, episodes, advantages):
        seen.append((list(episodes), advantages.clone()))
        return real(cfg, model, reference, optimizer, tokenizer, episodes, advantages)

    monkeypatch.setattr(trainer, "policy_update", spy)
    trainer.run(config(failures, tmp_path / "run", "train.steps=2", "train.batch_queries=3",
                       "train.zero_std=skip", "train.group_size=6"))
    for episodes, adv in seen:
        by_group: dict[tuple, list] = {}
        for ep in episodes:
            by_group.setdefault(ep.example_id, []).append(ep)
        for ep, a in zip(episodes, adv.tolist()):
            rewards = torch.tensor([[e.reward for e in by_group[ep.example_id]]])
            expected = grpo.group_advantages(rewards)[0, by_group[ep.example_id].index(ep)]
            assert a == pytest.approx(float(expected), abs=1e-5), ep.example_id
    assert any(len(e) for e, _ in seen)


# ----------------------------------------------------------------------------- unscorable = NaN

def test_an_unscorable_retry_is_nan_never_zero():
    assert torch.isnan(torch.tensor(trainer.episode_reward(episode(None))))
    assert trainer.episode_reward(episode(0.0)) == 0.0 and trainer.episode_reward(episode(1.0)) == 1.0
    rewards = trainer.group_rewards([[episode(1.0), episode(None), episode(0.0)]], 3)
    assert torch.isnan(rewards[0, 1]) and rewards[0, 0] == 1 and rewards[0, 2] == 0
    assert grpo.group_advantages(rewards)[0, 1] == 0


# ----------------------------------------------------------------------------- resample_zero_std

def test_resample_replaces_only_zero_std_groups_with_their_own_first_varied_draw(monkeypatch):
    cfg = compose(["task=countdown", "train.group_size=2", "train.resample_tries=3"])
    queries = [SimpleNamespace(id=f"q{i}") for i in range(3)]
    groups = [[episode(1.0, "orig0a"), episode(1.0, "orig0b")], [episode(0.0, "orig1a"), episode(1.0, "orig1b")],
              [episode(0.0, "orig2a"), episode(0.0, "orig2b")]]
    rewards = trainer.group_rewards(groups, 2)
    draws = {  # try -> the groups it returns, one per re-drawn query (in the order asked)
        1: {"q0": [episode(1.0, "t1q0a"), episode(0.0, "t1q0b")], "q2": [episode(0.0, "t1q2a"), episode(0.0, "t1q2b")]},
        2: {"q2": [episode(0.0, "t2q2a"), episode(1.0, "t2q2b")]},
        3: {},
    }
    calls = []

    def fake_reflect_retry(ctx, qs, attempts1, step, seed=None):
        attempt = len(calls) + 1
        calls.append([q.id for q in qs])
        return [draws[attempt][q.id] for q in qs]

    monkeypatch.setattr(trainer, "reflect_retry", fake_reflect_retry)
    task = SimpleNamespace(answer_in=lambda ex, text: False)
    ctx = trainer.Rollouts(None, None, task, None, {}, seed=0, group_size=2, leak=cfg.train.leak)
    out, out_rewards = trainer.resample_zero_std(ctx, queries, [None] * 3, 1, groups, rewards, tries=3)
    assert calls == [["q0", "q2"], ["q2"]]                          # only zero-std groups, until none is left
    assert [[e.tag for e in g] for g in out] == [["t1q0a", "t1q0b"], ["orig1a", "orig1b"], ["t2q2a", "t2q2b"]]
    assert out_rewards.tolist() == [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    assert rewards.tolist() == [[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]   # the caller's tensor is not edited


# ----------------------------------------------------------------------------- the data cursor
# (the cursor itself: tests/test_failure_set.py)

def test_batch_larger_than_the_failure_set_is_refused(tmp_path, failures):
    with pytest.raises(UserError, match="batch_queries=4 > the 3 failed queries"):
        trainer.run(config(failures, tmp_path / "run", "train.batch_queries=4"))


# ----------------------------------------------------------------------------- unscorable counts

def test_online_unscorable_attempt1_is_counted_apart_not_as_a_failure(monkeypatch):
    s = Sample(token_ids=[1, 2], finish_reason="stop")
    verdicts = [Verdict(True, "ok"), rollout.UNSCORABLE, Verdict(False, "wrong"), rollout.UNSCORABLE]
    monkeypatch.setattr(rollout, "sample_attempts",
                        lambda *a, **k: [[rollout.Attempt(s, "t", v)] for v in verdicts])
    ctx = trainer.Rollouts(None, None, None, None, {"attempt1": None}, seed=0, group_size=2)
    attempts, stats = trainer.first_attempts(ctx, "online", [None] * 4, [None] * 4, 1)
    assert [a is not None for a in attempts] == [False, False, True, False]
    assert stats == {"attempt1_pass_rate": 0.5, "unscorable_attempt1": 2, "scored_attempt1": 2}


def test_verifier_errors_are_logged_per_step(tmp_path, failures, monkeypatch, capsys):
    trainer_fakes.install(monkeypatch, trainer)

    def flaky(self, example, text):
        if len(text) % 3 == 0:
            raise RuntimeError("verifier bug")
        return Verdict(len(text) % 2 == 0, "parity")

    monkeypatch.setattr(trainer_fakes.ParityTask, "verify", flaky)
    run = trainer.run(config(failures, tmp_path / "run", "train.steps=2"))
    logged = rows(run)
    assert all("verifier_errors" in r and "unscorable_attempt1" in r for r in logged)
    assert sum(r["verifier_errors"] for r in logged) == sum(r["unscorable"] for r in logged) > 0
    out = capsys.readouterr().out                     # the run dir first; a final hint that works as printed
    assert out.splitlines()[0] == f"run dir: {run}"
    assert f"rrr evaluate task=countdown model=tiny-random model.path={run / 'checkpoints' / 'final'}" in out


# ----------------------------------------------------------------------------- stored prompt ids

def test_stored_prompt_ids_that_differ_from_the_rebuilt_prompt_are_refused(tmp_path, failures, monkeypatch):
    trainer_fakes.install(monkeypatch, trainer)
    path = failures / "failures.parquet"
    df = pd.read_parquet(path)
    df.at[1, "prompt_token_ids"] = list(df.at[1, "prompt_token_ids"])[:-1] + [7]
    df.to_parquet(path, index=False)
    with pytest.raises(UserError, match="stored attempt-1 prompt of query cd1 differs"):
        trainer.run(config(failures, tmp_path / "run"))
    assert not (tmp_path / "run" / "manifest.json").exists()


# ----------------------------------------------------------------------------- leaking reflections

def test_each_task_parses_an_answer_inside_a_reflection():
    cd, fc = get_task("countdown"), get_task("function_calling")
    ex = SimpleNamespace(fields={"nums": [1, 2, 3], "target": 6})
    assert cd.answer_in(ex, "I should have said <answer>1 + 2 + 3</answer>")
    assert cd.answer_in(ex, "maybe <answer>(3 - 1) * 2</answer> = wrong numbers, still an answer")
    assert not cd.answer_in(ex, "I forgot to use the <answer> tags and the number 3")
    assert not cd.answer_in(ex, "write <answer>your expression</answer> next time")
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    fx = SimpleNamespace(fields={"grader": "xlam", "answers": [call], "tools": []})
    assert fc.answer_in(fx, f"The right call is <tool_call>{json.dumps(call)}</tool_call>")
    assert fc.answer_in(fx, f"I should call {json.dumps(call)} instead")
    assert not fc.answer_in(fx, "I used the wrong function name; get_weather takes a city")


def test_leak_policy_zeroes_leaking_rewards_only_under_no_reward():
    rewards = torch.tensor([[1.0, 1.0, NAN, 0.0]])
    leaks = torch.tensor([[True, False, True, True]])
    assert leak.apply_leak_policy(rewards, leaks, "keep") is rewards
    out = leak.apply_leak_policy(rewards, leaks, "no_reward")
    assert out[0, :2].tolist() == [0.0, 1.0] and torch.isnan(out[0, 2]) and out[0, 3] == 0
    with pytest.raises(ValueError):
        leak.apply_leak_policy(rewards, leaks, "drop")
    crashing = SimpleNamespace(answer_in=lambda ex, text: 1 / 0)
    assert leak.reflection_leaks(crashing, None, "x") is False


@pytest.mark.parametrize("mode", ["keep", "no_reward"])
def test_reflection_leak_is_logged_and_no_reward_gives_leaks_zero(tmp_path, failures, monkeypatch, mode):
    trainer_fakes.install(monkeypatch, trainer)
    monkeypatch.setattr(trainer_fakes.ParityTask, "answer_in", lambda self, ex, text: "a" in text)
    monkeypatch.setattr(trainer_fakes.ParityTask, "verify", lambda self, ex, text: Verdict(True, "ok"))
    seen = {}
    real = trainer.group_scores

    def spy(ctx, queries, groups):
        out = real(ctx, queries, groups)
        seen["leaks"], seen["rewards"] = leak.leak_flags(ctx.task, queries, groups), out
        return out

    monkeypatch.setattr(trainer, "group_scores", spy)
    run = trainer.run(config(failures, tmp_path / "run", f"train.leak={mode}"))
    (row,) = rows(run)
    leaks = seen["leaks"]
    assert 0 < leaks.float().mean() < 1
    assert row["reflection_leak"] == pytest.approx(leaks.float().mean().item())
    expected = torch.where(leaks, 0.0, 1.0) if mode == "no_reward" else torch.ones_like(seen["rewards"])
    assert torch.equal(seen["rewards"], expected)


def test_unknown_leak_mode_is_refused(tmp_path, failures):
    with pytest.raises(UserError, match="train.leak='drop'"):
        trainer.run(config(failures, tmp_path / "run", "train.leak=drop"))
