"""`rrr train`: reflection-masked GRPO on a failure set, as one recipe that reads top to bottom.

One step of Reflect, Retry, Reward (paper §3; DESIGN.md "GRPO on reflections"):
  1. draw `train.batch_queries` failed queries (seeded, epoch-aware cursor) and their failed attempt 1
     (stored in the failure set, or sampled online: a passing attempt 1 ends that episode);
  2. REFLECT: G = `train.group_size` reflections per failed attempt; RETRY: one attempt 2 per reflection;
  3. REWARD: r = verify(attempt 2) ∈ {0, 1} (unscorable = NaN); group-normalised advantages;
     zero-variance groups are counted and kept, skipped, re-sampled, or replaced by further failed
     queries until the step holds `batch_queries` mixed groups (`train.zero_std=dynamic`, DAPO);
     an optional overlong penalty on reflections near the cap (`train.overlong_buffer`, DAPO);
  4. UPDATE: one on-policy PPO-clip step (ρ = 1 in value) with β·KL to the reference on reflection
     tokens only, gradient accumulation over micro-batches, grad clipping, AdamW, warm-up + schedule.
The loop is `run()`; below it, the algorithm's pieces and `policy_update`. Plumbing lives beside it:
rrr/train_setup.py (settings, policy, reference, optimizer, engine), rrr/failure_set.py (the failed queries
and the cursor that draws them), rrr/train_log.py (metrics and their rank reductions, episodes, wandb).

Under torchrun / accelerate launch the loop is the same loop on every rank (rrr/distributed.py): each rank
rolls out its contiguous share of the step's queries (whole groups), the loss normaliser and the logged
statistics are global, gradients are summed over ranks, and rank 0 alone writes the run dir.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from rrr import checkpoint as ckpt
from rrr import distributed as dist
from rrr import fsdp, grpo, preemption, rollout, shared_prefix, sync
from rrr.engines.base import Sample, SamplingParams, derive_seed
from rrr.episode import Episode, collate
from rrr.failure_set import FailureCursor, check_stored_prompts, load_failure_set
from rrr.leak import apply_leak_policy, leak_flags
from rrr.logprobs import segment_temperatures
from rrr.rollout import sampling_from_cfg
from rrr.metrics_file import MetricsWriter
from rrr.run_dir import RunDir
from rrr.config import UserError
from rrr.tasks import Example, get_task
from rrr.train_log import (Logger, accumulate, build_logger, empty_update, finish_stats, main_print, progress,
                           ranks_note, reduce_totals, sampler_abs_diff_sum, step_metrics, write_episodes)
from rrr.train_setup import (COMMAND, build_engine, build_optimizer, build_policy, build_reference,
                             resume_fingerprint, sampling_temperatures, seed_everything, train_manifest, validate)
from rrr.verifiers import Verdict


@dataclass
class Rollouts:
    """What every rollout call of a run needs, built once (instead of ten positional arguments): the
    engine, tokenizer, task, prompt templates, per-segment sampling, run seed, and this step's verifier
    counters (`stats`, fresh each step via `for_step`)."""
    engine: Any
    tokenizer: Any
    task: Any
    prompts: Any
    sampling: dict[str, SamplingParams]
    seed: int
    group_size: int
    leak: str = "keep"
    stats: rollout.RolloutStats = field(default_factory=rollout.RolloutStats)

    def for_step(self) -> "Rollouts":
        return replace(self, stats=rollout.RolloutStats())


def run(cfg: DictConfig) -> Path:
    t = cfg.train
    validate(cfg)
    rundir = RunDir.open(cfg, COMMAND, resume_fingerprint(cfg))   # named by rank 0, locked, other settings refused
    run_dir = rundir.path
    examples, stored = load_failure_set(t.failures, t.min_pass_rate, t.max_pass_rate, cfg.task.name)
    if t.batch_queries > len(examples):
        raise UserError(f"train.batch_queries={t.batch_queries} > the {len(examples)} failed queries in "
                        f"{t.failures}: a step would draw a query twice; lower train.batch_queries or collect more")
    seed_everything(cfg.seed)                        # a resume restores the checkpoint's RNG state instead

    # ----------------------------------------------------------------- setup (plumbing)
    model, tokenizer = build_policy(cfg)
    reference = build_reference(cfg, model)          # before any checkpoint: π_ref = the initial model
    optimizer, scheduler = build_optimizer(cfg, model)
    engine = build_engine(cfg, model, tokenizer)
    task = get_task(cfg.task.name)
    if t.attempt1 == "stored":
        check_stored_prompts(tokenizer, task, examples, stored, cfg.prompts, t.failures)
    ctx = Rollouts(engine, tokenizer, task, cfg.prompts, sampling_from_cfg(t.sampling), int(cfg.seed),
                   t.group_size, t.leak)
    cursor = FailureCursor(n=len(examples), seed=int(cfg.seed))
    state = ckpt.load_latest_checkpoint(run_dir, model=model, optimizer=optimizer, scheduler=scheduler)
    rundir.claim()                                   # inputs valid, model loaded: now the run dir is written
    metrics = MetricsWriter(run_dir / "metrics.jsonl")
    start, wandb_id = 0, None
    if state is not None:
        start, wandb_id, cursor = state.step, state.wandb_run_id, FailureCursor.from_state(state.cursor)
        engine.load_weights(model)                    # the sampler must see the restored weights
        main_print(f"resuming {run_dir} from {state.path.name} (step {start}){ranks_note(run_dir)}")
    else:
        rundir.write_run_files(cfg, extra=train_manifest(cfg, examples))
    if dist.is_main():
        ckpt.remove_partial(run_dir)
        metrics.truncate_after(start)                 # rows of steps after the checkpoint are re-done
    dist.barrier()
    logger = build_logger(cfg, run_dir, wandb_id)
    bar = progress(cfg, start)

    for step in range(start + 1, t.steps + 1):
        t0 = time.time()
        dist.at_step(step)                           # named by a collective that times out
        # ----------------------------------------------------------------- ALGO: reflect, retry, reward
        ctx = ctx.for_step()
        if t.zero_std == "dynamic":       # draw further failed queries until batch_queries groups are mixed
            queries, attempts1, groups, rewards, attempt1_stats, draws = dynamic_sampling(
                ctx, cursor, examples, stored, t.attempt1, t.batch_queries, t.max_draws, step)
        else:
            batch = dist.shard(cursor.draw(t.batch_queries))   # this rank's share, in single-process order
            queries, attempts1, groups, rewards, attempt1_stats = rollout_groups(
                ctx, t.attempt1, [examples[i] for i in batch], [stored[i] for i in batch], step)
            draws = 1
        zero_std = grpo.zero_std_groups(rewards)                                # [Q]
        if t.zero_std == "resample":
            groups, rewards = resample_zero_std(ctx, queries, attempts1, step, groups, rewards, t.resample_tries)
        # advantages from the reward minus the reflection-length penalty; "mixed" stays the verifier's
        shaped = rewards - length_penalty(groups, ctx.group_size, t.sampling.reflection.max_tokens,
                                          t.overlong_buffer, t.overlong_penalty)   # [Q, G]
        advantages = grpo.group_advantages(shaped, t.scale_rewards)            # [Q, G]
        keep = ~grpo.zero_std_groups(rewards) if t.zero_std in ("skip", "resample", "dynamic") else \
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
        row, (queries, groups, rewards, advantages) = step_metrics(
            step, task, queries, groups, rewards, advantages, update, zero_std, attempt1_stats, ctx.stats,
            lr=lr, gen_s=gen_s, sync_s=sync_s, t0=t0, draws=draws)
        if dist.is_main():
            metrics.write(row)
            logger(row)
            if step % cfg.log.episodes_every == 0:
                write_episodes(run_dir, step, queries, groups, rewards, advantages)
        sync.check_logprob_diff(step, row["sync/logprob_diff"], sync.logprob_diff_limit(cfg))
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", loss=f"{row['loss']:.4f}")
        preempted = step < t.steps and preemption.requested_everywhere()    # SIGTERM/SIGUSR1: save, exit 75
        if step % t.save_every == 0 or preempted:
            save(run_dir, f"step_{step:05d}", model, tokenizer, optimizer, scheduler, step, cursor, logger)
            ckpt.prune_checkpoints(run_dir, t.keep_checkpoints, step)      # train.keep_checkpoints
        if preempted:
            raise preemption.Preempted(run_dir, f"checkpoint step_{step:05d} written")
    bar.close()
    final = save(run_dir, "final", model, tokenizer, optimizer, scheduler, t.steps, cursor, logger)
    rundir.finish(final_checkpoint=str(final))        # rank 0 writes it
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


def first_attempts(ctx: Rollouts, mode: str, queries: Sequence[Example], stored: Sequence[dict],
                   step: int) -> tuple[list[FailedAttempt | None], dict[str, Any]]:
    """Attempt 1 per query: a stored failed attempt (`mode="stored"`, deterministic pick), or sampled online.
    Online, a passing (or unscorable) attempt 1 ends its episode (None). The second value holds the
    online attempt-1 pass rate over the *scorable* attempts and the count of unscorable ones."""
    if mode == "stored":
        return [stored_attempt(s, q, ctx.seed, step) for q, s in zip(queries, stored)], \
            {"attempt1_pass_rate": None, "unscorable_attempt1": 0, "scored_attempt1": 0}
    online = [a[0] for a in rollout.sample_attempts(ctx.engine, ctx.tokenizer, ctx.task, list(queries), ctx.prompts,
                                                    ctx.sampling["attempt1"], n=1, seed=ctx.seed, step=step,
                                                    stats=ctx.stats)]
    scored = [bool(a.verdict.correct) for a in online if a.verdict is not rollout.UNSCORABLE]
    return [None if a.verdict.correct or a.verdict is rollout.UNSCORABLE else FailedAttempt(a.sample, a.verdict)
            for a in online], {"attempt1_pass_rate": float(np.mean(scored)) if scored else None,
                               "unscorable_attempt1": len(online) - len(scored),
                               "scored_attempt1": len(scored)}


def rollout_groups(ctx: Rollouts, mode: str, queries: Sequence[Example], stored: Sequence[dict], step: int):
    """Attempt 1, then G reflections → retries for the failed ones: (queries with a group, their attempts 1,
    [Q][G] episodes, [Q, G] rewards (NaN = unscorable), attempt-1 statistics)."""
    attempts1, attempt1_stats = first_attempts(ctx, mode, queries, stored, step)
    failed = [i for i, a in enumerate(attempts1) if a is not None]           # online: a pass ends the episode
    queries, attempts1 = [queries[i] for i in failed], [attempts1[i] for i in failed]
    groups = reflect_retry(ctx, queries, attempts1, step)
    return queries, attempts1, groups, group_scores(ctx, queries, groups), attempt1_stats


def dynamic_sampling(ctx: Rollouts, cursor: FailureCursor, examples: Sequence[Example], stored: Sequence[dict],
                     mode: str, want: int, max_draws: int, step: int):
    """DAPO's dynamic sampling over failed queries: draw `want` queries (weighted by the cursor's per-query
    mixing statistics), roll them out, keep drawing *other* queries for the groups still missing, until
    `want` groups have reward variance or `max_draws` draws are spent. Every drawn group is returned
    (the caller trains on the mixed ones); each query comes at most once a step, so its seeds stay
    (seed, step, query). Every rank records every group, so the cursor stays the same on all ranks.
    Returns (queries, attempts1, groups, rewards [Q, G], attempt-1 statistics, draws)."""
    out: tuple[list, list, list, list] = ([], [], [], [])
    stats, taken, mixed_total, draws = [], [], 0, 0
    while mixed_total < want and draws < max_draws:
        picked = cursor.draw_weighted(want - mixed_total, exclude=taken)       # the same on every rank
        draws += 1
        if not picked:
            break
        taken += picked
        mine = dist.shard(picked)
        queries, attempts1, groups, rewards, attempt1_stats = rollout_groups(
            ctx, mode, [examples[i] for i in mine], [stored[i] for i in mine], step)
        mixed = dict(zip((q.id for q in queries), (~grpo.zero_std_groups(rewards)).tolist()))
        for index, is_mixed in dist.gather([(i, mixed.get(examples[i].id, False)) for i in mine]):
            cursor.record(index, is_mixed)     # an online pass has no group: a try that did not mix
            mixed_total += int(is_mixed)
        for acc, part in zip(out, (queries, attempts1, groups, [rewards])):
            acc.extend(part)
        stats.append(attempt1_stats)
    rewards = torch.cat(out[3]) if out[3] else torch.zeros((0, ctx.group_size))
    return out[0], out[1], out[2], rewards, merge_attempt1_stats(stats), draws


def merge_attempt1_stats(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Attempt-1 statistics of several draws: pass rate weighted by scored attempts, counts summed."""
    scored = sum(p["scored_attempt1"] for p in parts)
    passed = sum((p["attempt1_pass_rate"] or 0.0) * p["scored_attempt1"] for p in parts)
    return {"attempt1_pass_rate": passed / scored if scored else None, "scored_attempt1": scored,
            "unscorable_attempt1": sum(p["unscorable_attempt1"] for p in parts)}


def length_penalty(groups: Sequence[Sequence[Episode]], group_size: int, max_tokens: int, buffer: int,
                   factor: float) -> torch.Tensor:
    """[Q, G] overlong penalty of each group's reflections (grpo.overlong_penalty; zeros when off)."""
    lengths = torch.tensor([[ep.reflection_length for ep in g] for g in groups], dtype=torch.float32)
    truncated = torch.tensor([[bool(ep.truncated.get("reflection", False)) for ep in g] for g in groups])
    shape = (len(groups), group_size)
    return grpo.overlong_penalty(lengths.reshape(shape), truncated.reshape(shape), max_tokens, buffer, factor)


def stored_attempt(stored: dict, example: Example, seed: int, step: int) -> FailedAttempt:
    """One of the query's stored failed attempts, picked by a seed derived from (seed, step, example)."""
    k = derive_seed(seed, step, example.id, 0, "stored_attempt1") % len(stored["token_ids"])
    sample = Sample(token_ids=list(stored["token_ids"][k]),
                    finish_reason="length" if stored["truncated"][k] else "stop")
    return FailedAttempt(sample, Verdict(False, stored["reasons"][k]))


def reflect_retry(ctx: Rollouts, queries: Sequence[Example], attempts1: Sequence[FailedAttempt], step: int,
                  seed: int | None = None) -> list[list[Episode]]:
    """REFLECT G times per failed attempt 1, RETRY once per reflection, verify: [Q][G] episodes.
    `seed` (default: the run seed) names the draw; a re-draw passes a seed of its own."""
    if not queries:
        return []
    return rollout.reflect_retry(ctx.engine, ctx.tokenizer, ctx.task, list(queries), [a.sample for a in attempts1],
                                 ctx.prompts, ctx.sampling, group_size=ctx.group_size,
                                 seed=ctx.seed if seed is None else seed, step=step,
                                 verdicts1=[a.verdict for a in attempts1], stats=ctx.stats)


def group_scores(ctx: Rollouts, queries: Sequence[Example], groups) -> torch.Tensor:
    """[Q, G] rewards of the retries, with `train.leak` applied to reflections that hold an answer."""
    rewards = group_rewards(groups, ctx.group_size)                           # [Q, G], NaN = unscorable
    return apply_leak_policy(rewards, leak_flags(ctx.task, queries, groups), ctx.leak)


def group_rewards(groups: Sequence[Sequence[Any]], group_size: int) -> torch.Tensor:
    """[Q][G] episodes -> [Q, G] rewards: 1/0 from the retry's verdict, NaN when it was unscorable."""
    if any(len(g) != group_size for g in groups):   # a shrunken group would silently change the baseline
        raise RuntimeError(f"rollout returned groups of sizes {[len(g) for g in groups]}, expected {group_size}")
    rewards = [[episode_reward(ep) for ep in g] for g in groups]
    return torch.tensor(rewards, dtype=torch.float32).reshape(len(groups), group_size)


def episode_reward(episode: Episode) -> float:
    return float("nan") if episode.reward is None else float(episode.reward)


def resample_zero_std(ctx: Rollouts, queries, attempts1, step: int, groups, rewards: torch.Tensor, tries: int):
    """Re-draw the reflections of zero-variance groups of the same queries (fresh seeds per try) up to
    `tries` times; a group keeps its first draw that has reward variance."""
    groups, rewards = list(groups), rewards.clone()
    for attempt in range(1, tries + 1):
        redo = grpo.zero_std_groups(rewards).nonzero().flatten().tolist()
        if not redo:
            break
        redo_queries = [queries[q] for q in redo]
        fresh = reflect_retry(ctx, redo_queries, [attempts1[q] for q in redo], step,
                              seed=derive_seed(ctx.seed, "resample", attempt))
        fresh_rewards = group_scores(ctx, redo_queries, fresh)
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
    max_reflection = t.sampling.reflection.max_tokens
    # the whole step's normaliser, over all ranks: each rank's gradient is its share of the global loss
    normaliser = dist.all_reduce_sum(grpo.loss_normaliser(mask, t.loss_agg, max_reflection))
    device = next(model.parameters()).device
    totals: dict[str, float] = {}
    shared = t.shared_prefix                            # each group's prefix through the backbone once (exact)
    micro = shared_prefix.update_micro_batches(batch["input_ids"], batch["attention_mask"], batch["segment_ids"],
                                               t.micro_batch_size, shared)   # shared: whole groups
    for mb in fsdp.pad_micro_batches(model, micro):
        if mb is None:                                  # FSDP: this rank has fewer micro-batches than another
            fsdp.idle_step(model, reference, tokenizer.pad_token_id, t.logprob_chunk_size)
            continue
        # Causal attention: tokens after the last reflection token (retry prompt, attempt 2, padding)
        # cannot change a reflection log-prob, so the forward/backward stops there. Exact, and it saves
        # the retry's share of the update's compute.
        cols = mask[mb].any(0).nonzero()
        width = int(cols.max()) + 1 if len(cols) else 1
        ids, attn, m, temp, segs = (x[mb, :width].to(device) for x in (batch["input_ids"], batch["attention_mask"],
                                                                         mask, temps, batch["segment_ids"]))
        segs = segs if shared else None                 # segment ids: where each group's prefix ends
        logp, entropy = shared_prefix.update_logprobs(model, ids, attn, m, t.logprob_chunk_size, temp, segs)  # [b, T]
        ref_logp = reference(ids, attn, m, temp, segs) if reference is not None else None   # [b, T]
        sampler_logp = batch["old_logprobs"][mb, :width].to(device)                       # [b, T]
        tis = t.is_correction == "token_tis"          # truncated IS for the sampler ≠ trainer gap
        loss, stats = grpo.grpo_loss(logp, None, ref_logp, advantages[mb].to(device), m,
                                     eps_low=t.epsilon, eps_high=t.epsilon_high,
                                     beta=t.beta, kl_kind=t.kl_estimator, mode=t.loss_agg,
                                     normaliser=normaliser, max_reflection_tokens=max_reflection,
                                     entropy=entropy,
                                     is_weights=grpo.tis_weights(logp, sampler_logp, m, t.is_cap) if tis else None)
        loss.backward()
        stats["loss"] = loss.item()
        stats["sampler_logp_diff"] = sampler_abs_diff_sum(logp.detach().cpu(), sampler_logp.cpu(), m.cpu())
        stats.update(shared_prefix.update_token_stats(*(x[mb, :width] for x in (batch["input_ids"], batch["attention_mask"],
                                                                                 mask, batch["segment_ids"])), shared))
        if tis:
            stats.update(grpo.tis_stats(logp, sampler_logp, m, t.is_cap))
        accumulate(totals, stats)
    trainable = [p for p in model.parameters() if p.requires_grad]
    dist.all_reduce_grads(trainable)                    # Σ over ranks = the single-process gradient
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return finish_stats(reduce_totals(totals), fsdp.scalar(grad_norm))


# a rank whose share of the step has no episode: it still joins the normaliser and gradient all-reduces
EMPTY_BATCH = {"input_ids": torch.zeros((0, 1), dtype=torch.long), "segment_ids": torch.zeros((0, 1), dtype=torch.long),
               "attention_mask": torch.zeros((0, 1), dtype=torch.long), "old_logprobs": torch.zeros((0, 1)),
               "reflection_truncated": torch.zeros((0,), dtype=torch.bool)}


def save(run_dir: Path, name: str, model, tokenizer, optimizer, scheduler, step: int,
         cursor: FailureCursor, logger: Logger) -> Path:
    return ckpt.save_checkpoint(run_dir, name, model=model, tokenizer=tokenizer, optimizer=optimizer,
                                scheduler=scheduler, step=step, cursor=cursor.state(), wandb_run_id=logger.id)
