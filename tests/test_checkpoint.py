"""Checkpoints: atomic, complete-only, and a round trip restores weights, optimizer, scheduler and RNG."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from rrr.checkpoint import COMPLETE, latest_checkpoint, load_checkpoint, save_checkpoint
from rrr.config import UserError

torch.set_num_threads(1)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0))


def train_parts(model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return opt, sched


def one_step(model, opt, sched) -> None:
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def trainable(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("use_lora", [True, False])
def test_round_trip_restores_everything(tmp_path, use_lora):
    model = lora(tiny_llama()) if use_lora else tiny_llama()
    opt, sched = train_parts(model)
    one_step(model, opt, sched)
    save_checkpoint(tmp_path, "step_00001", model=model, tokenizer=None, optimizer=opt, scheduler=sched,
                    step=1, cursor={"epoch": 0, "index": 3}, wandb_run_id="abc")
    draws = (random.random(), np.random.rand())
    one_step(model, opt, sched)                           # its batch comes from the torch RNG
    after_two = trainable(model)

    fresh = lora(tiny_llama()) if use_lora else tiny_llama(seed=7)   # LoRA: same frozen base
    opt2, sched2 = train_parts(fresh)
    resume = load_checkpoint(latest_checkpoint(tmp_path), model=fresh, optimizer=opt2, scheduler=sched2)
    assert (resume.step, resume.cursor, resume.wandb_run_id) == (1, {"epoch": 0, "index": 3}, "abc")
    assert sched2.last_epoch == 1
    assert (random.random(), np.random.rand()) == draws
    one_step(fresh, opt2, sched2)
    for k, v in trainable(fresh).items():
        assert torch.equal(v, after_two[k]), k


def test_latest_skips_temp_and_incomplete(tmp_path):
    model = lora(tiny_llama())
    opt, sched = train_parts(model)
    for step in (2, 4):
        save_checkpoint(tmp_path, f"step_{step:05d}", model=model, tokenizer=None, optimizer=opt,
                        scheduler=sched, step=step, cursor={}, wandb_run_id=None)
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_00006").mkdir()                      # killed before COMPLETE (cannot happen, but ignore)
    (ckpts / ".step_00008.abcd.tmp").mkdir()             # a temp dir left by a SIGKILL
    (ckpts / ".step_00008.abcd.tmp" / COMPLETE).write_text("8\n")
    assert latest_checkpoint(tmp_path).name == "step_00004"
    with pytest.raises(UserError, match="incomplete"):
        load_checkpoint(ckpts / "step_00006", model=model, optimizer=opt, scheduler=sched)
    save_checkpoint(tmp_path, "final", model=model, tokenizer=None, optimizer=opt, scheduler=sched,
                    step=4, cursor={}, wandb_run_id=None)
    assert latest_checkpoint(tmp_path).name == "final"
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_failed_save_leaves_nothing(tmp_path):
    model = lora(tiny_llama())
    opt, sched = train_parts(model)

    class Boom:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, "step_00001", model=model, tokenizer=Boom(), optimizer=opt,
                        scheduler=sched, step=1, cursor={}, wandb_run_id=None)
    assert list((tmp_path / "checkpoints").iterdir()) == []
    assert latest_checkpoint(tmp_path) is None


def test_saved_checkpoint_loads_with_plain_transformers_and_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = lora(tiny_llama())
    opt, sched = train_parts(model)
    one_step(model, opt, sched)
    path = save_checkpoint(tmp_path, "final", model=model, tokenizer=None, optimizer=opt, scheduler=sched,
                           step=1, cursor={}, wandb_run_id=None)
    loaded = PeftModel.from_pretrained(tiny_llama(), str(path))
    ids = torch.randint(0, 64, (1, 8))
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, loaded(input_ids=ids).logits)

    full = tiny_llama(seed=3)
    opt, sched = train_parts(full)
    path = save_checkpoint(tmp_path, "full", model=full, tokenizer=None, optimizer=opt, scheduler=sched,
                           step=0, cursor={}, wandb_run_id=None)
    plain = AutoModelForCausalLM.from_pretrained(str(path))
    with torch.no_grad():
        assert torch.equal(full(input_ids=ids).logits, plain(input_ids=ids).logits)


class FakeCuda:
    """`n` visible CUDA devices, faked below torch's own get/set_rng_state_all (which stay real): the
    per-device functions and device_count of torch.cuda.random. Setting a device that does not exist
    raises IndexError, as `torch.cuda.default_generators[idx]` does."""

    def __init__(self, monkeypatch, n: int):
        self.n, self.states = n, {i: torch.full((16,), i, dtype=torch.uint8) for i in range(n)}
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.n)
        monkeypatch.setattr(torch.cuda.random, "device_count", lambda: self.n)
        monkeypatch.setattr(torch.cuda.random, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda.random, "set_rng_state", self.set)

    def get(self, device="cuda"):
        return self.states[int(device) if not isinstance(device, str) else 0].clone()

    def set(self, state, device="cuda"):
        if int(device) >= self.n:
            raise IndexError("tuple index out of range")
        self.states[int(device)] = state.clone()


@pytest.mark.parametrize("devices_then, devices_now", [(4, 2), (2, 0), (2, 2)])
def test_resume_with_fewer_visible_devices(tmp_path, monkeypatch, capsys, devices_then, devices_now):
    """Saved where 4 (2) GPUs were visible, resumed where 2 (none) are: the checkpoint loads, the CPU RNG
    is restored, and the CUDA RNG is skipped with a note; with the same count it is restored."""
    from rrr.checkpoint import load_latest_checkpoint

    model = lora(tiny_llama())
    opt, sched = train_parts(model)
    cuda = FakeCuda(monkeypatch, devices_then)
    save_checkpoint(tmp_path, "step_00001", model=model, tokenizer=None, optimizer=opt, scheduler=sched,
                    step=1, cursor={"index": 2}, wandb_run_id=None)
    draws = (random.random(), np.random.rand(), torch.rand(1))
    cuda.n, cuda.states = devices_now, {i: torch.zeros(16, dtype=torch.uint8) for i in range(devices_now)}
    if devices_now == 0:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    resume = load_latest_checkpoint(tmp_path, model=model, optimizer=opt, scheduler=sched)
    assert resume is not None and resume.step == 1 and resume.cursor == {"index": 2}
    assert (random.random(), np.random.rand(), torch.rand(1)) == draws
    err = capsys.readouterr().err
    assert "cannot be loaded" not in err
    if devices_then == devices_now:
        assert [int(s[0]) for s in cuda.states.values()] == list(range(devices_now))   # restored per device
        assert "CUDA RNG not restored" not in err
    else:
        assert f"CUDA RNG of {devices_then} device(s), this process sees {devices_now}" in err
        assert all(int(s.sum()) == 0 for s in cuda.states.values())                   # left alone
