"""`rrr train`'s setup, built from config before the loop starts: settings checked, the policy (LoRA or full,
FSDP-sharded under `train.parallel=fsdp`), the frozen reference, AdamW with its schedule, the engine, and
what a resume must match (the fingerprint) and what the manifest records."""

from __future__ import annotations

import copy
import math
import random
from typing import Any, Callable, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rrr import distributed as dist
from rrr import fsdp, shared_prefix, sync
from rrr.config import UserError
from rrr.episode import SAMPLED_SEGMENTS, Segment
from rrr.tasks import Example
from rrr.adapters import is_adapter
from rrr.errors import library_errors
from rrr.validate import check as check_settings, check_at_least_one, check_logger

COMMAND = "train"


def validate(cfg: DictConfig) -> None:
    t = cfg.train
    check_settings(cfg, COMMAND)
    check_logger(cfg)
    # types and choices: Hydra refused bad ones while composing (rrr/config_schema.py); ranges here
    for key in ("steps", "batch_queries", "group_size", "micro_batch_size", "save_every"):
        check_at_least_one(t[key], f"train.{key}")
    if not t.malloc_mmap_threshold_mb >= 0:
        raise UserError(f"train.malloc_mmap_threshold_mb={t.malloc_mmap_threshold_mb!r}: a size in MB >= 0 (0 = glibc's default)")
    if t.zero_std == "dynamic" and t.max_draws < 1:
        raise UserError(f"train.max_draws={t.max_draws}: dynamic sampling needs at least one draw a step (e.g. 4)")
    buffer, cap = t.overlong_buffer, t.sampling.reflection.max_tokens
    if not 0 <= buffer <= cap or t.overlong_penalty < 0:
        raise UserError(f"train.overlong_buffer={buffer} must lie in [0, train.sampling.reflection.max_tokens="
                        f"{cap}] and train.overlong_penalty={t.overlong_penalty} be >= 0 (0 buffer = off)")
    if t.group_size < 2:
        raise UserError("train.group_size must be >= 2: a group of one has no baseline (paper: 8)")
    fsdp.check(cfg)
    sync.logprob_diff_limit(cfg)                      # a bad engine.max_logprob_diff fails before any work
    if t.is_correction == "token_tis" and not t.is_cap >= 1:
        raise UserError(f"train.is_cap={t.is_cap}: the truncation cap C must be >= 1 (verl, TRL: 2)")
    trained = t.sampling.reflection           # the loss is on reflection tokens: their log-probs must be exact
    if not trained.temperature > 0:
        raise UserError(f"train.sampling.reflection.temperature={trained.temperature}: training needs T > 0 "
                        "(a greedy token has no sampling distribution to score)")
    if trained.top_p != 1.0:
        raise UserError(f"train.sampling.reflection.top_p={trained.top_p}: training supports only top_p=1 "
                        "(the trainer scores the full tempered softmax, not the renormalised nucleus)")


def sampling_temperatures(sampling_cfg) -> dict[Segment, float]:
    """The temperature each sampled segment was drawn at (the trainer and reference score logits / T)."""
    return {Segment[name.upper()]: sampling_cfg[name].temperature or 1.0 for name in SAMPLED_SEGMENTS}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_policy(cfg: DictConfig):
    from rrr.models import apply_lora, merge_adapter
    from rrr.precision import load_for_training

    malloc_mmap_threshold(int(cfg.train.malloc_mmap_threshold_mb * 2**20))
    model, tokenizer = load_for_training(cfg.model, cfg.train.finetune)   # full + bf16: fp32 master weights
    if cfg.train.finetune == "full":
        model = merge_adapter(model)                 # model.path = an adapter: train all weights of base + adapter
    if cfg.train.gradient_checkpointing:   # recompute layer activations in backward: memory ∝ 1 layer, not all
        with library_errors(f"gradient checkpointing on model {cfg.model.name}", "train.gradient_checkpointing"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.train.finetune == "lora":
        model = apply_lora(model, cfg.model)
    if tokenizer.pad_token_id is None:
        raise UserError(f"the tokenizer of model {cfg.model.name} has no pad token; set one in the model config")
    if cfg.train.shared_prefix:
        shared_prefix.check_model(model)     # an attention a 4D mask cannot express: refused before any step
    if cfg.train.parallel == "fsdp":
        with library_errors(f"sharding model {cfg.model.name} with FSDP2", "train.parallel=fsdp (and model.*)"):
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
    model (the adapter merged in). None when β = 0: no reference is loaded or computed. Called with
    segment_ids [B, T] it encodes each group's prefix once (`rrr.shared_prefix`), as the policy does."""
    if cfg.train.beta == 0:
        return None
    chunk = cfg.train.logprob_chunk_size
    if cfg.train.finetune == "lora" and not starts_from_adapter(cfg):
        def lora_reference(ids, attention_mask, mask, temperature=1.0, segment_ids=None):
            with torch.no_grad(), model.disable_adapter():
                return shared_prefix.update_logprobs(model, ids, attention_mask, mask, chunk, temperature, segment_ids)[0]
        return lora_reference
    if fsdp.is_sharded(model):                       # a sharded policy cannot be copied: load and shard again
        frozen = fsdp.shard(fsdp.fresh_copy(cfg).requires_grad_(False)).eval()
    else:
        frozen = copy.deepcopy(model)
        if hasattr(frozen, "merge_and_unload"):      # a run started from an adapter: merge it into the copy
            frozen = frozen.merge_and_unload()
        frozen = frozen.eval().requires_grad_(False)

    def frozen_reference(ids, attention_mask, mask, temperature=1.0, segment_ids=None):
        with torch.no_grad():
            return shared_prefix.update_logprobs(frozen, ids, attention_mask, mask, chunk, temperature, segment_ids)[0]
    return frozen_reference


def starts_from_adapter(cfg: DictConfig) -> bool:
    return is_adapter(cfg.model)


def build_optimizer(cfg: DictConfig, model):
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay,
                                  betas=(t.adam_betas[0], t.adam_betas[1]))
    schedule = lr_lambda(t.warmup_steps, t.steps, t.lr_schedule)
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
    (`train.steps` too: it sets the LR schedule). Only `train.save_every`, `train.keep_checkpoints`,
    `train.shared_prefix` (how the same log-probs are computed, not which), `log.*` and `logger.*` may."""
    train = OmegaConf.to_container(cfg.train, resolve=True)
    for key in ("save_every", "keep_checkpoints", "shared_prefix"):
        train.pop(key, None)
    return {"task": OmegaConf.to_container(cfg.task, resolve=True),
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "prompts": OmegaConf.to_container(cfg.prompts, resolve=True),
            "engine": str(cfg.engine.name), "seed": int(cfg.seed), "train": train}


def train_manifest(cfg: DictConfig, examples: Sequence[Example]) -> dict[str, Any]:
    from rrr.provenance import examples_sha256
    from rrr.model_info import model_provenance

    return {"resume_fingerprint": resume_fingerprint(cfg),
            "failures": str(cfg.train.failures), "failure_queries": len(examples),
            "failures_sha256": examples_sha256(examples), "model": model_provenance(cfg.model),
            "train": OmegaConf.to_container(cfg.train, resolve=True), "world_size": dist.world(),
            "seeds": {"run_seed": int(cfg.seed),
                      "derivation": "derive_seed(run_seed, step, example_id, sample_index, segment)"}}
