"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for full fine-tuning: `train.parallel=fsdp` under torchrun.

What changes when the policy is sharded, each in one small function (torchtune keeps its sharding in
utilities the same way):
- `shard`: every decoder layer is its own FSDP unit, the root holds embeddings, final norm and LM head;
  gradients are summed over ranks, not averaged (the loss carries the global normaliser, as with ddp).
  `rrr.logprobs.masked_logprobs` runs the backbone and the LM head separately (never full-vocab logits),
  so it is registered as an FSDP forward method of the root: the root's parameters are gathered for it
  (and `rrr.shared_prefix.shared_masked_logprobs`, the same for train.shared_prefix=true).
- `fresh_copy`: the frozen reference and the sampler's copy are loaded again from the model config (the
  same initial weights); the reference is sharded like the policy.
- `GatheredEngine`: a sharded forward is a collective, and ranks generate different numbers of tokens, so
  the engine samples from an unsharded copy that `load_weights` refreshes with the gathered weights.
- `pad_micro_batches` / `idle_step`: every rank runs as many forward/backward passes as the busiest one
  (a pass with zero loss), so the per-layer all-gathers and reduce-scatters pair up across ranks.
- `full_state` / `load_full_state`: checkpoints hold the gathered weights in HF format (so `rrr evaluate
  model.path=...` reads them) and the full optimizer state, keyed by parameter name; resume re-shards both
  (torch.distributed.checkpoint.state_dict), on any number of ranks.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Sequence

import torch

from rrr import distributed as dist
from rrr.config import UserError


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def check(cfg) -> None:
    """One line for the settings FSDP cannot take."""
    if cfg.train.get("parallel", "ddp") != "fsdp":
        return
    if cfg.train.finetune != "full":
        raise UserError("train.parallel=fsdp shards full fine-tuning; LoRA adapters are small, use "
                        "train.parallel=ddp (or train.finetune=full)")
    if not dist.launched():
        raise UserError("train.parallel=fsdp needs a launcher: torchrun --nproc_per_node=N -m rrr train ... "
                        "(or accelerate launch -m rrr train ...)")


def shard(model, device_type: str | None = None):
    """fully_shard each decoder layer, then the root; masked_logprobs becomes an FSDP forward method."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    from rrr.logprobs import backbone_and_head

    mesh = init_device_mesh(device_type or dist.device().type, (dist.world(),))
    backbone, _ = backbone_and_head(model)
    for layer in backbone.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():                  # sum, not average: the loss already has the global normaliser
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)   # plain SUM (gloo has no PREMUL_SUM)
    model.rrr_masked_logprobs = types.MethodType(_masked_logprobs_method, model)
    register_fsdp_forward_method(model, "rrr_masked_logprobs")
    model.rrr_shared_masked_logprobs = types.MethodType(_shared_masked_logprobs_method, model)
    register_fsdp_forward_method(model, "rrr_shared_masked_logprobs")      # train.shared_prefix=true
    return model


def _masked_logprobs_method(self, *args, **kwargs):
    from rrr.logprobs import _masked_logprobs

    return _masked_logprobs(self, *args, **kwargs)


def _shared_masked_logprobs_method(self, *args, **kwargs):
    from rrr.shared_prefix import _shared_masked_logprobs

    return _shared_masked_logprobs(self, *args, **kwargs)


def fresh_copy(cfg):
    """The model of `cfg.model` as loaded before training (the policy's initial weights, stored and
    computed in the policy's precision; an adapter in `model.path` merged, as the policy merges it), eval mode."""
    from rrr.models import load_for_training, merge_adapter

    return merge_adapter(load_for_training(cfg.model, cfg.train.finetune, for_training=False)[0])


class GatheredEngine:
    """An engine sampling from an unsharded copy of a sharded policy; `load_weights` gathers the shards."""

    def __init__(self, cfg, tokenizer, build: Callable):
        self.copy = fresh_copy(cfg).requires_grad_(False)
        self.engine = build(cfg, self.copy, tokenizer)

    def generate(self, *args, **kwargs):
        return self.engine.generate(*args, **kwargs)

    def load_weights(self, model) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))   # every rank
        self.copy.load_state_dict(full, strict=False)          # tied weights appear once
        self.engine.load_weights(self.copy)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def pad_micro_batches(model, micro_batches: Sequence[Any]) -> list[Any]:
    """Sharded: the micro-batches padded with None up to the most any rank has; else unchanged."""
    if not is_sharded(model):
        return list(micro_batches)
    most = int(dist.all_reduce_max(len(micro_batches)))
    return list(micro_batches) + [None] * (most - len(micro_batches))


def idle_step(model, reference, pad_id: int, chunk: int) -> None:
    """A forward/backward with zero loss through policy and reference: joins the FSDP collectives of a
    micro-step, adds exactly 0 to every gradient."""
    from rrr.logprobs import masked_logprobs

    device = dist.device()
    ids = torch.full((1, 2), pad_id, dtype=torch.long, device=device)
    attn = torch.ones_like(ids)
    mask = torch.tensor([[False, True]], device=device)
    logp = masked_logprobs(model, ids, attn, mask, chunk)[0]
    if reference is not None:
        reference(ids, attn, mask, 1.0)
    (0.0 * logp.sum()).backward()


def scalar(x: torch.Tensor) -> float:
    """A (possibly DTensor) scalar as a float: clip_grad_norm_ of sharded gradients returns a DTensor."""
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)


def full_state(model, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Gathered model and optimizer state dicts on rank 0 (CPU); a collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    if getattr(model.config, "tie_word_embeddings", False):    # saved once, as save_pretrained does
        tied = getattr(model, "_tied_weights_keys", None) or []
        for key in (tied.keys() if isinstance(tied, dict) else tied):
            model_state.pop(key, None)
    return model_state, optimizer_state


def load_full_state(model, optimizer, model_state: dict[str, torch.Tensor] | None,
                    optimizer_state: dict[str, Any] | None) -> None:
    """Re-shard gathered model / optimizer state (every rank read the same checkpoint files)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, strict=False)
    if model_state is not None:
        set_model_state_dict(model, model_state, options=options)
    if optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
