"""`rrr train`'s logging: per-step statistics of the rollout and the update, their reduction over ranks
(all collectives of the metrics row happen in `step_metrics`, in one place), the episodes parquet, the
wandb logger and the progress bar."""

from __future__ import annotations

import math
import resource
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rrr import distributed as dist
from rrr import grpo
from rrr.config import UserError
from rrr.episode import SAMPLED_SEGMENTS, Segment
from rrr.leak import leak_flags, leak_share
from rrr.atomic import atomic_write_parquet
from rrr.run_dir import update_manifest
from rrr.tasks import Example


def rollout_stats(groups: Sequence[Sequence[Any]], rewards: torch.Tensor) -> dict[str, float]:
    episodes = [ep for g in groups for ep in g]
    lengths = [segment_len(ep, Segment.REFLECTION) for ep in episodes]
    stats = {"reward_mean": _nanmean(rewards), "unscorable": int(rewards.isnan().sum()),
             "episodes": len(episodes), "groups": len(groups),
             "mixed_groups": int((~grpo.zero_std_groups(rewards)).sum()),   # after resampling: carry advantage
             "reflection_len_mean": float(np.mean(lengths)) if lengths else 0.0,
             "reflection_len_p95": float(np.percentile(lengths, 95)) if lengths else 0.0}
    for seg in SAMPLED_SEGMENTS:
        flags = [bool(ep.truncated.get(seg, False)) for ep in episodes]
        stats[f"truncated_{seg}"] = float(np.mean(flags)) if flags else 0.0
    return stats


# metrics row keys that measure the machine, not the training: they differ between equal runs
TIMING_KEYS = frozenset({"step_time_s", "gen_tokens_per_s", "peak_rss_gb", "sync/load_s", "mixed_groups_per_gen_s"})


def step_metrics(step: int, task, queries, groups, rewards: torch.Tensor, advantages: torch.Tensor,
                 update: dict[str, float], zero_std: torch.Tensor, attempt1: dict[str, Any], verifier,
                 *, lr: float, gen_s: float, sync_s: float, t0: float, draws: int = 1):
    """The step's metrics row over all ranks, and every rank's (queries, groups, rewards, advantages) in
    single-process order. All collectives of the row happen here, in the same order on every rank;
    `update` is already global (policy_update reduces its totals)."""
    import time

    queries, groups, rewards, advantages = gather_groups(queries, groups, rewards, advantages)
    frac_zero_std = zero_std.float().mean().item() if len(zero_std) else 0.0
    gen_max = dist.all_reduce_max(gen_s)
    stats = rollout_stats(groups, rewards)
    row = {"step": step, **update, **stats, "draws": draws,
           "mixed_groups_per_gen_s": stats["mixed_groups"] / max(gen_max, 1e-9),
           "frac_zero_std": dist.mean(frac_zero_std, len(zero_std)),
           "reflection_leak": leak_share(leak_flags(task, queries, groups)),
           "attempt1_pass_rate": dist.mean(attempt1["attempt1_pass_rate"], attempt1["scored_attempt1"]),
           "unscorable_attempt1": int(dist.all_reduce_sum(float(attempt1["unscorable_attempt1"]))),
           "verifier_errors": int(dist.all_reduce_sum(float(verifier.unscorable))), "lr": lr,
           "gen_tokens_per_s": generated_tokens(groups) / max(gen_max, 1e-9),
           "sync/logprob_diff": update["sampler_logp_diff"], "sync/load_s": dist.all_reduce_max(sync_s),
           "peak_rss_gb": dist.all_reduce_max(peak_rss_gb())}
    row["step_time_s"] = time.time() - t0
    return row, (queries, groups, rewards, advantages)


def segment_len(episode, segment: Segment) -> int:
    return int((np.asarray(episode.segment_ids) == segment).sum())


def generated_tokens(groups: Sequence[Sequence[Any]]) -> int:
    return sum(segment_len(ep, Segment.REFLECTION) + segment_len(ep, Segment.ATTEMPT2) for g in groups for ep in g)


MAX_STATS = ("ratio_max", "is_ratio_max")
# sums over micro-batches and ranks; `update/*`: tokens through the backbone per forward pass (the policy's;
# the reference reads the same), and what the shared-prefix update did not send (0 with shared_prefix=false)
SUM_STATS = ("loss", "policy_loss", "kl", "reflection_tokens", "update/backbone_tokens",
             "update/prefix_tokens_saved", "update/prefix_fallback_episodes")


def accumulate(totals: dict[str, float], stats: dict[str, float]) -> None:
    """Sum what sums over micro-batches; weight token means by the micro-batch's reflection tokens."""
    n = stats["reflection_tokens"]
    for key, value in stats.items():
        if key in SUM_STATS:
            totals[key] = totals.get(key, 0.0) + value
        elif key in MAX_STATS:
            totals[key] = max(totals.get(key, -math.inf), value)
        elif key == "sampler_logp_diff":
            totals[key] = totals.get(key, 0.0) + value     # a sum over tokens; divided in finish_stats
        else:
            totals[key] = totals.get(key, 0.0) + value * n


def finish_stats(totals: dict[str, float], grad_norm: float) -> dict[str, float]:
    n = max(totals.get("reflection_tokens", 0.0), 1.0)
    out = {k: v / n if k not in (*SUM_STATS, *MAX_STATS) else v
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
            "sampler_logp_diff": 0.0, "grad_norm": 0.0, "update/backbone_tokens": 0, "update/prefix_tokens_saved": 0,
            "update/prefix_fallback_episodes": 0}


def sampler_abs_diff_sum(logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor) -> float:
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
                         **{f"{s}_text": ep.texts.get(s, "") for s in SAMPLED_SEGMENTS},
                         **{f"{s}_tokens": segment_len(ep, Segment[s.upper()]) for s in SAMPLED_SEGMENTS},
                         **{f"{s}_truncated": bool(ep.truncated.get(s, False)) for s in SAMPLED_SEGMENTS},
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

    return tqdm(total=cfg.train.steps, initial=start, unit="step", desc="train",
                disable=not cfg.log.progress or not dist.is_main())
