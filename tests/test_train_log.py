"""rrr.train_log (unit): the per-step rollout statistics. Moved from test_trainer.py when the trainer was
split; the logged rows themselves are checked end to end in test_trainer.py and test_trainer_core.py."""

from __future__ import annotations

import torch

from rrr import train_log


def test_rollout_stats_counts_mixed_groups_after_resampling():
    """mixed_groups = groups whose scorable rewards vary: the only ones a GRPO update learns from."""
    nan = float("nan")
    rewards = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [nan, 1.0, 0.0], [nan, nan, 1.0]])
    stats = train_log.rollout_stats([[] for _ in range(5)], rewards)
    assert stats["mixed_groups"] == 2 and stats["groups"] == 5
