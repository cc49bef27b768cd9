"""`rrr train` on tiny-random: parameters move, resume replays the straight run bit for bit, a SIGKILL
leaves only complete checkpoints, and the update's pieces behave (micro-batches, sampling temperature,
token TIS, the sync canary). The data cursor and failure filter: test_failure_set.py; the LR schedule:
test_train_setup.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fakes import trainer as trainer_fakes
from rrr.train_log import TIMING_KEYS
from rrr import train_log, trainer
from rrr.checkpoint import COMPLETE, latest_checkpoint
from rrr.config import UserError, compose

torch.set_num_threads(1)
TIMING = TIMING_KEYS


def rollouts(cfg, engine, tokenizer, task=None) -> trainer.Rollouts:
    """The trainer's rollout context for `cfg`, with the parity task unless `task` is given."""
    return trainer.Rollouts(engine, tokenizer, task or trainer_fakes.ParityTask(), cfg.prompts,
                            trainer.sampling_from_cfg(cfg.train.sampling), seed=0,
                            group_size=int(cfg.train.group_size), leak=cfg.train.leak)


def config(failures: Path, run: Path, *extra: str):
    return compose(["task=countdown", "model=tiny-random", f"train.failures={failures}", f"run_dir={run}",
                    "train.steps=4", "train.batch_queries=2", "train.group_size=4", "train.micro_batch_size=3",
                    "train.save_every=2", "train.lr=0.01", "train.warmup_steps=1",
                    "train.sampling.attempt1.max_tokens=8", "train.sampling.reflection.max_tokens=8",
                    "train.sampling.attempt2.max_tokens=8", "log.progress=false", "log.episodes_every=2",
                    "engine.max_logprob_diff=null",   # the fake engine's log-probs (−1) are not the model's
                    *extra])


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def spy_policy(monkeypatch) -> dict:
    seen: dict = {}
    build = trainer.build_policy

    def spy(cfg):
        model, tokenizer = build(cfg)
        seen["model"] = model
        seen["before"] = {k: v.detach().clone() for k, v in model.named_parameters()}
        return model, tokenizer

    monkeypatch.setattr(trainer, "build_policy", spy)
    return seen


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_two_steps_move_every_trainable_parameter_and_no_frozen_one(tmp_path, failures, monkeypatch, finetune):
    trainer_fakes.install(monkeypatch, trainer)
    seen = spy_policy(monkeypatch)
    run = trainer.run(config(failures, tmp_path / "run", "train.steps=2", f"train.finetune={finetune}"))
    log = rows(run)
    assert [r["step"] for r in log] == [1, 2]
    assert all(r["frac_zero_std"] < 1 and r["reflection_tokens"] > 0 for r in log)   # a real signal
    assert log[0]["kl"] == pytest.approx(0, abs=1e-7) and log[0]["ratio_mean"] == pytest.approx(1)
    assert log[1]["kl"] > 0                                  # β = 0.001 by default: the reference is live
    model, before = seen["model"], seen["before"]
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and (finetune == "full") == (len(trainable) == len(before))
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]) == (name not in trainable), name
    assert (run / "episodes" / "step_00002.parquet").exists() and not (run / "episodes" / "step_00001.parquet").exists()
    assert (run / "checkpoints" / "final" / COMPLETE).exists()


def test_resume_replays_the_straight_run_bit_for_bit(tmp_path, failures, monkeypatch):
    trainer_fakes.install(monkeypatch, trainer)
    straight = trainer.run(config(failures, tmp_path / "straight"))

    calls = {"n": 0}
    real = train_log.peak_rss_gb

    def crash_in_step_3():                     # after step 3's optimizer step, before its metrics row
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real()

    monkeypatch.setattr(train_log, "peak_rss_gb", crash_in_step_3)
    cfg = config(failures, tmp_path / "resumed")
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.run(cfg)
    resumed = tmp_path / "resumed"
    assert latest_checkpoint(resumed).name == "step_00002"
    with open(resumed / "metrics.jsonl", "a") as f:            # a row from the lost step: must be dropped
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n")
    monkeypatch.setattr(train_log, "peak_rss_gb", real)
    with pytest.raises(UserError, match=r"different settings \(train\.lr\)"):
        trainer.run(config(failures, resumed, "train.lr=0.02"))     # other settings: refused, nothing written
    assert latest_checkpoint(resumed).name == "step_00002"
    trainer.run(cfg)

    a, b = rows(straight), rows(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    # 3 queries, 2 per step: the resume point (step 2) sits inside epoch 1 of the data cursor
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in TIMING} == {k: v for k, v in rb.items() if k not in TIMING}
    assert any(r["loss"] != 0 for r in a)
    wa = load_file(str(straight / "checkpoints" / "final" / "adapter_model.safetensors"))
    wb = load_file(str(resumed / "checkpoints" / "final" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_final_adapter_loads_with_peft_and_with_model_path(tmp_path, failures, monkeypatch):
    from peft import PeftModel

    from rrr.models import load_model

    trainer_fakes.install(monkeypatch, trainer)
    seen = spy_policy(monkeypatch)
    run = trainer.run(config(failures, tmp_path / "run", "train.steps=2"))
    final = run / "checkpoints" / "final"
    base, tokenizer = load_model(compose(["model=tiny-random"]).model)
    plain = PeftModel.from_pretrained(base, str(final)).eval()
    via_path, _ = load_model(compose(["model=tiny-random", f"model.path={final}"]).model)
    ids = torch.tensor([tokenizer("Using the numbers [1, 2]")["input_ids"]])
    policy = seen["model"].eval()
    with torch.no_grad():
        expected = policy(input_ids=ids).logits
        assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-6)
        assert torch.allclose(via_path(input_ids=ids).logits, expected, atol=1e-6)


class CapturingOptimizer:
    """Records the gradients `policy_update` hands to `step()` (and moves nothing)."""

    def __init__(self, params):
        self.params, self.grads = list(params), []

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grads.append([p.grad.clone() for p in self.params])


def scripted_batch(cfg, failures: Path):
    """The policy, and one step's episodes [12] with their advantages: the stored attempts 1 of the failure
    set, reflections and retries from the random-stop fake engine, rewards from the parity task."""
    model, tokenizer = trainer.build_policy(cfg)
    examples, stored = trainer.load_failure_set(str(failures), 0.0, 1.0)
    attempts = [trainer.stored_attempt(s, e, 0, 1) for e, s in zip(examples, stored)]
    engine = trainer_fakes.RandomStopEngine(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    groups = trainer.reflect_retry(rollouts(cfg, engine, tokenizer), examples, attempts, step=1)
    advantages = trainer.grpo.group_advantages(trainer.group_rewards(groups, 4)).flatten()
    return model, tokenizer, [ep for g in groups for ep in g], advantages


def test_micro_batches_accumulate_to_the_full_batch_gradient(tmp_path, failures, smol_tokenizer):
    cfg = config(failures, tmp_path / "run", "train.beta=0.5")
    model, tokenizer, episodes, advantages = scripted_batch(cfg, failures)   # 12 episodes
    reference = trainer.build_reference(cfg, model)
    optimizer = CapturingOptimizer(p for p in model.parameters() if p.requires_grad)
    for size in (12, 5, 1):
        cfg.train.micro_batch_size = size
        trainer.policy_update(cfg, model, reference, optimizer, tokenizer, episodes, advantages)
    full, *accumulated = optimizer.grads
    assert any(g.abs().sum() > 0 for g in full)
    for grads in accumulated:
        for g, f in zip(grads, full):
            assert torch.allclose(g, f, atol=1e-6, rtol=1e-4)


def test_stored_attempt_pick_is_deterministic_and_covers_all(failures):
    examples, stored = trainer.load_failure_set(str(failures), 0.0, 1.0)
    picks = {trainer.stored_attempt(stored[0], examples[0], 0, step).verdict.reason for step in range(20)}
    assert picks == {"wrong value", "no answer"}
    assert trainer.stored_attempt(stored[0], examples[0], 0, 7) == trainer.stored_attempt(stored[0], examples[0], 0, 7)


def test_zero_std_skip_drops_groups_from_the_loss(tmp_path, failures, monkeypatch):
    trainer_fakes.install(monkeypatch, trainer)
    monkeypatch.setattr(trainer_fakes.ParityTask, "verify",
                        lambda self, ex, text: trainer_fakes.Verdict(True, "ok"))   # every group all-1
    run = trainer.run(config(failures, tmp_path / "run", "train.steps=1", "train.zero_std=skip"))
    (row,) = rows(run)
    assert row["frac_zero_std"] == 1 and row["reward_mean"] == 1 and row["reflection_tokens"] == 0
    assert row["mixed_groups"] == 0 and row["groups"] >= 1 and row["grad_norm"] == 0


@pytest.mark.slow
def test_sigkill_mid_step_resumes_and_leaves_only_complete_checkpoints(tmp_path, failures):
    """The real CLI, engine and Countdown verifier; killed right after its first checkpoint appears."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "rrr.cli", "train", "task=countdown", "model=tiny-random",
            f"train.failures={failures}", f"run_dir={run}", "train.steps=6", "train.save_every=1",
            "train.batch_queries=2", "train.group_size=2", "log.progress=false",
            *[f"train.sampling.{s}.max_tokens=8" for s in ("attempt1", "reflection", "attempt2")]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step_00001" / COMPLETE).exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stdout
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4, 5, 6]
    ckpts = [p for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")]
    assert {p.name for p in ckpts} >= {"step_00006", "final"} and len(ckpts) == len(list((run / "checkpoints").iterdir()))
    for p in ckpts:
        assert (p / COMPLETE).exists() and load_file(str(p / "adapter_model.safetensors")), p


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_trainer_logprobs_are_the_engines_at_the_sampling_temperature(tmp_path, failures, temperature):
    """The policy's log-probs on reflection tokens are those of the distribution the hf engine sampled
    from (logits / T), so the post-sync canary `sampler_logp_diff` is ~0 at any T, not only T = 1."""
    from rrr.engines.hf import HFEngine

    cfg = config(failures, tmp_path / "run", f"train.sampling.reflection.temperature={temperature}",
                 "train.beta=0.5", "train.finetune=full")
    model, tokenizer = trainer.build_policy(cfg)
    model.eval()                                              # no dropout, so the forwards compare exactly
    examples, stored = trainer.load_failure_set(str(failures), 0.0, 1.0)
    attempts = [trainer.stored_attempt(s, e, 0, 1) for e, s in zip(examples, stored)]
    # a random tiny model almost never ends a turn by itself: every even id stops a sample (~2 tokens each)
    engine = HFEngine(model, tokenizer, stop_ids=list(range(0, len(tokenizer), 2)))
    groups = trainer.reflect_retry(rollouts(cfg, engine, tokenizer), examples, attempts, step=1)
    episodes = [ep for g in groups for ep in g]
    advantages = torch.ones(len(episodes))
    reference = trainer.build_reference(cfg, model)
    update = trainer.policy_update(cfg, model, reference, CapturingOptimizer(model.parameters()), tokenizer,
                                   episodes, advantages)
    assert update["reflection_tokens"] > 10
    assert update["sampler_logp_diff"] < 1e-4             # mean |policy − sampler| per reflection token
    assert update["kl"] == pytest.approx(0, abs=1e-6)     # the reference scores at the same temperature


@pytest.mark.parametrize("override, message", [
    ("train.sampling.reflection.temperature=0", "needs T > 0"),
    ("train.sampling.reflection.top_p=0.9", "only top_p=1"),
])
def test_untrainable_reflection_sampling_is_refused(tmp_path, failures, override, message):
    with pytest.raises(UserError, match=message):
        trainer.validate(config(failures, tmp_path / "run", override))
    trainer.validate(config(failures, tmp_path / "run", "train.sampling.attempt2.temperature=0"))  # not scored


def test_token_tis_reweights_the_update_and_logs_its_ratios(tmp_path, failures):
    cfg = config(failures, tmp_path / "run", "train.beta=0", "train.is_correction=token_tis", "train.is_cap=1.5")
    model, tokenizer, episodes, advantages = scripted_batch(cfg, failures)
    for ep in episodes:   # the fake sampler says log p = −1; every other token −30: ratios ≪ 1 and capped ones
        ep.sampler_logprobs = [lp - 29 * (i % 2) for i, lp in enumerate(ep.sampler_logprobs)]
    optimizer = CapturingOptimizer(p for p in model.parameters() if p.requires_grad)
    stats = []
    for correction, size in (("token_tis", 12), ("token_tis", 5), ("none", 12)):
        cfg.train.is_correction, cfg.train.micro_batch_size = correction, size
        stats.append(trainer.policy_update(cfg, model, None, optimizer, tokenizer, episodes, advantages))
    tis_full, tis_micro, plain = optimizer.grads
    for g, f in zip(tis_micro, tis_full):
        assert torch.allclose(g, f, atol=1e-6, rtol=1e-4)       # micro-batches still sum to the full batch
    assert not all(torch.allclose(g, p) for g, p in zip(tis_full, plain))
    assert stats[0]["is_ratio_max"] == pytest.approx(stats[1]["is_ratio_max"])     # a max over micro-batches
    assert stats[0]["is_ratio_mean"] == pytest.approx(stats[1]["is_ratio_mean"])
    assert 0 < stats[0]["is_capped_frac"] < 1 and stats[0]["is_ratio_max"] > 1.5
    assert "is_ratio_mean" not in stats[2]


def test_canary_stops_the_run_with_one_line_when_the_sampler_is_not_the_policy(tmp_path, failures, monkeypatch):
    trainer_fakes.install(monkeypatch, trainer, canary=True)   # its log-probs (−1 per token) are no model's
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"^step 1: sync/logprob_diff=\S+ > engine.max_logprob_diff=0.05: "
                                        r"the engine is not sampling the trained weights") as e:
        trainer.run(config(failures, run, "engine.max_logprob_diff=0.05"))
    assert "\n" not in str(e.value)
    (row,) = rows(run)                                # the step's metrics are written before the stop
    assert row["sync/logprob_diff"] == row["sampler_logp_diff"] > 1 and row["sync/load_s"] >= 0
