"""The generation interface every engine implements (transformers `generate`-style on CPU/GPU, vLLM).

Token-in, token-out: prompts are token ids, samples are token ids with the sampler's log-probs, so
episodes are assembled from exactly what was sampled and never re-tokenized.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0   # 0 = greedy
    top_p: float = 1.0


@dataclass
class Sample:
    token_ids: list[int]                          # sampled ids, eos included when it was sampled
    logprobs: list[float] = field(default_factory=list)   # log p of each sampled token under the sampler
    finish_reason: str = "stop"                  # "stop" (eos / end of turn) | "length" (hit max_tokens)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
                 seeds: list[list[int]] | None = None) -> list[list[Sample]]:
        """For each prompt, `n` samples. `seeds[i][j]` seeds sample j of prompt i (replayable runs)."""
        ...

    def load_weights(self, model) -> None:
        """Pick up the trainer's current weights (no-op when the engine shares the model object)."""
        ...


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from (run seed, step, example id, sample index, segment): stable across runs."""
    import hashlib

    h = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)
