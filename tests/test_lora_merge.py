"""engine=hf samples a LoRA policy from merged weights (rrr.engines.lora_merge): the same samples and
log-probs as peft's unmerged forward (fp32, 1e-5), and the base weights, the adapter and a training
gradient afterwards exactly what they were. peft's in-place merge/unmerge drifts; ours does not."""

from __future__ import annotations

import copy

import pytest
import torch

from rrr.config import compose
from rrr.engines import build_engine
from rrr.engines.base import SamplingParams
from rrr.engines.hf import HFEngine
from rrr.engines.lora_merge import merged_lora, mergeable_lora_layers
from rrr.models import apply_lora, load_model

HOT = SamplingParams(max_tokens=12, temperature=1.0)


def lora_policy(targets: str = "[q_proj,k_proj,v_proj,o_proj]", seed: int = 0):
    """tiny-random with LoRA whose B is random (peft starts B at 0, which would make merging a no-op)."""
    cfg = compose(["model=tiny-random", "model.device=cpu", f"model.lora.target_modules={targets}"])
    model, tok = load_model(cfg.model)
    model = apply_lora(model, cfg.model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model, tok


def prompts(tok) -> list[list[int]]:
    chat = [[{"role": "user", "content": text}] for text in ("What is 2 + 3?", "Hi there", "Name a prime")]
    return [list(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)
                 ["input_ids"]) for c in chat]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def training_grads(model, ids: list[int]) -> dict[str, torch.Tensor]:
    """Gradients of a next-token loss on `ids` (train mode), for every trainable parameter."""
    model.train()
    model.zero_grad(set_to_none=True)
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0, :-1]
    torch.nn.functional.cross_entropy(logits, x[0, 1:]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    model.eval()
    return grads


def teacher_forced(model, prompt: list[int], sampled: list[int]) -> list[float]:
    """log p(sampled | prompt) at T = 1 under `model`'s own (peft, unmerged) forward."""
    ids = torch.tensor([prompt + sampled])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()           # [T, V]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(sampled)[:, None])[:, 0].tolist()


def test_merged_samples_carry_the_unmerged_models_logprobs():
    """The merged sampler's log-prob of each sampled token = peft's unmerged forward's, within fp32
    rounding (the tokens themselves may differ from an unmerged run's where a uniform draw falls within
    rounding of a CDF boundary, so each is scored teacher-forced instead)."""
    model, tok = lora_policy()
    ps = prompts(tok)
    out = HFEngine(model, tok, merge_lora=True).generate(ps, 2, HOT, seeds=[[1, 2], [3, 4], [5, 6]])
    with model.disable_adapter():
        base = [teacher_forced(model, p, s.token_ids) for p, row in zip(ps, out) for s in row]
    n = 0
    for p, row in zip(ps, out):
        for s in row:
            assert s.logprobs == pytest.approx(teacher_forced(model, p, s.token_ids), abs=1e-5, rel=1e-5)
            n += len(s.logprobs)
    assert n > 30
    sampled = [s.logprobs for row in out for s in row]
    assert sum(abs(a - b) for x, y in zip(sampled, base) for a, b in zip(x, y)) / n > 1e-2   # the adapter matters


def test_inside_the_merge_one_matmul_gives_the_adapted_outputs_and_the_layers_say_merged():
    model, tok = lora_policy()
    x = torch.tensor([prompts(tok)[0]])
    layers = mergeable_lora_layers(model)
    assert len(layers) == 2 * 4                                  # 2 layers × q/k/v/o
    with torch.no_grad():
        want = model(input_ids=x).logits
        with merged_lora(model) as did:
            assert did and all(layer.merged for layer in layers)
            got = model(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-5)
    assert not any(layer.merged for layer in layers)


def test_after_generate_the_weights_and_a_training_gradient_are_bit_for_bit_those_before():
    model, tok = lora_policy()
    untouched = copy.deepcopy(model)
    before = snapshot(model)
    data_ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(3):
        HFEngine(model, tok, merge_lora=True).generate(prompts(tok), 2, HOT, seeds=[[1, 2], [3, 4], [5, 6]])
    after = snapshot(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == data_ptrs    # the very same tensors
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    ids = prompts(tok)[1]
    got, want = training_grads(model, ids), training_grads(untouched, ids)
    assert got.keys() == want.keys() and len(got) > 0
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_fifty_merge_cycles_leave_no_drift_where_pefts_merge_unmerge_does():
    ours, _ = lora_policy()
    peft_model = copy.deepcopy(ours)
    before = snapshot(ours)
    for _ in range(50):
        with merged_lora(ours):
            pass
        peft_model.merge_adapter()
        peft_model.unmerge_adapter()
    ours_after, peft_after = snapshot(ours), snapshot(peft_model)
    assert max((ours_after[k] - before[k]).abs().max().item() for k in before) == 0.0
    drift = max((peft_after[k] - before[k]).abs().max().item() for k in before)
    print(f"peft merge_adapter/unmerge_adapter, 50 cycles, fp32: max |ΔW| = {drift:.3g}")
    assert drift > 0        # in-place (W + ΔW) − ΔW rounds: why lora_merge merges into a separate buffer


def test_an_exception_inside_the_merge_restores_the_weights():
    model, _ = lora_policy()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with merged_lora(model):
            raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())
    assert not any(layer.merged for layer in mergeable_lora_layers(model))


def test_nothing_to_merge_without_adapters_or_with_adapters_disabled(tiny_model):
    model, _ = tiny_model
    assert mergeable_lora_layers(model) is None
    with merged_lora(model) as did:
        assert not did
    policy, _ = lora_policy()
    with policy.disable_adapter():
        assert mergeable_lora_layers(policy) is None       # the base alone: the merge would add the adapter


def test_engine_merge_lora_is_a_config_switch(tiny_model):
    model, tok = tiny_model
    assert build_engine(compose(["model=tiny-random"]), model, tok).merge_lora is True
    assert build_engine(compose(["model=tiny-random", "engine.merge_lora=false"]), model, tok).merge_lora is False
