"""Typed schema of the `train` config group: every key's type, default-free, and every choice as an enum.

Hydra merges conf/train/default.yaml (the values and their comments) over this schema (the types), so a
value of the wrong type or a choice that does not exist is refused by Hydra itself while the config is
composed ("train.loss_agg='x'; valid choices: ..."), before any model loads, and the code reads typed
values without casts. The YAML stays the one place for defaults; this module is the one place for types
and choices. Plain Python: no torch, nothing from rrr.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from omegaconf import MISSING


class Choice(str, Enum):
    """A config choice: compares equal to its string (`cfg.train.finetune == "lora"`) and prints as it."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(str(self), spec)


class Finetune(Choice):
    lora = "lora"
    full = "full"


class Parallel(Choice):
    ddp = "ddp"      # replicas, gradients summed over ranks
    fsdp = "fsdp"    # FSDP2, finetune=full


class Attempt1(Choice):
    stored = "stored"    # from the failure set
    online = "online"    # sampled; a passing attempt 1 ends the episode


class ZeroStd(Choice):
    keep = "keep"
    skip = "skip"
    resample = "resample"    # re-draw the same query's group
    dynamic = "dynamic"      # draw further failed queries until the step holds its mixed groups (DAPO)


class LrSchedule(Choice):
    cosine = "cosine"
    constant = "constant"


class KlEstimator(Choice):
    k1 = "k1"
    k3 = "k3"


class ScaleRewards(Choice):
    group = "group"
    none = "none"


class LossAgg(Choice):
    seq_mean_token_mean = "seq_mean_token_mean"   # GRPO
    token_mean = "token_mean"                     # DAPO
    token_sum_norm = "token_sum_norm"             # Dr.GRPO


class IsCorrection(Choice):
    none = "none"
    token_tis = "token_tis"


class Leak(Choice):
    keep = "keep"              # the paper
    no_reward = "no_reward"    # a reflection holding a parsable answer earns 0


def values(choice: type[Choice]) -> tuple[str, ...]:
    return tuple(c.value for c in choice)


@dataclass
class SegmentSampling:
    max_tokens: int = MISSING
    temperature: float = MISSING
    top_p: float = MISSING


@dataclass
class Sampling:
    attempt1: SegmentSampling = field(default_factory=SegmentSampling)
    reflection: SegmentSampling = field(default_factory=SegmentSampling)
    attempt2: SegmentSampling = field(default_factory=SegmentSampling)


@dataclass
class TrainConfig:
    failures: Optional[str] = MISSING
    steps: int = MISSING
    finetune: Finetune = MISSING
    parallel: Parallel = MISSING
    attempt1: Attempt1 = MISSING
    batch_queries: int = MISSING
    group_size: int = MISSING
    micro_batch_size: int = MISSING
    shared_prefix: bool = MISSING
    lr: float = MISSING
    lr_schedule: LrSchedule = MISSING
    warmup_steps: int = MISSING
    weight_decay: float = MISSING
    max_grad_norm: float = MISSING
    beta: float = MISSING
    kl_estimator: KlEstimator = MISSING
    epsilon: float = MISSING
    epsilon_high: float = MISSING
    is_correction: IsCorrection = MISSING
    is_cap: float = MISSING
    scale_rewards: ScaleRewards = MISSING
    loss_agg: LossAgg = MISSING
    zero_std: ZeroStd = MISSING
    resample_tries: int = MISSING
    max_draws: int = MISSING
    overlong_buffer: int = MISSING
    overlong_penalty: float = MISSING
    leak: Leak = MISSING
    min_pass_rate: float = MISSING
    max_pass_rate: float = MISSING
    save_every: int = MISSING
    keep_checkpoints: Optional[int] = MISSING
    sampling: Sampling = field(default_factory=Sampling)
    adam_betas: List[float] = MISSING
    logprob_chunk_size: int = MISSING
    gradient_checkpointing: bool = MISSING
    malloc_mmap_threshold_mb: float = MISSING


SCHEMAS: dict[str, Any] = {"train": TrainConfig}


def register() -> None:
    """Put each schema in Hydra's ConfigStore as `<group>/schema`, which conf/<group>/default.yaml lists
    first in its defaults (the YAML's values merge over the types)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, node in SCHEMAS.items():
        store.store(group=group, name="schema", node=node)
