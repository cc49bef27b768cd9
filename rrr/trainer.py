"""`rrr train`: reflection-masked GRPO on a failure set, as one recipe that reads top to bottom.

One step of Reflect, Retry, Reward (paper §3; DESIGN.md "GRPO on reflections"):
  1. draw `train.batch_queries` failed queries (seeded, epoch-aware cursor) and their failed attempt 1
     (stored in the failure set, or sampled online: a passing attempt 1 ends that episode);
  2. REFLECT: G = `train.group_size` reflections per failed attempt; RETRY: one attempt 2 per reflection;
  3. REWARD: r = verify(attempt 2) ∈ {0, 1} (unscorable = NaN); group-normalised advantages;
     zero-variance groups are counted and kept, skipped or re-sampled (`train.zero_std`);
  4. UPDATE: one on-policy PPO-clip step (ρ = 1 in value) with β·KL to the reference on reflection
     tokens only, gradient accumulation over micro-batches, grad clipping, AdamW, warm-up + schedule.
Setup, logging and checkpointing live in small functions below the loop; the loop is `run()`.

Under torchrun / accelerate launch the loop is the same loop on every rank (rrr/distributed.py): each rank
rolls out its contiguous share of the step's queries (whole groups), the loss normaliser and the logged
statistics are global, gradients are summed over ranks, and rank 0 alone writes the run dir.
"""

from __future__ import annotations

import copy
import math
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rrr import checkpoint as ckpt
from rrr import distributed as dist
from rrr import fsdp, grpo, rollout, sync
from rrr.leak import LEAK_MODES, apply_leak_policy, leak_flags, leak_share
from rrr.config import UserError
from rrr.engines.base import Sample, SamplingParams, derive_seed
from rrr.episode import Episode, Segment, collate
from rrr.rollout import sampling_from_cfg
from rrr.logprobs import masked_logprobs, segment_temperatures
from rrr.runs import (MetricsWriter, atomic_write_parquet, check_resumable, claim_run_dir, lock_run_dir,
                      plan_run_dir, update_manifest, write_run_files)
from rrr.validate import check as check_settings, check_logger
from rrr.tasks import Example, get_task
from rrr.verifiers import Verdict

COMMAND = "train"
SEGMENTS = ("attempt1", "reflection", "attempt2")


def run(cfg: DictConfig) -> Path:
    t = cfg.train
    validate(cfg)
    run_dir = dist.from_main(lambda: plan_run_dir(cfg, COMMAND))   # not created yet; rank 0 names it for all
    if run_dir.is_dir() and dist.is_main():
        lock_run_dir(run_dir)                        # one writer per run dir: rank 0, the only one that writes
    check_resumable(run_dir, COMMAND, resume_fingerprint(cfg))   # a resume with other settings is refused
    examples, stored = load_failure_set(t.failures, t.min_pass_rate, t.max_pass_rate, cfg.task.name)
    if int(t.batch_queries) > len(examples):
        raise UserError(f"train.batch_queries={t.batch_queries} > the {len(examples)} failed queries in "
                        f"{t.failures}: a step would draw a query twice; lower train.batch_queries or collect more")
    seed_everything(int(cfg.seed))                   # a resume restores the checkpoint's RNG state instead

    # ----------------------------------------------------------------- setup (plumbing)
    model, tokenizer = build_policy(cfg)
    reference = build_reference(cfg, model)          # before any checkpoint: π_ref = the initial model
    optimizer, scheduler = build_optimizer(cfg, model)
    engine = build_engine(cfg, model, tokenizer)
    task = get_task(cfg.task.name)
    if t.attempt1 == "stored":
        check_stored_prompts(tokenizer, task, examples, stored, cfg.prompts, t.failures)
    sampling = sampling_from_cfg(t.sampling)
    cursor = FailureCursor(n=len(examples), seed=int(cfg.seed))
    state = ckpt.load_latest_checkpoint(run_dir, model=model, optimizer=optimizer, scheduler=scheduler)
    claim_run_dir(run_dir)                           # inputs valid, model loaded: now the run dir is written
    metrics = MetricsWriter(run_dir / "metrics.jsonl")
    start, wandb_id = 0, None
    if state is not None:
        start, wandb_id, cursor = state.step, state.wandb_run_id, FailureCursor.from_state(state.cursor)
        engine.load_weights(model)                    # the sampler must see the restored weights
        main_print(f"resuming {run_dir} from {state.path.name} (step {start}){ranks_note(run_dir)}")
    else:
        write_run_files(run_dir, cfg, COMMAND, extra=train_manifest(cfg, examples))
    if dist.is_main():
        ckpt.remove_partial(run_dir)
        metrics.truncate_after(start)                 # rows of steps after the checkpoint are re-done
    dist.barrier()
    logger = build_logger(cfg, run_dir, wandb_id)
    bar = progress(cfg, start)

    for step in range(start + 1, int(t.steps) + 1):
        t0 = time.time()
        # ----------------------------------------------------------------- ALGO: reflect, retry, reward
        batch = dist.shard(cursor.draw(int(t.batch_queries)))   # this rank's share, in single-process order
        queries = [examples[i] for i in batch]
        verifier = rollout.RolloutStats()                                       # counts verifier crashes
        attempts1, attempt1_stats = first_attempts(cfg, engine, tokenizer, task, queries,
                                                   [stored[i] for i in batch], sampling, step, verifier)
        failed = [i for i, a in enumerate(attempts1) if a is not None]     # online: a pass ends the episode
        queries, attempts1 = [queries[i] for i in failed], [attempts1[i] for i in failed]
        groups = reflect_retry(cfg, engine, tokenizer, task, queries, attempts1, sampling, step, int(cfg.seed),
                               verifier)
        rewards = group_scores(cfg, task, queries, groups)                      # [Q, G], NaN = unscorable
        zero_std = grpo.zero_std_groups(rewards)                                # [Q]
        frac_zero_std = zero_std.float().mean().item() if len(zero_std) else 0.0
        if t.zero_std == "resample":
            groups, rewards = resample_zero_std(cfg, engine, tokenizer, task, queries, attempts1, sampling,
                                                step, groups, rewards, verifier)
        advantages = grpo.group_advantages(rewards, t.scale_rewards)           # [Q, G]
        keep = ~grpo.zero_std_groups(rewards) if t.zero_std in ("skip", "resample") else \
            torch.ones(len(groups), dtype=torch.bool)
        gen_s = time.time() - t0

        # ----------------------------------------------------------------- ALGO: policy update
        lr = optimizer.param_groups[0]["lr"]
        trained, trained_advantages = training_batch(groups, rewards, advantages, keep)
        sync.release_for_update(engine)                  # vLLM sleep mode: room for the update
        update = policy_update(cfg, model, reference, optimizer, tokenizer, trained, trained_advantages)
        scheduler.step()
        sync_s = sync.push_weights(engine, model)        # the sampler gets the new weights

        # ----------------------------------------------------------------- logging and checkpoints
        queries, groups, rewards, advantages = gather_groups(queries, groups, rewards, advantages)  # all ranks'
        row = {"step": step, **update, **rollout_stats(groups, rewards),
               "frac_zero_std": dist.mean(frac_zero_std, len(zero_std)),
               "reflection_leak": leak_share(leak_flags(task, queries, groups)),
               "attempt1_pass_rate": dist.mean(attempt1_stats["attempt1_pass_rate"], attempt1_stats["scored_attempt1"]),
               "unscorable_attempt1": int(dist.all_reduce_sum(float(attempt1_stats["unscorable_attempt1"]))),
               "verifier_errors": int(dist.all_reduce_sum(float(verifier.unscorable))), "lr": lr,
               "gen_tokens_per_s": generated_tokens(groups) / max(dist.all_reduce_max(gen_s), 1e-9),
               "sync/logprob_diff": update["sampler_logp_diff"], "sync/load_s": dist.all_reduce_max(sync_s),
               "step_time_s": time.time() - t0, "peak_rss_gb": dist.all_reduce_max(peak_rss_gb())}
        if dist.is_main():
            metrics.write(row)
            logger(row)
            if step % int(cfg.log.episodes_every) == 0:
                write_episodes(run_dir, step, queries, groups, rewards, advantages)
        sync.check_logprob_diff(step, row["sync/logprob_diff"], sync.logprob_diff_limit(cfg))
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", loss=f"{row['loss']:.4f}")
        if step % int(t.save_every) == 0:
            save(run_dir, f"step_{step:05d}", model, tokenizer, optimizer, scheduler, step, cursor, logger)
    bar.close()
    final = save(run_dir, "final", model, tokenizer, optimizer, scheduler, int(t.steps), cursor, logger)
    if dist.is_main():
        update_manifest(run_dir, final_checkpoint=str(final), finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    main_print(f"final checkpoint: {final}\nevaluate it: rrr evaluate task={cfg.task.name} model={cfg.model.name} "
               f"model.path={final}")
    logger.finish()
    dist.barrier()
    return run_dir


# ============================================================================ the algorithm's pieces

@dataclass(frozen=True)
class FailedAttempt:
    sample: Sample
    verdict: Verdict


def first_attempts(cfg: DictConfig, engine, tokenizer, task, queries: Sequence[Example],
                   stored: Sequence[dict], sampling: dict[str, SamplingParams], step: int,
                   stats: rollout.RolloutStats | None = None) -> tuple[list[FailedAttempt | None], dict[str, Any]]:
    """Attempt 1 per query: a stored failed attempt (deterministic pick), or sampled online.
    Online, a passing (or unscorable) attempt 1 ends its episode (None). The second value holds the
    online attempt-1 pass rate over the *scorable* attempts and the count of unscorable ones."""
    seed = int(cfg.seed)
    if cfg.train.attempt1 == "stored":
        return [stored_attempt(s, q, seed, step) for q, s in zip(queries, stored)], \
            {"attempt1_pass_rate": None, "unscorable_attempt1": 0, "scored_attempt1": 0}
    online = [a[0] for a in rollout.sample_attempts(engine, tokenizer, task, list(queries), cfg.prompts,
                                                    sampling["attempt1"], n=1, seed=seed, step=step, stats=stats)]
    scored = [bool(a.verdict.correct) for a in online if a.verdict is not rollout.UNSCORABLE]
    return [None if a.verdict.correct or a.verdict is rollout.UNSCORABLE else FailedAttempt(a.sample, a.verdict)
            for a in online], {"attempt1_pass_rate": float(np.mean(scored)) if scored else None,
                               "unscorable_attempt1": len(online) - len(scored),
                               "scored_attempt1": len(scored)}


def stored_attempt(stored: dict, example: Example, seed: int, step: int) -> FailedAttempt:
    """One of the query's stored failed attempts, picked by a seed derived from (seed, step, example)."""
    k = derive_seed(seed, step, example.id, 0, "stored_attempt1") % len(stored["token_ids"])
    sample = Sample(token_ids=list(stored["token_ids"][k]),
                    finish_reason="length" if stored["truncated"][k] else "stop")
    return FailedAttempt(sample, Verdict(False, stored["reasons"][k]))


def reflect_retry(cfg: DictConfig, engine, tokenizer, task, queries: Sequence[Example],
                  attempts1: Sequence[FailedAttempt], sampling, step: int, seed: int,
                  stats: rollout.RolloutStats | None = None) -> list[list[Episode]]:
    """REFLECT G times per failed attempt 1, RETRY once per reflection, verify: [Q][G] episodes."""
    if not queries:
        return []
    return rollout.reflect_retry(engine, tokenizer, task, list(queries), [a.sample for a in attempts1],
                                 cfg.prompts, sampling, group_size=int(cfg.train.group_size), seed=seed,
                                 step=step, verdicts1=[a.verdict for a in attempts1], stats=stats)


def group_scores(cfg: DictConfig, task, queries: Sequence[Example], groups) -> torch.Tensor:
    """[Q, G] rewards of the retries, with `train.leak` applied to reflections that hold an answer."""
    rewards = group_rewards(groups, int(cfg.train.group_size))                 # [Q, G], NaN = unscorable
    return apply_leak_policy(rewards, leak_flags(task, queries, groups), cfg.train.leak)


def group_rewards(groups: Sequence[Sequence[Any]], group_size: int) -> torch.Tensor:
    """[Q][G] episodes -> [Q, G] rewards: 1/0 from the retry's verdict, NaN when it was unscorable."""
    if any(len(g) != group_size for g in groups):   # a shrunken group would silently change the baseline
        raise RuntimeError(f"rollout returned groups of sizes {[len(g) for g in groups]}, expected {group_size}")
    rewards = [[episode_reward(ep) for ep in g] for g in groups]
    return torch.tensor(rewards, dtype=torch.float32).reshape(len(groups), group_size)


def episode_reward(episode: Episode) -> float:
    return float("nan") if episode.reward is None else float(episode.reward)


def resample_zero_std(cfg, engine, tokenizer, task, queries, attempts1, sampling, step, groups, rewards,
                      stats: rollout.RolloutStats | None = None):
    """DAPO-style dynamic sampling: re-draw the reflections of zero-variance groups (fresh seeds per try)
    up to `train.resample_tries` times; a group keeps its first draw that has reward variance."""
    groups, rewards = list(groups), rewards.clone()
    for attempt in range(1, int(cfg.train.resample_tries) + 1):
        redo = grpo.zero_std_groups(rewards).nonzero().flatten().tolist()
        if not redo:
            break
        redo_queries = [queries[q] for q in redo]
        fresh = reflect_retry(cfg, engine, tokenizer, task, redo_queries, [attempts1[q] for q in redo],
                              sampling, step, seed=derive_seed(int(cfg.seed), "resample", attempt), stats=stats)
        fresh_rewards = group_scores(cfg, task, redo_queries, fresh)
        for j, q in enumerate(redo):
            if not grpo.zero_std_groups(fresh_rewards[j:j + 1])[0]:
                groups[q], rewards[q] = fresh[j], fresh_rewards[j]
    return groups, rewards


def training_batch(groups: Sequence[Sequence[Any]], rewards: torch.Tensor, advantages: torch.Tensor,
                   keep: torch.Tensor) -> tuple[list[Any], torch.Tensor]:
    """The episodes the update trains on, each with its own advantage [N]: the members of kept groups
    [Q] whose retry was scored. An unscorable retry has no reward, so its reflection stays out of the
    loss mask, the normaliser and the KL term (not just advantage 0)."""
    pairs = [(ep, advantages[q, g]) for q, group in enumerate(groups) if keep[q]
             for g, ep in enumerate(group) if not torch.isnan(rewards[q, g])]
    if not pairs:
        return [], advantages.new_zeros(0)
    return [ep for ep, _ in pairs], torch.stack([a for _, a in pairs])


def policy_update(cfg: DictConfig, model, reference: Callable[..., torch.Tensor] | None, optimizer,
                  tokenizer, episodes: Sequence[Any], advantages: torch.Tensor) -> dict[str, float]:
    """One optimizer step over `episodes` (with their advantages [N]) in micro-batches.

    The loss normaliser is the whole step's, so accumulating micro-batch gradients equals the full-batch
    gradient. On-policy with one update per batch, π_old = π_θ: old_logp = None gives ρ = 1 in value
    and the exact policy gradient A·∇logπ (the sampler's logprobs are only compared, never used as π_old).
    """
    t = cfg.train
    model.train()                                       # dropout as configured; the engine used eval()
    optimizer.zero_grad(set_to_none=True)
    if not dist.all_reduce_sum(len(episodes)):          # no rank has an episode
        optimizer.step()                                # no gradients: moves nothing, keeps step counts aligned
        return empty_update()
    batch = collate(episodes, tokenizer.pad_token_id) if episodes else EMPTY_BATCH   # [N, T]: ids, masks
    mask = grpo.reflection_loss_mask(batch["segment_ids"], batch["reflection_truncated"])  # [N, T] bool
    temps = segment_temperatures(batch["segment_ids"], sampling_temperatures(t.sampling))  # [N, T]: logits / T
    max_reflection = int(t.sampling.reflection.max_tokens)
    # the whole step's normaliser, over all ranks: each rank's gradient is its share of the global loss
    normaliser = dist.all_reduce_sum(grpo.loss_normaliser(mask, t.loss_agg, max_reflection))
    device = next(model.parameters()).device
    totals: dict[str, float] = {}
    micro = torch.arange(len(episodes)).split(int(t.micro_batch_size)) if episodes else ()
    for mb in fsdp.pad_micro_batches(model, micro):
        if mb is None:                                  # FSDP: this rank has fewer micro-batches than another
            fsdp.idle_step(model, reference, tokenizer.pad_token_id, int(t.logprob_chunk_size))
            continue
        # Causal attention: tokens after the last reflection token (retry prompt, attempt 2, padding)
        # cannot change a reflection log-prob, so the forward/backward stops there. Exact, and it saves
        # the retry's share of the update's compute.
        cols = mask[mb].any(0).nonzero()
        width = int(cols.max()) + 1 if len(cols) else 1
        ids, attn, m, temp = (x[mb, :width].to(device)
                              for x in (batch["input_ids"], batch["attention_mask"], mask, temps))
        logp, entropy = masked_logprobs(model, ids, attn, m, int(t.logprob_chunk_size), temp)  # [b, T]
        ref_logp = reference(ids, attn, m, temp) if reference is not None else None   # [b, T]
        sampler_logp = batch["old_logprobs"][mb, :width].to(device)                       # [b, T]
        tis = t.is_correction == "token_tis"          # truncated IS for the sampler ≠ trainer gap
        loss, stats = grpo.grpo_loss(logp, None, ref_logp, advantages[mb].to(device), m,
                                     eps_low=float(t.epsilon), eps_high=float(t.epsilon_high),
                                     beta=float(t.beta), kl_kind=t.kl_estimator, mode=t.loss_agg,
                                     normaliser=normaliser, max_reflection_tokens=max_reflection,
                                     entropy=entropy,
                                     is_weights=grpo.tis_weights(logp, sampler_logp, m, float(t.is_cap)) if tis else None)
        loss.backward()
        stats["loss"] = loss.item()
        stats["sampler_logp_diff"] = _abs_diff_sum(logp.detach().cpu(), sampler_logp.cpu(), m.cpu())
        if tis:
            stats.update(grpo.tis_stats(logp, sampler_logp, m, float(t.is_cap)))
        accumulate(totals, stats)
    trainable = [p for p in model.parameters() if p.requires_grad]
    dist.all_reduce_grads(trainable)                    # Σ over ranks = the single-process gradient
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, float(t.max_grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return finish_stats(reduce_totals(totals), fsdp.scalar(grad_norm))


# a rank whose share of the step has no episode: it still joins the normaliser and gradient all-reduces
EMPTY_BATCH = {"input_ids": torch.zeros((0, 1), dtype=torch.long), "segment_ids": torch.zeros((0, 1), dtype=torch.long),
               "attention_mask": torch.zeros((0, 1), dtype=torch.long), "old_logprobs": torch.zeros((0, 1)),
               "reflection_truncated": torch.zeros((0,), dtype=torch.bool)}


# ============================================================================ data

@dataclass
class FailureCursor:
    """Walks the failure set in a fresh seeded permutation per epoch; (epoch, index, held_back) is the
    whole state, so a resumed run draws exactly the batches the uninterrupted run would have drawn.

    A batch that crosses an epoch boundary must not repeat a query (two identical groups = double
    weight): the queries it already took from the old epoch are moved to the back of the new epoch's
    order (`held_back`), so the batch completes with other queries and every query still comes once
    per epoch. Needs k <= n (the trainer refuses batch_queries > failure queries)."""
    n: int
    seed: int
    epoch: int = 0
    index: int = 0
    held_back: tuple[int, ...] = ()

    def order(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng(derive_seed(self.seed, "data", epoch)).permutation(self.n)
        if epoch != self.epoch or not self.held_back:
            return perm
        back = set(self.held_back)
        return np.array([i for i in perm if i not in back] + [i for i in perm if i in back], dtype=perm.dtype)

    def draw(self, k: int) -> list[int]:
        if k > self.n:
            raise ValueError(f"cannot draw {k} distinct queries from {self.n}")
        out: list[int] = []
        while len(out) < k:
            if self.index == self.n:
                self.epoch, self.index, self.held_back = self.epoch + 1, 0, tuple(out)
            take = min(k - len(out), self.n - self.index)
            out += self.order(self.epoch)[self.index:self.index + take].tolist()
            self.index += take
        return out

    def state(self) -> dict[str, Any]:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "index": self.index,
                "held_back": list(self.held_back)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "FailureCursor":
        held = tuple(int(i) for i in state.get("held_back", ()))
        return cls(**{k: int(state[k]) for k in ("n", "seed", "epoch", "index")}, held_back=held)


def load_failure_set(run: str | None, min_pass: float, max_pass: float,
                     task: str | None = None) -> tuple[list[Example], list[dict]]:
    """The failed queries of a collect-failures run (of `task`) with min_pass ≤ pass rate ≤ max_pass."""
    from rrr.failures import load_failures

    if not run:
        raise UserError("train.failures is not set; run `rrr collect-failures ...` and pass "
                        "train.failures=<its run dir>")
    if not Path(run).is_dir():
        raise UserError(f"train.failures={run!r} is not a directory; pass the run dir of rrr collect-failures")
    examples, stored = load_failures(run)
    other = sorted({e.task for e in examples} - {task}) if task else []
    if other:
        raise UserError(f"train.failures={run} holds {', '.join(other)} queries, but task={task}; pass "
                        f"task={other[0]} or a failure set collected with task={task}")
    keep = [i for i, s in enumerate(stored)
            if min_pass <= s["pass_rate"] <= max_pass and s["token_ids"]]
    if not keep:
        raise UserError(f"no failed queries in {run} with {min_pass} <= pass rate <= {max_pass}; "
                        "widen train.min_pass_rate/train.max_pass_rate or collect more failures")
    return [examples[i] for i in keep], [stored[i] for i in keep]


def check_stored_prompts(tokenizer, task, examples: Sequence[Example], stored: Sequence[dict],
                         prompts_cfg, run: str) -> None:
    """A stored attempt 1 continues the prompt it was sampled after; the trainer rebuilds that prompt
    from the example, the prompts and the tokenizer. If they differ (other prompts, model or template),
    the episode would splice the attempt onto a prompt it never saw: refuse."""
    for example, s in zip(examples, stored):
        rebuilt = rollout.prompt_ids(tokenizer, task, example, prompts_cfg)
        if list(s["prompt_token_ids"]) != rebuilt:
            at = next((i for i, (a, b) in enumerate(zip(s["prompt_token_ids"], rebuilt)) if a != b),
                      min(len(rebuilt), len(s["prompt_token_ids"])))
            raise UserError(f"train.failures={run}: the stored attempt-1 prompt of query {example.id} differs "
                            f"from the prompt rebuilt now (first difference at token {at}); the failure set "
                            "was collected with other prompts, model or chat template: use the same prompts.* "
                            "and model= as rrr collect-failures, or collect again")


# ============================================================================ setup

def validate(cfg: DictConfig) -> None:
    t = cfg.train
    check_settings(cfg, COMMAND)
    check_logger(cfg)
    choices = {"finetune": ("lora", "full"), "attempt1": ("stored", "online"), "zero_std": ("keep", "skip", "resample"),
               "lr_schedule": ("cosine", "constant"), "kl_estimator": ("k1", "k3"),
               "scale_rewards": ("group", "none"), "loss_agg": grpo.LOSS_AGGREGATIONS,
               "is_correction": grpo.IS_CORRECTIONS}
    for key, allowed in choices.items():
        if t[key] not in allowed:
            raise UserError(f"train.{key}={t[key]!r}; valid choices: {', '.join(allowed)}")
    for key in ("steps", "batch_queries", "group_size", "micro_batch_size", "save_every"):
        if int(t[key]) < 1:
            raise UserError(f"train.{key} must be >= 1")
    try:
        mmap_mb = float(t.malloc_mmap_threshold_mb)
    except (TypeError, ValueError):
        mmap_mb = -1.0
    if not mmap_mb >= 0:
        raise UserError(f"train.malloc_mmap_threshold_mb={t.malloc_mmap_threshold_mb!r}: a size in MB >= 0 (0 = glibc's default)")
    if int(t.group_size) < 2:
        raise UserError("train.group_size must be >= 2: a group of one has no baseline (paper: 8)")
    if t.parallel not in ("ddp", "fsdp"):
        raise UserError(f"train.parallel={t.parallel!r}; valid choices: ddp, fsdp")
    fsdp.check(cfg)
    sync.logprob_diff_limit(cfg)                      # a bad engine.max_logprob_diff fails before any work
    if t.leak not in LEAK_MODES:
        raise UserError(f"train.leak={t.leak!r}; valid choices: {', '.join(LEAK_MODES)}")
    if t.is_correction == "token_tis" and not float(t.is_cap) >= 1:
        raise UserError(f"train.is_cap={t.is_cap}: the truncation cap C must be >= 1 (verl, TRL: 2)")
    trained = t.sampling.reflection           # the loss is on reflection tokens: their log-probs must be exact
    if not float(trained.temperature) > 0:
        raise UserError(f"train.sampling.reflection.temperature={trained.temperature}: training needs T > 0 "
                        "(a greedy token has no sampling distribution to score)")
    if float(trained.top_p) != 1.0:
        raise UserError(f"train.sampling.reflection.top_p={trained.top_p}: training supports only top_p=1 "
                        "(the trainer scores the full tempered softmax, not the renormalised nucleus)")


def sampling_temperatures(sampling_cfg) -> dict[Segment, float]:
    """The temperature each sampled segment was drawn at (the trainer and reference score logits / T)."""
    return {Segment[name.upper()]: float(sampling_cfg[name].temperature) or 1.0 for name in SEGMENTS}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_policy(cfg: DictConfig):
    from rrr.models import apply_lora, load_for_training, merge_adapter

    malloc_mmap_threshold(int(float(cfg.train.malloc_mmap_threshold_mb) * 2**20))
    model, tokenizer = load_for_training(cfg.model, cfg.train.finetune)   # full + bf16: fp32 master weights
    if cfg.train.finetune == "full":
        model = merge_adapter(model)                 # model.path = an adapter: train all weights of base + adapter
    if cfg.train.gradient_checkpointing:   # recompute layer activations in backward: memory ∝ 1 layer, not all
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.train.finetune == "lora":
        model = apply_lora(model, cfg.model)
    if tokenizer.pad_token_id is None:
        raise UserError(f"the tokenizer of model {cfg.model.name} has no pad token; set one in the model config")
    if cfg.train.parallel == "fsdp":
        model = fsdp.shard(model)
    return model, tokenizer


def malloc_mmap_threshold(nbytes: int) -> bool:
    """Serve CPU allocations of at least `nbytes` with their own mmap (glibc's M_MMAP_THRESHOLD), so freed
    tensors go back to the OS at once. glibc's default threshold grows with the sizes freed (up to 32 MB),
    and the per-layer activations and LM-head chunks of a CPU train step then pile up in the heap as freed
    but resident memory: 8.2 GB peak RSS instead of 3 GB for a 0.5B LoRA step (bench/train_memory.py).
    Setting it also fixes the trim threshold. 0 leaves glibc alone; a no-op off glibc. True when set."""
    if nbytes <= 0:
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, nbytes)) and bool(mallopt(M_TRIM_THRESHOLD, nbytes))


def build_reference(cfg: DictConfig, model) -> Callable[..., torch.Tensor] | None:
    """π_ref log-probs on the loss positions: the policy the run starts from, frozen. For LoRA on a bare
    base model that is the policy with its adapters disabled (no copy); when the run starts from a
    trained adapter (`model.path` = a LoRA checkpoint) or fine-tunes fully, a frozen copy of the initial
    model (the adapter merged in). None when β = 0: no reference is loaded or computed."""
    if float(cfg.train.beta) == 0:
        return None
    chunk = int(cfg.train.logprob_chunk_size)
    if cfg.train.finetune == "lora" and not starts_from_adapter(cfg):
        def lora_reference(ids, attention_mask, mask, temperature=1.0):
            with torch.no_grad(), model.disable_adapter():
                return masked_logprobs(model, ids, attention_mask, mask, chunk, temperature)[0]
        return lora_reference
    if fsdp.is_sharded(model):                       # a sharded policy cannot be copied: load and shard again
        frozen = fsdp.shard(fsdp.fresh_copy(cfg).requires_grad_(False)).eval()
    else:
        frozen = copy.deepcopy(model)
        if hasattr(frozen, "merge_and_unload"):      # a run started from an adapter: merge it into the copy
            frozen = frozen.merge_and_unload()
        frozen = frozen.eval().requires_grad_(False)

    def frozen_reference(ids, attention_mask, mask, temperature=1.0):
        with torch.no_grad():
            return masked_logprobs(frozen, ids, attention_mask, mask, chunk, temperature)[0]
    return frozen_reference


def starts_from_adapter(cfg: DictConfig) -> bool:
    return bool(cfg.model.get("path")) and (Path(cfg.model.path) / "adapter_config.json").exists()


def build_optimizer(cfg: DictConfig, model):
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(t.lr), weight_decay=float(t.weight_decay),
                                  betas=(float(t.adam_betas[0]), float(t.adam_betas[1])))
    schedule = lr_lambda(int(t.warmup_steps), int(t.steps), t.lr_schedule)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def lr_lambda(warmup: int, total: int, schedule: str) -> Callable[[int], float]:
    """LR multiplier at optimizer step s (0-based): linear warm-up to 1 over `warmup` steps (the first
    step already learns), then constant or cosine decay to 0 at `total`."""
    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
    return factor


def build_engine(cfg: DictConfig, model, tokenizer):
    from rrr.engines import build_engine as build

    if fsdp.is_sharded(model):                       # FSDP forwards are collective: sample from a full copy
        return fsdp.GatheredEngine(cfg, tokenizer, build)
    return build(cfg, model, tokenizer)


def resume_fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """What must not change when a run is resumed: anything that changes the steps still to come
    (`train.steps` too: it sets the LR schedule). Only `train.save_every`, `log.*` and `logger.*` may."""
    train = OmegaConf.to_container(cfg.train, resolve=True)
    train.pop("save_every")
    return {"task": OmegaConf.to_container(cfg.task, resolve=True),
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "prompts": OmegaConf.to_container(cfg.prompts, resolve=True),
            "engine": str(cfg.engine.name), "seed": int(cfg.seed), "train": train}


def train_manifest(cfg: DictConfig, examples: Sequence[Example]) -> dict[str, Any]:
    from rrr.runs import examples_sha256
    from rrr.models import model_provenance

    return {"resume_fingerprint": resume_fingerprint(cfg),
            "failures": str(cfg.train.failures), "failure_queries": len(examples),
            "failures_sha256": examples_sha256(examples), "model": model_provenance(cfg.model),
            "train": OmegaConf.to_container(cfg.train, resolve=True), "world_size": dist.world(),
            "seeds": {"run_seed": int(cfg.seed),
                      "derivation": "derive_seed(run_seed, step, example_id, sample_index, segment)"}}


# ============================================================================ logging

def rollout_stats(groups: Sequence[Sequence[Any]], rewards: torch.Tensor) -> dict[str, float]:
    episodes = [ep for g in groups for ep in g]
    lengths = [segment_len(ep, Segment.REFLECTION) for ep in episodes]
    stats = {"reward_mean": _nanmean(rewards), "unscorable": int(rewards.isnan().sum()),
             "episodes": len(episodes), "groups": len(groups),
             "mixed_groups": int((~grpo.zero_std_groups(rewards)).sum()),   # after resampling: carry advantage
             "reflection_len_mean": float(np.mean(lengths)) if lengths else 0.0,
             "reflection_len_p95": float(np.percentile(lengths, 95)) if lengths else 0.0}
    for seg in SEGMENTS:
        flags = [bool(ep.truncated.get(seg, False)) for ep in episodes]
        stats[f"truncated_{seg}"] = float(np.mean(flags)) if flags else 0.0
    return stats


def segment_len(episode, segment: Segment) -> int:
    return int((np.asarray(episode.segment_ids) == segment).sum())


def generated_tokens(groups: Sequence[Sequence[Any]]) -> int:
    return sum(segment_len(ep, Segment.REFLECTION) + segment_len(ep, Segment.ATTEMPT2) for g in groups for ep in g)


MAX_STATS = ("ratio_max", "is_ratio_max")


def accumulate(totals: dict[str, float], stats: dict[str, float]) -> None:
    """Sum what sums over micro-batches; weight token means by the micro-batch's reflection tokens."""
    n = stats["reflection_tokens"]
    for key, value in stats.items():
        if key in ("loss", "policy_loss", "kl", "reflection_tokens"):
            totals[key] = totals.get(key, 0.0) + value
        elif key in MAX_STATS:
            totals[key] = max(totals.get(key, -math.inf), value)
        elif key == "sampler_logp_diff":
            totals[key] = totals.get(key, 0.0) + value     # a sum over tokens; divided in finish_stats
        else:
            totals[key] = totals.get(key, 0.0) + value * n


def finish_stats(totals: dict[str, float], grad_norm: float) -> dict[str, float]:
    n = max(totals.get("reflection_tokens", 0.0), 1.0)
    out = {k: v / n if k not in ("loss", "policy_loss", "kl", "reflection_tokens", *MAX_STATS) else v
           for k, v in totals.items()}
    out["grad_norm"] = grad_norm
    return out


def reduce_totals(totals: dict[str, float]) -> dict[str, float]:
    """The step's sums over all ranks (`ratio_max`: the maximum); identity for one process."""
    if dist.world() == 1:
        return totals
    keys = [k for k in empty_update() if k != "grad_norm"]
    if dist.all_reduce_max(float("is_ratio_mean" in totals)) > 0:      # token_tis on any rank: the same keys on all
        keys += ["is_ratio_mean", "is_ratio_max", "is_capped_frac"]
    sums = dist.all_reduce_sum(torch.tensor([totals.get(k, 0.0) if k not in MAX_STATS else 0.0 for k in keys],
                                            dtype=torch.float64))
    out = {k: float(v) for k, v in zip(keys, sums) if k not in MAX_STATS}
    for k in MAX_STATS:
        if k in keys:
            out[k] = dist.all_reduce_max(totals.get(k, -math.inf))
    return out


def gather_groups(queries, groups, rewards: torch.Tensor, advantages: torch.Tensor):
    """Every rank's queries, groups, rewards [Q, G] and advantages [Q, G], in single-process order."""
    if dist.world() == 1:
        return queries, groups, rewards, advantages
    g = rewards.shape[1] if rewards.dim() == 2 else 0
    queries, groups = dist.gather(queries), dist.gather(groups)
    rewards = torch.tensor(dist.gather(rewards.tolist()), dtype=torch.float32).reshape(-1, g)
    advantages = torch.tensor(dist.gather(advantages.tolist()), dtype=torch.float32).reshape(-1, g)
    return queries, groups, rewards, advantages


def main_print(message: str) -> None:
    if dist.is_main():
        print(message, flush=True)


def ranks_note(run_dir: Path) -> str:
    """A resume on another number of ranks is allowed (batches, seeds and gradients do not depend on it):
    say so in the resume line, and record the new count."""
    import json

    path = run_dir / "manifest.json"
    before = json.loads(path.read_text()).get("world_size", 1) if path.exists() else 1
    if before == dist.world():
        return ""
    if dist.is_main():
        update_manifest(run_dir, world_size=dist.world())
    return (f" on {dist.world()} rank(s); it ran on {before}: the global batch, the sampling seeds and the "
            "gradient do not depend on the rank count")


def empty_update() -> dict[str, float]:
    return {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "ratio_mean": 1.0, "ratio_max": 1.0,
            "clip_frac_low": 0.0, "clip_frac_high": 0.0, "reflection_tokens": 0, "entropy": 0.0,
            "sampler_logp_diff": 0.0, "grad_norm": 0.0}


def _abs_diff_sum(logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor) -> float:
    """Σ |policy logp − sampler logp| on reflection tokens: ≈ 0 when the engine sampled the trained weights."""
    return torch.where(mask, (logp - sampler_logp).abs(), 0).sum().item()


def _nanmean(x: torch.Tensor) -> float:
    return float(x.nanmean()) if x.numel() and not x.isnan().all() else 0.0


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2   # Linux reports KiB


def write_episodes(run_dir: Path, step: int, queries: Sequence[Example], groups, rewards, advantages) -> None:
    import pandas as pd

    rows = []
    for q, (example, group) in enumerate(zip(queries, groups)):
        for g, ep in enumerate(group):
            rows.append({"step": step, "query_id": example.id, "group": q, "sample": g,
                         **{f"{s}_text": ep.texts.get(s, "") for s in SEGMENTS},
                         **{f"{s}_tokens": segment_len(ep, Segment[s.upper()]) for s in SEGMENTS},
                         **{f"{s}_truncated": bool(ep.truncated.get(s, False)) for s in SEGMENTS},
                         "reward": float(rewards[q, g]), "advantage": float(advantages[q, g]),
                         "token_ids": list(map(int, ep.token_ids)),
                         "segment_ids": list(map(int, ep.segment_ids))})
    atomic_write_parquet(run_dir / "episodes" / f"step_{step:05d}.parquet", pd.DataFrame(rows))


class Logger:
    """wandb (lazy import, offline by default) or nothing; `id` goes into every checkpoint."""

    def __init__(self, run=None):
        self.run = run
        self.id = run.id if run is not None else None

    def __call__(self, row: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if v is not None}, step=int(row["step"]))

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def build_logger(cfg: DictConfig, run_dir: Path, run_id: str | None) -> Logger:
    if cfg.logger.name != "wandb" or not dist.is_main():
        return Logger()
    import wandb

    try:
        run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, mode=cfg.logger.mode,
                         dir=str(run_dir), id=run_id, resume="allow", name=run_dir.name,
                         config=OmegaConf.to_container(cfg, resolve=True))
    except Exception as e:  # noqa: BLE001 — wandb raises its own error types for auth and network
        raise UserError(f"wandb could not start ({type(e).__name__}: {str(e).strip()[:160]}); "
                        "check `wandb login`, or use logger.mode=offline") from None
    return Logger(run)


def progress(cfg: DictConfig, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=int(cfg.train.steps), initial=start, unit="step", desc="train",
                disable=not cfg.log.progress or not dist.is_main())


def save(run_dir: Path, name: str, model, tokenizer, optimizer, scheduler, step: int,
         cursor: FailureCursor, logger: Logger) -> Path:
    return ckpt.save_checkpoint(run_dir, name, model=model, tokenizer=tokenizer, optimizer=optimizer,
                                scheduler=scheduler, step=step, cursor=cursor.state(), wandb_run_id=logger.id)
