"""The RL wiring where single-line mistakes used to survive the fast suite (issue #22, item 5): the TIS
ratio's direction where the trainer calls it, the leak policy and zero-std handling of groups re-drawn by
`train.zero_std=resample`, and the seeds of those re-draws. Expected values are computed here from the
inputs (known offsets, the reflections' own text), never with the function under test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fakes import trainer as trainer_fakes
from rrr import trainer
from rrr.config import compose
from rrr.episode import Segment
from rrr.verifiers import Verdict

torch.set_num_threads(1)


def config(failures: Path, run: Path, *extra: str):
    return compose(["task=countdown", "model=tiny-random", f"train.failures={failures}", f"run_dir={run}",
                    "train.steps=1", "train.batch_queries=3", "train.group_size=4", "train.micro_batch_size=12",
                    "train.save_every=1", "train.lr=0.01", "train.warmup_steps=0", "log.progress=false",
                    "log.episodes_every=1", "engine.max_logprob_diff=null",
                    *[f"train.sampling.{s}.max_tokens=8" for s in ("attempt1", "reflection", "attempt2")], *extra])


# ----------------------------------------------------------------------------- TIS direction

OFFSETS = (1.0, -0.5, -2.0, 0.2)       # sampler = model + offset: ratios π_θ/π_sampler = e^-1, e^.5, e^2 (capped), e^-.2
CAP = 2.0


class CapturingOptimizer:
    """Records nothing and steps nothing: the policy stays where it is between updates."""

    def __init__(self, params):
        self.param_groups = [{"params": list(params), "lr": 0.0}]

    def zero_grad(self, set_to_none=True):
        for p in self.param_groups[0]["params"]:
            p.grad = None

    def step(self):
        pass


def capture_logp(monkeypatch) -> list:
    """The policy's log-prob tensors [b, T] of each micro-batch in the update, with their gradient kept."""
    seen = []
    real = trainer.shared_prefix.update_logprobs

    def spy(*args, **kwargs):
        logp, entropy = real(*args, **kwargs)
        logp.retain_grad()
        seen.append(logp)
        return logp, entropy

    monkeypatch.setattr(trainer.shared_prefix, "update_logprobs", spy)
    return seen


def test_tis_scales_each_tokens_gradient_by_min_of_policy_over_sampler_and_the_cap(tmp_path, failures, monkeypatch):
    cfg = config(failures, tmp_path / "run", "train.beta=0", f"train.is_cap={CAP}")
    model, tokenizer = trainer.build_policy(cfg)
    examples, stored = trainer.load_failure_set(str(failures), 0.0, 1.0)
    attempts = [trainer.stored_attempt(s, e, 0, 1) for e, s in zip(examples, stored)]
    engine = trainer_fakes.RandomStopEngine(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    groups = trainer.reflect_retry(rollouts(cfg, engine, tokenizer, trainer_fakes.ParityTask()), examples, attempts, 1)
    episodes = [ep for g in groups for ep in g]
    advantages = torch.linspace(-1.0, 1.0, len(episodes))
    seen = capture_logp(monkeypatch)
    optimizer = CapturingOptimizer(p for p in model.parameters() if p.requires_grad)

    cfg.train.is_correction = "none"
    trainer.policy_update(cfg, model, None, optimizer, tokenizer, episodes, advantages)   # one micro-batch
    (plain,) = seen
    mask = plain.grad != 0                                           # [N, T] the loss tokens
    offsets = torch.zeros_like(plain)
    for i, ep in enumerate(episodes):                                # sampler log-probs := the model's + offset
        cols = mask[i].nonzero().flatten().tolist()
        lps = list(ep.sampler_logprobs)
        for k, t in enumerate(cols):
            offsets[i, t] = OFFSETS[k % len(OFFSETS)]
            lps[t] = float(plain[i, t].detach()) + OFFSETS[k % len(OFFSETS)]
        ep.sampler_logprobs = lps
    assert mask.sum() >= 8 and (offsets[mask] == -2.0).any()

    cfg.train.is_correction = "token_tis"
    stats = trainer.policy_update(cfg, model, None, optimizer, tokenizer, episodes, advantages)
    tis = seen[1]
    weight = torch.clamp(torch.exp(-offsets), max=CAP)              # min(π_θ / π_sampler, C), by hand
    assert torch.allclose(tis.grad[mask], plain.grad[mask] * weight[mask], rtol=1e-4, atol=1e-9)
    assert (tis.grad[~mask] == 0).all()
    ratios = torch.exp(-offsets[mask])
    assert stats["is_ratio_mean"] == pytest.approx(ratios.mean().item(), rel=1e-4)
    assert stats["is_ratio_max"] == pytest.approx(ratios.max().item(), rel=1e-4)
    assert stats["is_capped_frac"] == pytest.approx((ratios > CAP).float().mean().item())


# ----------------------------------------------------------------------------- zero_std=resample

def odd(text: str | None) -> bool:
    return len(text or "") % 2 == 1


class AlwaysPassLeakyTask(trainer_fakes.ParityTask):
    """Every retry passes; a reflection 'holds an answer' when its text has an odd length (the retry's
    text is never read for that)."""

    def verify(self, example, completion: str) -> Verdict:
        return Verdict(True, "ok")

    def answer_in(self, example, text: str) -> bool:
        return odd(text)


def expected_rewards(group) -> list[float]:
    """leak=no_reward over an always-pass verifier, read off each reflection's own text."""
    return [0.0 if odd(ep.texts.get("reflection")) else 1.0 for ep in group]


def rollouts(cfg, engine, tokenizer, task) -> trainer.Rollouts:
    return trainer.Rollouts(engine, tokenizer, task, cfg.prompts, trainer.sampling_from_cfg(cfg.train.sampling),
                            seed=int(cfg.seed), group_size=int(cfg.train.group_size), leak=cfg.train.leak)


def redraw_setup(failures, tmp_path, smol_tokenizer, task):
    """The rollout context (leak=no_reward), the failed attempts and a first draw of their groups."""
    cfg = config(failures, tmp_path / "run", "train.leak=no_reward")
    examples, stored = trainer.load_failure_set(str(failures), 0.0, 1.0)
    attempts = [trainer.stored_attempt(s, e, 0, 1) for e, s in zip(examples, stored)]
    engine = trainer_fakes.RandomStopEngine(smol_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    ctx = rollouts(cfg, engine, smol_tokenizer, task)
    return cfg, ctx, examples, attempts, trainer.reflect_retry(ctx, examples, attempts, 1)


def test_redrawn_groups_get_the_leak_policy_read_off_their_reflections(tmp_path, failures, smol_tokenizer):
    cfg, ctx, examples, attempts, groups = redraw_setup(failures, tmp_path, smol_tokenizer, AlwaysPassLeakyTask())
    rewards = torch.ones(len(groups), 4)                            # the first draw: all pass, none leaked
    out, out_rewards = trainer.resample_zero_std(ctx, examples, attempts, 1, groups, rewards, tries=3)
    replaced = [q for q in range(len(groups)) if out[q] is not groups[q]]
    assert replaced                                                 # a re-draw with a leak made a group mixed
    episodes = [ep for q in replaced for ep in out[q]]
    assert any(odd(ep.texts["reflection"]) != odd(ep.texts["attempt2"]) for ep in episodes)  # the two texts differ
    for q in range(len(groups)):
        if q in replaced:
            assert out_rewards[q].tolist() == expected_rewards(out[q])            # leak policy on the re-draw
            assert 0 < out_rewards[q].sum() < 4
            # the re-draw sampled with seeds of its own: not the first draw's reflections again
            assert [ep.token_ids for ep in out[q]] != [ep.token_ids for ep in groups[q]]
        else:
            assert out_rewards[q].tolist() == [1.0] * 4


def test_each_redraw_samples_with_its_own_seed(tmp_path, failures, smol_tokenizer, monkeypatch):
    task = AlwaysPassLeakyTask()
    task.answer_in = lambda example, text: False                   # no re-draw ever varies: all 3 tries run
    cfg, ctx, examples, attempts, groups = redraw_setup(failures, tmp_path, smol_tokenizer, task)
    seeds = []
    real = trainer.reflect_retry

    def spy(*args, seed, **kwargs):
        seeds.append(seed)
        return real(*args, seed=seed, **kwargs)

    monkeypatch.setattr(trainer, "reflect_retry", spy)
    trainer.resample_zero_std(ctx, examples, attempts, 1, groups, torch.ones(len(groups), 4), tries=3)
    assert len(seeds) == 3 and len(set(seeds)) == 3 and int(cfg.seed) not in seeds


def test_zero_std_groups_stay_out_of_the_update_after_redraws(tmp_path, failures, monkeypatch):
    """A real step with zero_std=resample over an always-pass verifier and leak=no_reward (group size 2):
    the rewards written are the leak policy read off each reflection, and the update's loss tokens are
    exactly the reflection tokens of the groups left mixed."""
    trainer_fakes.install(monkeypatch, trainer)
    monkeypatch.setattr(trainer, "get_task", lambda name: AlwaysPassLeakyTask())
    run = trainer.run(config(failures, tmp_path / "run", "train.zero_std=resample", "train.leak=no_reward",
                             "train.group_size=2", "train.resample_tries=1", "seed=1"))
    (row,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert row["frac_zero_std"] == 1                               # seed 1: every first draw was zero-std
    episodes = pd.read_parquet(run / "episodes" / "step_00001.parquet")
    want = [0.0 if odd(t) else 1.0 for t in episodes.reflection_text]
    assert episodes.reward.tolist() == want
    by_group = episodes.groupby("group").reward
    mixed = by_group.transform(lambda r: r.nunique() > 1)
    assert 0 < mixed.sum() < len(episodes)       # re-draws made some groups mixed; one stayed zero-std
    loss_tokens = sum(int((np.asarray(ids) == Segment.REFLECTION).sum())
                      for ids, trunc, m in zip(episodes.segment_ids, episodes.reflection_truncated, mixed)
                      if m and not trunc)
    assert loss_tokens > 0 and row["reflection_tokens"] == loss_tokens
