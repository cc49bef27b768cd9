"""The failure set a run trains on: loading it, checking its stored prompts, and the seeded cursor that
draws each step's failed queries (resumable: its state goes into every checkpoint).

Dynamic sampling (`train.zero_std=dynamic`) draws with the cursor's per-query statistics instead of the
epoch order: every group a query produced counts as a try, a group with reward variance as a mix, and
a query is drawn with weight (mixes + 1) / (tries + 2), the posterior mean of its mixing rate under a
uniform prior: a query that never mixes is drawn less and less, never excluded (its rate may change as
the policy trains). The statistics and the draw counter are part of the cursor state, so a resumed run
draws what the uninterrupted run would have drawn."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rrr import rollout
from rrr.config import UserError
from rrr.engines.base import derive_seed
from rrr.tasks import Example


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
    tries: list[int] = field(default_factory=list)     # per query: groups drawn (dynamic sampling)
    mixes: list[int] = field(default_factory=list)     # per query: of those, groups with reward variance
    weighted_draws: int = 0                            # dynamic draws so far: names each draw's seed

    def __post_init__(self):
        self.tries = list(self.tries) or [0] * self.n
        self.mixes = list(self.mixes) or [0] * self.n
        if len(self.tries) != self.n or len(self.mixes) != self.n:
            raise ValueError(f"cursor statistics cover {len(self.tries)}/{len(self.mixes)} queries, not {self.n}")

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

    # ------------------------------------------------------------ dynamic sampling

    def weights(self) -> np.ndarray:
        """[n] draw weights: the Beta(1, 1) posterior mean of each query's mixing rate."""
        return (np.asarray(self.mixes, float) + 1) / (np.asarray(self.tries, float) + 2)

    def draw_weighted(self, k: int, exclude: Sequence[int] = ()) -> list[int]:
        """Up to k distinct queries not in `exclude`, drawn without replacement with `weights()`; the
        draw's seed derives from (seed, draw counter), so the same state draws the same queries."""
        allowed = np.ones(self.n, dtype=bool)
        allowed[list(exclude)] = False
        k = min(k, int(allowed.sum()))
        self.weighted_draws += 1
        if k <= 0:
            return []
        p = np.where(allowed, self.weights(), 0.0)
        rng = np.random.default_rng(derive_seed(self.seed, "dynamic", self.weighted_draws))
        return rng.choice(self.n, size=k, replace=False, p=p / p.sum()).tolist()

    def record(self, index: int, mixed: bool) -> None:
        self.tries[index] += 1
        self.mixes[index] += int(bool(mixed))

    # ------------------------------------------------------------ checkpoint state

    def state(self) -> dict[str, Any]:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "index": self.index,
                "held_back": list(self.held_back), "tries": list(self.tries), "mixes": list(self.mixes),
                "weighted_draws": self.weighted_draws}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "FailureCursor":
        """The cursor a checkpoint saved (one saved before dynamic sampling existed has no statistics)."""
        held = tuple(int(i) for i in state.get("held_back", ()))
        return cls(**{k: int(state[k]) for k in ("n", "seed", "epoch", "index")}, held_back=held,
                   tries=[int(x) for x in state.get("tries", ())], mixes=[int(x) for x in state.get("mixes", ())],
                   weighted_draws=int(state.get("weighted_draws", 0)))


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
