"""rrr.logprobs on a tiny random Llama: equals full-logits log-softmax, padding-invariant, LoRA-only grads."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rrr.episode import Segment
from rrr.grpo import grpo_loss, reflection_loss_mask
from rrr.logprobs import entropy_from_logits, masked_logprobs, token_logprobs

torch.set_num_threads(1)
VOCAB = 100


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """Absolute position embeddings: left padding changes its output unless position ids are right."""
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def full_logprobs(model, input_ids, attention_mask):
    """The naive reference: full [B, T, V] fp32 logits, log_softmax, gather; logp[:, t] predicts ids[:, t]."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits.float()
    logp_all = logits[:, :-1].log_softmax(-1)
    logp = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    pad = torch.zeros(len(input_ids), 1)
    return torch.cat([pad, logp], 1), torch.cat([pad, entropy], 1)


def batch(seed: int = 0, b: int = 3, t: int = 12):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (b, t), generator=g)
    attention_mask = torch.ones(b, t, dtype=torch.long)
    target_mask = torch.rand(b, t, generator=g) < 0.5
    target_mask[:, 0] = False
    return input_ids, attention_mask, target_mask


def test_token_logprobs_and_entropy_match_full_softmax_in_any_chunking():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(7, 13, generator=g, dtype=torch.bfloat16), torch.randint(0, 13, (7,), generator=g)
    logp_all = logits.float().log_softmax(-1)
    for chunk in (1, 3, 7, 100):
        torch.testing.assert_close(token_logprobs(logits, targets, chunk), logp_all[torch.arange(7), targets])
        torch.testing.assert_close(entropy_from_logits(logits, chunk), -(logp_all.exp() * logp_all).sum(-1))
        assert token_logprobs(logits, targets, chunk).dtype == torch.float32


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_masked_logprobs_equal_full_logits_and_their_gradients(chunk_size):
    model = tiny_llama()
    input_ids, attention_mask, target_mask = batch()
    ref_logp, ref_entropy = full_logprobs(model, input_ids, attention_mask)
    ref_logp, ref_entropy = ref_logp * target_mask, ref_entropy * target_mask
    (ref_logp * torch.linspace(-1, 1, ref_logp.numel()).view_as(ref_logp)).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    logp, entropy = masked_logprobs(model, input_ids, attention_mask, target_mask, chunk_size=chunk_size)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-5, rtol=0)
    assert (logp[~target_mask] == 0).all() and (logp[target_mask] < 0).all()
    (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_left_and_right_padding_do_not_change_logprobs(build):
    model = build()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g) for n in (9, 5, 7)]
    alone = [masked_logprobs(model, s[None], torch.ones(1, len(s)), torch.arange(len(s))[None] > 0)[0][0] for s in seqs]
    width = 11
    for side in ("left", "right"):
        ids = torch.full((3, width), 7)  # pad id is arbitrary: padding is read from the attention mask only
        attn = torch.zeros(3, width, dtype=torch.long)
        for i, s in enumerate(seqs):
            cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            ids[i, cols], attn[i, cols] = s, 1
        target = attn.bool() & (attn.cumsum(-1) > 1)  # every real token but the first
        logp, _ = masked_logprobs(model, ids, attn, target)
        for i, s in enumerate(seqs):
            torch.testing.assert_close(logp[i][target[i]], alone[i][1:], atol=1e-5, rtol=0, msg=side)


def lora_model(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(seed)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # lora_B starts at 0; make the adapter change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def test_lora_gets_gradients_frozen_weights_do_not_and_disable_adapter_is_the_reference():
    input_ids, attention_mask, target_mask = batch(seed=2)
    base_logp, _ = masked_logprobs(tiny_llama(0), input_ids, attention_mask, target_mask)
    model = lora_model(0)
    logp, _ = masked_logprobs(model, input_ids, attention_mask, target_mask)
    assert not torch.allclose(logp, base_logp, atol=1e-3)  # the adapter is applied
    with torch.no_grad(), model.disable_adapter():
        ref_logp, _ = masked_logprobs(model, input_ids, attention_mask, target_mask)
    torch.testing.assert_close(ref_logp, base_logp, atol=1e-6, rtol=0)
    (-logp.sum()).backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_no_targets_gives_zeros_and_a_usable_graph():
    model = tiny_llama()
    input_ids, attention_mask, target_mask = batch()
    logp, entropy = masked_logprobs(model, input_ids, attention_mask, torch.zeros_like(target_mask))
    assert torch.equal(logp, torch.zeros_like(logp)) and torch.equal(entropy, logp)
    logp.sum().backward()  # a micro-batch whose reflections were all truncated must not crash the step


def test_model_without_a_backbone_is_a_user_error():
    from rrr.config import UserError

    with pytest.raises(UserError):
        masked_logprobs(torch.nn.Linear(2, 2), *batch())


def test_target_at_position_zero_is_rejected():
    input_ids, attention_mask, target_mask = batch()
    target_mask[0, 0] = True
    with pytest.raises(ValueError):
        masked_logprobs(tiny_llama(), input_ids, attention_mask, target_mask)


def test_grpo_loss_through_the_model_ignores_tokens_after_and_around_the_reflection():
    """Masking invariance end to end: change everything the reflection cannot see, plus every off-mask
    old/ref log-prob and the advantage of a sequence without reflection: loss and LoRA grads unchanged."""
    parts = [(3, 2, 2, 4, 2, 3), (2, 3, 2, 3, 1, 2), (2, 2, 2, 0, 2, 2)]  # PROMPT..ATTEMPT2 lengths
    width = 18
    segments = torch.full((3, width), int(Segment.PAD))
    for i, lengths in enumerate(parts):
        row = [seg for seg, n in zip(list(Segment)[:6], lengths) for _ in range(n)]
        segments[i, width - len(row):] = torch.tensor(row)  # left padded
    attention_mask = (segments != Segment.PAD).long()
    mask = reflection_loss_mask(segments, torch.zeros(3, dtype=torch.bool))
    positions = torch.arange(width)
    unseen = positions > torch.where(mask, positions, -1).amax(-1, keepdim=True)  # after the last loss token
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, VOCAB, (3, width), generator=g)
    old, ref = -torch.rand(3, width, generator=g), -torch.rand(3, width, generator=g)
    adv = torch.tensor([0.7, -1.2, 0.4])

    def run(input_ids, old, ref, adv):
        model = lora_model(0)
        logp, entropy = masked_logprobs(model, input_ids, attention_mask, mask)
        loss, stats = grpo_loss(logp, old + logp.detach(), ref + logp.detach(), adv, mask, eps_low=0.2,
                                eps_high=0.28, beta=0.04, entropy=entropy)
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, stats

    junk_ids = torch.randint(0, VOCAB, (3, width), generator=g)
    poison = torch.tensor(float("nan")).expand(3, width)
    clean = run(input_ids, old, ref, adv)
    poisoned = run(
        torch.where(unseen | (segments == Segment.PAD), junk_ids, input_ids),
        torch.where(mask, old, poison), torch.where(mask, ref, -torch.inf), torch.tensor([0.7, -1.2, float("nan")]),
    )
    assert torch.isfinite(clean[0]) and clean[0] != 0
    torch.testing.assert_close(poisoned[0], clean[0], atol=1e-6, rtol=0)
    assert clean[1].keys() == poisoned[1].keys() and len(clean[1]) == 8  # 2 layers × (q, v) × (A, B)
    for name, grad in clean[1].items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(poisoned[1][name], grad, atol=1e-6, rtol=0, msg=name)
    assert clean[2]["reflection_tokens"] == 4 + 3


def test_masked_logprobs_score_each_token_at_its_own_temperature():
    from rrr.logprobs import segment_temperatures

    model = tiny_llama()
    input_ids, attention_mask, target_mask = batch(seed=3)
    segment_ids = torch.randint(0, 3, input_ids.shape, generator=torch.Generator().manual_seed(1))
    temps = segment_temperatures(segment_ids, {0: 0.7, 1: 1.3})           # segment 2 -> 1.0
    assert set(temps.unique().tolist()) == {0.699999988079071, 1.0, 1.2999999523162842}
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logp_all = (logits[:, :-1] / temps[:, 1:, None]).log_softmax(-1)      # token t at its own T
    expected = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    expected_entropy = -(logp_all.exp() * logp_all).sum(-1)
    for chunk in (1, 5, 1024):
        logp, entropy = masked_logprobs(model, input_ids, attention_mask, target_mask, chunk, temps)
        torch.testing.assert_close(logp[:, 1:], torch.where(target_mask[:, 1:], expected, 0))
        torch.testing.assert_close(entropy[:, 1:], torch.where(target_mask[:, 1:], expected_entropy, 0))
    scalar = masked_logprobs(model, input_ids, attention_mask, target_mask, 4, 0.7)[0]
    tensor = masked_logprobs(model, input_ids, attention_mask, target_mask, 4, torch.full(input_ids.shape, 0.7))[0]
    torch.testing.assert_close(scalar, tensor)
    with pytest.raises(ValueError, match="temperature"):
        masked_logprobs(model, input_ids, attention_mask, target_mask, 4, 0.0)
