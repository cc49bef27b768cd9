"""rrr.grpo: each formula alone, masking invariance, and gradient accumulation = full batch."""

from __future__ import annotations

import math

import pytest
import torch

from rrr.episode import Segment
from rrr.grpo import (
    LOSS_AGGREGATIONS,
    aggregate,
    group_advantages,
    grpo_loss,
    kl_penalty,
    loss_normaliser,
    policy_loss,
    reflection_loss_mask,
    tis_stats,
    tis_weights,
    zero_std_groups,
)

torch.set_num_threads(1)
NAN = float("nan")
LOSS_ARGS = dict(eps_low=0.2, eps_high=0.28, beta=0.001, max_reflection_tokens=8)


def episode_segments(lengths: list[tuple[int, int, int, int, int, int]], total: int) -> torch.Tensor:
    """[B, total] segment ids from per-sequence (prompt, attempt1, feedback, reflection, retry, attempt2)."""
    rows = []
    for parts in lengths:
        row = [seg for seg, n in zip(list(Segment)[:6], parts) for _ in range(n)]
        rows.append(row + [Segment.PAD] * (total - len(row)))
    return torch.tensor(rows)


SEGMENTS = episode_segments([(3, 2, 2, 4, 1, 2), (2, 3, 1, 2, 2, 3), (1, 1, 1, 0, 1, 1), (2, 2, 2, 7, 1, 2)], 16)
REFLECTION_LENGTHS = [4, 2, 0, 7]


def random_batch(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shape = SEGMENTS.shape
    logp = -torch.rand(shape, generator=g, dtype=dtype) * 3
    old = logp + 0.3 * torch.randn(shape, generator=g, dtype=dtype)  # some ratios outside the clip range
    ref = logp + 0.5 * torch.randn(shape, generator=g, dtype=dtype)
    adv = torch.randn(shape[0], generator=g, dtype=dtype)
    truncated = torch.tensor([False, False, False, False])
    return logp, old, ref, adv, reflection_loss_mask(SEGMENTS, truncated)


# --- advantages ---------------------------------------------------------------------------------


def test_group_advantages_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    std0 = math.sqrt(4 * 0.25 / 3)  # unbiased (n − 1) std of [1, 0, 0, 1]
    std1 = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)
    expected = torch.tensor([[0.5 / std0, -0.5 / std0, -0.5 / std0, 0.5 / std0], [0.75 / std1] + [-0.25 / std1] * 3])
    torch.testing.assert_close(group_advantages(rewards, "group", eps=0.0), expected)
    torch.testing.assert_close(group_advantages(rewards, "none"), rewards - rewards.mean(-1, keepdim=True))


def test_all_equal_group_gets_zero_advantage_exactly():
    rewards = torch.tensor([[1.0] * 8, [0.0] * 8, [0.7] * 8, [0.0, 1.0] + [0.0] * 6])
    for scale in ("group", "none"):
        adv = group_advantages(rewards, scale)
        assert torch.equal(adv[:3], torch.zeros(3, 8))  # float32 mean of 8 × 0.7 != 0.7: still exactly 0
        assert adv[3].abs().sum() > 0
    assert zero_std_groups(rewards).tolist() == [True, True, True, False]


def test_unscorable_members_get_zero_and_do_not_shift_others():
    with_unscorable = torch.tensor([[1.0, NAN, 0.0, 0.0, NAN]])
    scorable_only = torch.tensor([[1.0, 0.0, 0.0]])
    for scale in ("group", "none"):
        adv = group_advantages(with_unscorable, scale)
        assert adv[0, 1] == 0 and adv[0, 4] == 0
        torch.testing.assert_close(adv[0, [0, 2, 3]], group_advantages(scorable_only, scale)[0])


def test_groups_with_fewer_than_two_scorable_members_are_zero_not_nan():
    rewards = torch.tensor([[NAN, NAN, NAN], [NAN, 1.0, NAN], [NAN, 1.0, 1.0]])
    assert torch.equal(group_advantages(rewards), torch.zeros(3, 3))
    assert zero_std_groups(rewards).all()


# --- masks ----------------------------------------------------------------------------------------


def test_mask_sum_equals_reflection_length_and_truncation_removes_it():
    mask = reflection_loss_mask(SEGMENTS, torch.tensor([False, False, False, False]))
    assert mask.sum(-1).tolist() == REFLECTION_LENGTHS
    assert (SEGMENTS[mask] == Segment.REFLECTION).all()
    truncated = reflection_loss_mask(SEGMENTS, torch.tensor([False, True, False, True]))
    assert truncated.sum(-1).tolist() == [4, 0, 0, 0]


# --- loss pieces ----------------------------------------------------------------------------------


def test_kl_estimators_hand_values():
    logp, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.0, -1.0, -2.0]])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([[0.0, -1.0, 1.5]]))
    k3 = torch.tensor([[0.0, math.exp(1) - 1 - 1, math.exp(-1.5) + 1.5 - 1]])
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), k3)
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k2")


def test_step_zero_ratio_one_kl_zero_no_clipping():
    logp, _, _, adv, mask = random_batch()
    for old in (logp.clone(), None):
        loss, stats = grpo_loss(logp, old, logp.clone(), adv, mask, **LOSS_ARGS)
        assert stats["kl"] == 0 and stats["ratio_mean"] == 1 and stats["ratio_max"] == 1
        assert stats["clip_frac_low"] == 0 and stats["clip_frac_high"] == 0
        assert stats["reflection_tokens"] == sum(REFLECTION_LENGTHS)
        # ρ = 1: the loss is −(mean over sequences with reflection tokens of A)
        torch.testing.assert_close(loss, -adv[[0, 1, 3]].mean())


def test_clipped_tokens_get_zero_gradient_in_the_clipped_direction():
    ratios = torch.tensor([0.5, 0.79, 1.0, 1.21, 1.25, 1.29, 1.5], dtype=torch.float64)
    for a in (1.0, -1.0):
        logp = ratios.log()[None].clone().requires_grad_()
        mask = torch.ones_like(logp, dtype=torch.bool)
        per_token = policy_loss(logp, torch.zeros_like(logp), torch.tensor([a], dtype=torch.float64), mask, 0.2, 0.28)
        per_token.sum().backward()
        clipped = (ratios > 1.28) if a > 0 else (ratios < 0.8)
        expected = torch.where(clipped, 0.0, -a * ratios)  # d(−ρA)/dlogπ = −Aρ where unclipped
        torch.testing.assert_close(logp.grad[0], expected)
        assert clipped.sum() == 2  # both sides of the asymmetric range are exercised


def test_clip_fractions_count_clipped_tokens():
    old = torch.zeros(2, 4)
    logp = torch.tensor([[0.5, 0.0, -0.5, 0.0], [0.5, 0.0, -0.5, 0.0]]).log1p()  # ρ = 1.5, 1, 0.5, 1
    mask = torch.ones(2, 4, dtype=torch.bool)
    _, stats = grpo_loss(logp, old, None, torch.tensor([1.0, -1.0]), mask, eps_low=0.2, eps_high=0.2, beta=0.0)
    assert stats["clip_frac_high"] == 1 / 8 and stats["clip_frac_low"] == 1 / 8
    assert stats["ratio_max"] == pytest.approx(1.5)
    assert "kl" not in stats  # β = 0 and no reference: nothing to report
    with pytest.raises(ValueError):
        grpo_loss(logp, old, None, torch.tensor([1.0, -1.0]), mask, eps_low=0.2, eps_high=0.2, beta=0.1)


# --- aggregation ----------------------------------------------------------------------------------


def test_aggregations_hand_values():
    x = torch.tensor([[1.0, 2.0, 3.0, NAN], [4.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert aggregate(x, mask, "seq_mean_token_mean").item() == (2 + 4) / 2  # empty sequence not counted
    assert aggregate(x, mask, "token_mean").item() == (6 + 4) / 4
    assert aggregate(x, mask, "token_sum_norm", max_reflection_tokens=5).item() == 10 / (2 * 5)
    assert aggregate(x, torch.zeros_like(mask), "token_mean").item() == 0  # no reflection tokens: 0, not NaN
    with pytest.raises(ValueError):
        aggregate(x, mask, "token_sum_norm")
    with pytest.raises(ValueError):
        aggregate(x, mask, "bnpo")


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_gradient_accumulation_equals_full_batch(mode):
    logp, old, ref, adv, mask = random_batch(seed=1)
    kwargs = dict(LOSS_ARGS, mode=mode)

    def grad_of(parts: list[slice], global_normaliser: bool) -> tuple[torch.Tensor, float]:
        leaf = logp.clone().requires_grad_()
        step_norm = sum(loss_normaliser(mask[p], mode, 8) for p in parts)
        logged = 0.0
        for p in parts:
            norm = step_norm if global_normaliser else None
            loss, stats = grpo_loss(leaf[p], old[p], ref[p], adv[p], mask[p], normaliser=norm, **kwargs)
            loss.backward()
            logged += stats["policy_loss"] + LOSS_ARGS["beta"] * stats["kl"]
        return leaf.grad, logged

    full, full_loss = grad_of([slice(0, 4)], global_normaliser=False)
    micro = [slice(0, 1), slice(1, 3), slice(3, 4)]  # uneven, one with an empty reflection
    accumulated, accumulated_loss = grad_of(micro, global_normaliser=True)
    torch.testing.assert_close(accumulated, full, rtol=1e-12, atol=1e-15)
    assert accumulated_loss == pytest.approx(full_loss, rel=1e-12)  # logged stats add up the same way
    assert not torch.allclose(grad_of(micro, global_normaliser=False)[0], full)  # the test can fail
    assert loss_normaliser(mask, mode, 8) == sum(loss_normaliser(mask[p], mode, 8) for p in micro)


# --- masking invariance ---------------------------------------------------------------------------


def poison_off_mask(x: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    junk = torch.randn(x.shape, generator=g, dtype=x.dtype) * 50
    junk.view(-1)[::3], junk.view(-1)[1::5] = torch.inf, NAN
    return torch.where(mask, x, junk)


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
@pytest.mark.parametrize("kl_kind", ["k1", "k3"])
def test_loss_and_gradients_ignore_everything_off_the_reflection_mask(mode, kl_kind):
    logp, old, ref, adv, mask = random_batch(seed=2)
    kwargs = dict(LOSS_ARGS, mode=mode, kl_kind=kl_kind)

    def run(logp, old, ref, adv):
        leaf = logp.clone().requires_grad_()
        loss, stats = grpo_loss(leaf, old, ref, adv, mask, entropy=-leaf.detach(), **kwargs)
        loss.backward()
        return loss, leaf.grad, stats

    clean = run(logp, old, ref, adv)
    no_reflection = ~mask.any(-1)  # those sequences' advantages must not matter either
    poisoned = run(
        poison_off_mask(logp, mask, 3),
        poison_off_mask(old, mask, 4),
        poison_off_mask(ref, mask, 5),
        torch.where(no_reflection, NAN, adv),
    )
    assert torch.equal(clean[0], poisoned[0]) and torch.isfinite(clean[0])
    assert torch.equal(clean[1], poisoned[1])
    assert (clean[1][~mask] == 0).all() and (clean[1][mask] != 0).all()
    assert clean[2] == poisoned[2]


def test_logits_off_the_mask_do_not_change_loss_or_gradients():
    from rrr.logprobs import token_logprobs

    _, old, ref, adv, mask = random_batch(seed=6, dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(*mask.shape, 11, generator=g)
    targets = torch.randint(0, 11, mask.shape, generator=g)
    junk = torch.randn(logits.shape, generator=g) * 1e4
    poisoned = torch.where(mask[..., None], logits, junk)

    def run(logits):
        leaf = logits.clone().requires_grad_()
        logp = token_logprobs(leaf.view(-1, 11), targets.view(-1), chunk_size=5).view(mask.shape)
        loss, _ = grpo_loss(logp, old, ref, adv, mask, **LOSS_ARGS)
        loss.backward()
        return loss, leaf.grad

    (loss_a, grad_a), (loss_b, grad_b) = run(logits), run(poisoned)
    assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)
    assert (grad_a[~mask] == 0).all()


# --- truncated importance sampling (train.is_correction=token_tis) ------------------------------


def test_tis_weights_are_the_capped_ratio_on_the_mask_and_one_elsewhere():
    logp = torch.tensor([[-1.0, -2.0, -0.5, NAN]], dtype=torch.float64)
    sampler = torch.tensor([[-1.0, -1.0, -2.5, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    w = tis_weights(logp, sampler, mask, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, math.exp(-1.0), 2.0, 1.0]], dtype=torch.float64))
    stats = tis_stats(logp, sampler, mask, cap=2.0)
    assert stats["is_ratio_mean"] == pytest.approx((1 + math.exp(-1) + math.exp(2)) / 3)
    assert stats["is_ratio_max"] == pytest.approx(math.exp(2))
    assert stats["is_capped_frac"] == pytest.approx(1 / 3)
    assert not tis_weights(logp.requires_grad_(), sampler, mask, 2.0).requires_grad   # a constant weight


def test_tis_weights_scale_each_tokens_policy_gradient_and_leave_kl_alone():
    logp, _, ref, adv, mask = random_batch(seed=4)
    sampler = logp + 0.4 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(9), dtype=logp.dtype)
    w = tis_weights(logp, sampler, mask, cap=1.5)
    assert (w[mask] == 1.5).any() and (w[mask] < 1).any()              # both the cap and a down-weight

    def grads(is_weights, beta):
        x = logp.clone().requires_grad_()
        loss, _ = grpo_loss(x, None, ref, adv, mask, **{**LOSS_ARGS, "beta": beta}, is_weights=is_weights)
        loss.backward()
        return x.grad

    torch.testing.assert_close(grads(w, 0.0), w * grads(None, 0.0))     # policy term: token-wise × w
    kl_only = grads(None, 1.0) - grads(None, 0.0)
    torch.testing.assert_close(grads(w, 1.0) - grads(w, 0.0), kl_only)  # KL term: unweighted
    nan_off_mask = torch.where(mask, w, NAN)
    torch.testing.assert_close(grads(nan_off_mask, 0.0), grads(w, 0.0))  # off-mask weights cannot leak
