"""Reflections that leak the answer (issue #12, item 1).

The reward reads attempt 2 only. A "reflection" that already holds a parsable answer (a Countdown
`<answer>…</answer>`, a function call) and is copied by the retry gets reward 1, and all of its tokens
are reinforced: that teaches answering early, not reflecting. Each task says whether a text holds a
parsable answer with its own parser (`task.answer_in(example, text)`); here we count it and, with
`train.leak=no_reward`, give a leaking reflection's episode reward 0.

    keep       the paper: the reward ignores what the reflection contains (counted, not acted on)
    no_reward  a leaking reflection earns 0, whatever its retry scores (still scored, so it is a
               negative example in its group rather than dropped)
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rrr.config_schema import Leak, values

LEAK_MODES = values(Leak)   # ("keep", "no_reward")


def reflection_leaks(task: Any, example: Any, text: str | None) -> bool:
    """Does this reflection text hold an answer the task's own parser reads? Never raises."""
    if not text:
        return False
    try:
        return bool(task.answer_in(example, text))
    except Exception:  # noqa: BLE001 — a parser crash on hostile text is "no answer found"
        return False


def leak_flags(task: Any, queries: Sequence[Any], groups: Sequence[Sequence[Any]]) -> torch.Tensor:
    """[Q][G] episodes -> [Q, G] bool: the episode's reflection holds a parsable answer."""
    flags = [[reflection_leaks(task, q, ep.texts.get("reflection")) for ep in g] for q, g in zip(queries, groups)]
    return torch.tensor(flags, dtype=torch.bool).reshape(len(groups), -1 if groups else 0)


def apply_leak_policy(rewards: torch.Tensor, leaks: torch.Tensor, mode: str) -> torch.Tensor:
    """[Q, G] rewards (NaN = unscorable), [Q, G] leak flags -> [Q, G] rewards under `train.leak`."""
    if mode == "keep":
        return rewards
    if mode == "no_reward":
        if rewards.numel() == 0:                   # a rank with an empty share: [0, G] rewards, [0, 0] flags
            return rewards
        return torch.where(leaks & ~rewards.isnan(), torch.zeros_like(rewards), rewards)
    raise ValueError(f"train.leak must be one of {', '.join(LEAK_MODES)}, got {mode!r}")


def leak_share(leaks: torch.Tensor) -> float:
    return float(leaks.float().mean()) if leaks.numel() else 0.0
