"""The sampler's weights around each optimizer step: free the engine's memory, push the new weights,
and the post-sync canary that stops a run whose engine does not sample the weights being trained.

The canary is the trainer's own `sampler_logp_diff`: the mean |log π_θ − log π_sampler| per reflection
token of the step's samples, π_θ scored by the trainer before its update at the sampling temperature.
It is ~0 (fp32: < 1e-4) when the last sync loaded what was trained; a stale or wrong load (the silent
failure TRL, verl and OpenRLHF users report) shows up as the optimizer's step size in log-prob.
"""

from __future__ import annotations

import math
import time

from rrr.config import UserError


def release_for_update(engine) -> None:
    """Let the engine free accelerator memory for the optimizer step (vLLM sleep mode; else nothing)."""
    sleep = getattr(engine, "sleep", None)
    if sleep is not None:
        sleep()


def push_weights(engine, model) -> float:
    """engine.load_weights(model); the seconds it took (merge, transfer, reload, prefix-cache reset)."""
    t0 = time.perf_counter()
    engine.load_weights(model)
    return time.perf_counter() - t0


# `engine.max_logprob_diff: auto` per compute dtype (docs/precision.md, "The canary's limits"). fp32: the
# gap is < 1e-4 per token when the sync is right. bf16 (scripts/bf16_gap.py, SmolLM2-135M on CPU, full
# fine-tune, lr 1e-5): healthy per-step means 0.025-0.036 (hf engine on the policy) and 0.025-0.052 (a bf16
# copy, as vLLM), per-token p95 0.12, max 0.21; 0.15 is ~3x the worst step. fp16 (10-bit mantissa, not
# measured) takes bf16's limit.
BF16_LIMIT = 0.15
MAX_LOGPROB_DIFF = {"float32": 0.05, "bfloat16": BF16_LIMIT, "float16": BF16_LIMIT}


def logprob_diff_limit(cfg) -> float | None:
    """The canary's limit: `engine.max_logprob_diff` (auto = MAX_LOGPROB_DIFF of the compute dtype, a
    number > 0, or null = no size check)."""
    from rrr.models import resolve_device, resolve_dtype

    setting = cfg.engine.get("max_logprob_diff", "auto")
    if setting is None:
        return None
    if setting == "auto":
        dtype = str(resolve_dtype(cfg.model.dtype, resolve_device(cfg.model.device))).removeprefix("torch.")
        return MAX_LOGPROB_DIFF[dtype]
    try:
        limit = float(setting)
    except (TypeError, ValueError):
        limit = float("nan")
    if not limit > 0:
        raise UserError(f"engine.max_logprob_diff={setting!r}: auto (per dtype), a number > 0 (mean nats per "
                        "reflection token), or null (no size check)")
    return limit


def check_logprob_diff(step: int, diff: float, limit: float | None) -> None:
    """Stop with one line when the step's samples were not drawn from the trained weights. A NaN or
    infinite statistic always stops (`diff > limit` is False for NaN): the policy or the sampler produced
    non-finite log-probs, and every later step would train on them. `limit` None turns the size check off."""
    if not math.isfinite(diff):
        raise UserError(f"step {step}: sync/logprob_diff={diff}: the policy's or the sampler's log-probs of the "
                        "sampled reflection tokens are not finite (a NaN/inf in the weights, the loss or the "
                        "engine's output); the run stops before training on them")
    if limit is not None and diff > float(limit):
        raise UserError(f"step {step}: sync/logprob_diff={diff:.3g} > engine.max_logprob_diff={limit}: the engine "
                        "is not sampling the trained weights (stale or wrong weight sync); check the sync, or "
                        "raise the limit for bf16 engines (and consider train.is_correction=token_tis)")
