"""Precision: bf16 compute over fp32 master weights where weights are trained in full (issue #22).

`model.dtype` names the *compute* dtype (`auto`: bf16 on CUDA, fp32 on CPU). What is stored depends on
what is trained:
- full fine-tuning in bf16/fp16: the weights are loaded and kept in fp32 (the master copy AdamW updates,
  with fp32 moments), and every forward runs under `torch.autocast(compute dtype)`: matmuls in bf16,
  reductions, norms and the log-softmax in fp32. Updated in bf16 directly, most AdamW steps at lr 1e-5
  round away (one step changed 15.6% of N(0, 0.02) bf16 weights vs 100% in fp32); gradients are fp32, so
  they are also summed over ranks in fp32 (DDP-style and FSDP2 alike).
- LoRA: the frozen base stays in the compute dtype (it is never updated: no master copy needed); peft
  keeps the adapters in fp32 (`autocast_adapter_dtype`), so they are their own master weights.

Why autocast over fp32 parameters (HF Trainer / TRL's `bf16=True`) rather than FSDP2's
`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` (torchtitan): one code path and the same
arithmetic for one process, DDP-style ranks and FSDP2, so a resume on another rank count or parallelism
continues the same run; the engine=hf sampler shares the policy object and samples under the same autocast,
so the sync canary compares like with like. The cost is FSDP2 all-gathering fp32 shards (2x the bytes of
bf16 gathers); for large FSDP jobs where that matters, MixedPrecisionPolicy is the faster choice.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

HALF = (torch.bfloat16, torch.float16)


def master_dtype(compute: torch.dtype, finetune: str) -> torch.dtype:
    """The dtype the trained weights are stored in: fp32 under half-precision full fine-tuning."""
    return torch.float32 if finetune == "full" and compute in HALF else compute


def set_compute_dtype(model, compute: torch.dtype):
    """Mark `model` to run its forwards in `compute` (autocast) when its weights are stored wider."""
    model.rrr_compute_dtype = compute
    return model


def compute_dtype(model) -> torch.dtype:
    """The dtype `model`'s forwards compute in: its mark, else its parameters' dtype."""
    marked = getattr(model, "rrr_compute_dtype", None)
    return marked if marked is not None else next(model.parameters()).dtype


def autocast(model):
    """torch.autocast to the model's compute dtype when its parameters are stored in fp32; else a no-op."""
    compute, param = compute_dtype(model), next(model.parameters())
    if compute in HALF and param.dtype == torch.float32:
        return torch.autocast(device_type=param.device.type, dtype=compute)
    return nullcontext()


def load_for_training(model_cfg, finetune: str, *, for_training: bool = True):
    """(model, tokenizer) stored as training keeps them: `model.dtype` is the compute dtype; under full
    fine-tuning in bf16/fp16 the weights load in fp32 (the master weights AdamW updates) and the model is
    marked to compute in `model.dtype` under autocast. LoRA: as `rrr.models.load_model`."""
    from omegaconf import OmegaConf

    from rrr.models import _cfg, load_model, resolve_device, resolve_dtype

    cfg = _cfg(model_cfg)
    compute = resolve_dtype(cfg.dtype, resolve_device(cfg.device))
    if master_dtype(compute, finetune) != compute:
        cfg = OmegaConf.merge(cfg, {"dtype": "float32"})
    model, tokenizer = load_model(cfg, for_training=for_training)
    return set_compute_dtype(model, compute), tokenizer
