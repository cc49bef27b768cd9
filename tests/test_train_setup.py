"""rrr.train_setup (unit): the LR schedule, glibc's mmap threshold, the reference policy of a run that
starts from an adapter, and a full fine-tune from an adapter (merged, every weight trained). Moved from test_trainer.py and test_trainer_core.py when the trainer was split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rrr import train_setup
from rrr.config import compose

torch.set_num_threads(1)


def test_lr_schedule_warms_up_then_decays():
    cosine = train_setup.lr_lambda(warmup=2, total=10, schedule="cosine")
    assert [cosine(0), cosine(1), cosine(2)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert cosine(6) == pytest.approx(0.5) and 0 < cosine(9) < cosine(8)
    assert train_setup.lr_lambda(0, 10, "constant")(9) == 1.0


def test_malloc_mmap_threshold_is_set_on_glibc_and_off_at_zero():
    import platform

    assert train_setup.malloc_mmap_threshold(0) is False
    if platform.libc_ver()[0] == "glibc":
        assert train_setup.malloc_mmap_threshold(4 << 20) is True


def saved_adapter(path: Path) -> Path:
    """A trained-looking LoRA adapter of tiny-random (lora_B ≠ 0), saved to `path`."""
    from peft import get_peft_model, LoraConfig

    from rrr.models import load_model

    base, _ = load_model(compose(["model=tiny-random", "model.device=cpu"]).model)
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    peft.save_pretrained(path)
    return path


def test_reference_of_a_run_started_from_an_adapter_is_that_adapter_frozen(tmp_path):
    from rrr.logprobs import masked_logprobs

    saved_adapter(tmp_path / "adapter")
    cfg = compose(["task=countdown", "model=tiny-random", "model.device=cpu", f"model.path={tmp_path / 'adapter'}",
                   "train.beta=0.1", "train.gradient_checkpointing=false"])
    model, tokenizer = train_setup.build_policy(cfg)
    reference = train_setup.build_reference(cfg, model)
    ids = torch.tensor([tokenizer("hello there, how are you", add_special_tokens=False)["input_ids"]])
    attn, mask = torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    with torch.no_grad():
        start = masked_logprobs(model, ids, attn, mask, 64)[0]
        with model.disable_adapter():
            bare = masked_logprobs(model, ids, attn, mask, 64)[0]
    ref = reference(ids, attn, mask)
    assert torch.allclose(ref, start, atol=1e-5) and not torch.allclose(ref, bare, atol=1e-3)
    with torch.no_grad():                                            # training moves the policy, not π_ref
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(1.0)
    assert torch.allclose(reference(ids, attn, mask), ref, atol=1e-6)


def test_full_fine_tune_from_an_adapter_merges_it_and_trains_every_weight(tmp_path):
    """train.finetune=full with model.path = an adapter: the policy is base + adapter merged (same outputs
    as the adapter model), every base weight trainable and no adapter left; the reference and FSDP's
    fresh copy are that merged model too (same parameter names, so a weight sync cannot silently miss)."""
    from rrr import fsdp
    from rrr.logprobs import masked_logprobs
    from rrr.models import load_model

    path = saved_adapter(tmp_path / "adapter")
    cfg = compose(["task=countdown", "model=tiny-random", "model.device=cpu", f"model.path={path}",
                   "train.finetune=full", "train.beta=0.1", "train.gradient_checkpointing=false"])
    model, tokenizer = train_setup.build_policy(cfg)
    base, _ = load_model(compose(["model=tiny-random", "model.device=cpu"]).model)
    adapter_model, _ = load_model(cfg.model)                          # the adapter on its base, unmerged
    names = {n for n, _ in model.named_parameters()}
    assert names == {n for n, _ in base.named_parameters()} and not any("lora" in n for n in names)
    assert all(p.requires_grad for p in model.parameters()) and model.training
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trained == sum(p.numel() for p in base.parameters())       # millions on a real model, not the adapter's few
    ids = torch.tensor([tokenizer("hello there, how are you", add_special_tokens=False)["input_ids"]])
    attn, mask = torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    model.eval()
    with torch.no_grad():
        merged = masked_logprobs(model, ids, attn, mask, 64)[0]
        want = masked_logprobs(adapter_model, ids, attn, mask, 64)[0]
        bare = masked_logprobs(base, ids, attn, mask, 64)[0]
    assert torch.allclose(merged, want, atol=1e-5) and not torch.allclose(merged, bare, atol=1e-3)
    assert torch.allclose(train_setup.build_reference(cfg, model)(ids, attn, mask), want, atol=1e-5)
    fresh = fsdp.fresh_copy(cfg)
    assert {n for n, _ in fresh.named_parameters()} == names
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
