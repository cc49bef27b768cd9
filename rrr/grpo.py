"""GRPO on reflections: advantages, the clipped loss, KL and aggregation as pure tensor functions.

Shapes: Q queries × G reflections per group; B sequences × T tokens. Masks are bool; only
reflection tokens (rrr.episode.Segment.REFLECTION, not truncated) carry loss, KL and normalisers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rrr.config_schema import IsCorrection, LossAgg, values
from rrr.episode import Segment

LOSS_AGGREGATIONS = values(LossAgg)   # ("seq_mean_token_mean", "token_mean", "token_sum_norm")


def zero_std_groups(rewards: Tensor) -> Tensor:
    """[Q, G] rewards (NaN = unscorable) -> [Q] bool: scorable rewards do not vary (or < 2 scorable)."""
    scorable = ~rewards.isnan()
    high = torch.where(scorable, rewards, -torch.inf).amax(-1)  # [Q]
    low = torch.where(scorable, rewards, torch.inf).amin(-1)  # [Q]
    return (scorable.sum(-1) < 2) | (high == low)


def group_advantages(rewards: Tensor, scale_rewards: str = "group", eps: float = 1e-6) -> Tensor:
    """[Q, G] rewards (NaN = unscorable) -> [Q, G] advantages.

    A_i = r_i − mean(r), divided by (std(r) + eps) when scale_rewards == "group" (GRPO, DeepSeekMath
    eq. 3); "none" keeps the centred reward (Dr.GRPO). mean and std run over the scorable members only;
    std is the unbiased sample std (Bessel, n − 1), as torch.std in TRL and verl. Unscorable members
    and groups without reward variation get exactly 0.
    """
    if scale_rewards not in ("group", "none"):
        raise ValueError(f"scale_rewards must be 'group' or 'none', got {scale_rewards!r}")
    scorable = ~rewards.isnan()  # [Q, G]
    n = scorable.sum(-1, keepdim=True)  # [Q, 1]
    mean = torch.where(scorable, rewards, 0).sum(-1, keepdim=True) / n.clamp(min=1)  # [Q, 1]
    centred = torch.where(scorable, rewards - mean, 0)  # [Q, G]
    if scale_rewards == "group":
        std = ((centred**2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()  # [Q, 1]
        centred = centred / (std + eps)
    # exact zeros: float round-off in the mean must not turn an all-equal group into a signal
    return torch.where(zero_std_groups(rewards)[:, None], 0, centred)


def reflection_loss_mask(segment_ids: Tensor, reflection_truncated: Tensor) -> Tensor:
    """[B, T] segment ids, [B] bool -> [B, T] bool: reflection tokens of reflections not cut at max_tokens."""
    return (segment_ids == Segment.REFLECTION) & ~reflection_truncated[:, None]


def policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, eps_low: float, eps_high: float
) -> Tensor:
    """PPO-clip per token (Schulman et al. 2017 eq. 7; ε_high: DAPO): −min(ρA, clip(ρ, 1−ε, 1+ε_high)A).

    ρ = exp(logp − old_logp). logp/old_logp/mask [B, T], advantages [B] -> [B, T], 0 outside the mask.
    Off-mask values are replaced before any arithmetic, so NaN/inf there reach neither loss nor grads.
    """
    adv = advantages[:, None]  # [B, 1]
    ratio = torch.exp(_on_mask(logp, mask) - _on_mask(old_logp, mask))  # [B, T]
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)  # [B, T]
    return _on_mask(-torch.min(ratio * adv, clipped * adv), mask)


IS_CORRECTIONS = values(IsCorrection)   # ("none", "token_tis")


def tis_weights(logp: Tensor, sampler_logp: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling per token (Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"): w = min(π_θ / π_sampler, C), detached.

    logp (trainer) / sampler_logp (engine) / mask [B, T] -> [B, T], 1 off the mask. Corrects the
    policy gradient for the gap between the engine's numerics (bf16 vLLM kernels) and the trainer's.
    """
    with torch.no_grad():
        ratio = torch.exp(_on_mask(logp, mask) - _on_mask(sampler_logp, mask))  # [B, T]
        return torch.clamp(ratio, max=cap)


def tis_stats(logp: Tensor, sampler_logp: Tensor, mask: Tensor, cap: float) -> dict[str, float]:
    """Mean and max of the uncapped π_θ / π_sampler on the mask, and the share of tokens capped at C."""
    with torch.no_grad():
        ratio = torch.exp(_on_mask(logp, mask) - _on_mask(sampler_logp, mask))  # [B, T], 1 off the mask
        return {"is_ratio_mean": _token_mean(ratio, mask),
                "is_ratio_max": _on_mask(ratio, mask).amax().item() if mask.any() else 1.0,
                "is_capped_frac": _token_mean(ratio > cap, mask)}


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token KL(π‖π_ref) estimate [B, T] (Schulman, "Approximating KL divergence", 2020).

    k1 = logπ − logπ_ref (unbiased, can be negative);
    k3 = exp(logπ_ref − logπ) − (logπ_ref − logπ) − 1 (unbiased, always ≥ 0; GRPO's choice).
    """
    delta = ref_logp - logp  # [B, T]
    if kind == "k1":
        return -delta
    if kind == "k3":
        return torch.exp(delta) - delta - 1
    raise ValueError(f"kl kind must be 'k1' or 'k3', got {kind!r}")


def loss_normaliser(mask: Tensor, mode: str, max_reflection_tokens: int | None = None) -> Tensor:
    """The denominator of `aggregate` for the sequences in `mask` [B, T] -> scalar.

    seq_mean_token_mean: number of sequences with ≥ 1 reflection token; token_mean: number of
    reflection tokens; token_sum_norm: that sequence count × max_reflection_tokens (Dr.GRPO's constant).
    It is a sum over sequences, so the step's normaliser = the sum over its micro-batches.
    """
    has_tokens = mask.any(-1)  # [B]
    if mode == "seq_mean_token_mean":
        return has_tokens.sum().float()
    if mode == "token_mean":
        return mask.sum().float()
    if mode == "token_sum_norm":
        if not max_reflection_tokens:
            raise ValueError("token_sum_norm needs max_reflection_tokens (the reflection max_tokens)")
        return has_tokens.sum().float() * max_reflection_tokens
    raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, got {mode!r}")


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    mode: str,
    normaliser: Tensor | float | None = None,
    max_reflection_tokens: int | None = None,
) -> Tensor:
    """Masked per-token values [B, T] -> scalar.

    seq_mean_token_mean (GRPO): (1/N_seq) Σ_i (1/|o_i|) Σ_t x_it; token_mean (DAPO): Σ x / N_tok;
    token_sum_norm (Dr.GRPO): Σ x / (N_seq · L_max). |o_i| and N_* count reflection tokens only.
    For gradient accumulation pass `normaliser` = loss_normaliser of the whole step: the sum of the
    micro-batch results is then exactly the full-batch value. None = this batch is the whole step.
    """
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, got {mode!r}")
    if normaliser is None:
        normaliser = loss_normaliser(mask, mode, max_reflection_tokens)
    masked = _on_mask(per_token, mask)  # [B, T]
    if mode == "seq_mean_token_mean":
        total = (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    else:
        total = masked.sum()
    return total / torch.as_tensor(normaliser, dtype=total.dtype).clamp(min=1)


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    beta: float,
    kl_kind: str = "k3",
    mode: str = "seq_mean_token_mean",
    normaliser: Tensor | float | None = None,
    max_reflection_tokens: int | None = None,
    entropy: Tensor | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO objective on reflection tokens: aggregate(policy_loss + β·KL) -> (scalar loss, stats).

    logp/old_logp/ref_logp/mask/entropy [B, T], advantages [B]. old_logp None = on-policy (μ = 1):
    ρ = 1 in value, gradient A·∇logπ. ref_logp may be None when β = 0 (then no "kl" stat).
    Stats are detached floats: policy_loss and kl use the loss's normaliser (sum them over
    micro-batches); ratio_mean, clip_frac_low/high and entropy are means over this call's reflection
    tokens (weight by reflection_tokens to combine); ratio_max is a max.
    is_weights [B, T] (tis_weights, detached) multiply the policy term per token; the KL term is not
    weighted (it is an exact function of π_θ and π_ref on the sampled tokens).
    """
    old_logp = logp.detach() if old_logp is None else old_logp
    agg = dict(mode=mode, normaliser=normaliser, max_reflection_tokens=max_reflection_tokens)
    per_token = policy_loss(logp, old_logp, advantages, mask, eps_low, eps_high)  # [B, T]
    if is_weights is not None:
        per_token = per_token * _on_mask(is_weights, mask)
    pg_loss = aggregate(per_token, mask, **agg)
    kl_loss = pg_loss.new_zeros(())
    if ref_logp is not None:
        kl = kl_penalty(_on_mask(logp, mask), _on_mask(ref_logp, mask), kl_kind)  # [B, T]
        kl_loss = aggregate(kl, mask, **agg)
    elif beta != 0:
        raise ValueError("beta != 0 needs ref_logp")
    with torch.no_grad():
        ratio = torch.exp(_on_mask(logp - old_logp, mask))  # [B, T], 1 off the mask
        adv = advantages[:, None]  # [B, 1]
        stats = {
            "policy_loss": pg_loss.item(),
            "ratio_mean": _token_mean(ratio, mask),
            "ratio_max": _on_mask(ratio, mask).amax().item(),
            "clip_frac_low": _token_mean((ratio < 1 - eps_low) & (adv < 0), mask),  # clipped: no grad
            "clip_frac_high": _token_mean((ratio > 1 + eps_high) & (adv > 0), mask),
            "reflection_tokens": int(mask.sum()),
        }
        if ref_logp is not None:
            stats["kl"] = kl_loss.item()
        if entropy is not None:
            stats["entropy"] = _token_mean(entropy, mask)
    return pg_loss + beta * kl_loss, stats


def _on_mask(x: Tensor, mask: Tensor) -> Tensor:
    """x on the mask, 0 elsewhere; torch.where, so off-mask NaN/inf cannot leak into values or grads."""
    return torch.where(mask, x, 0)


def _token_mean(x: Tensor, mask: Tensor) -> float:
    return (_on_mask(x.float(), mask).sum() / mask.sum().clamp(min=1)).item()


def overlong_penalty(lengths: Tensor, truncated: Tensor, max_tokens: int, buffer: int,
                     factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment for reflections, [Q, G] -> [Q, G], subtracted from the reward:
    0 up to `max_tokens - buffer` tokens, rising linearly to `factor` at the cap, and `factor` for a
    truncated reflection. A truncated reflection has no loss of its own, but its lower reward still
    lowers the group baseline, so shorter siblings gain; the ramp acts before the cap takes the gradient
    away. `buffer = 0` turns it off."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    start = max_tokens - buffer
    ramp = ((lengths.float() - start) / buffer).clamp(0.0, 1.0)                   # [Q, G]
    return factor * torch.where(truncated, torch.ones_like(ramp), ramp)
