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
- `save_sharded` / `load_sharded`: checkpoints hold model and optimizer state as each rank's shards
  (torch.distributed.checkpoint: every rank writes its own file, no rank gathers the optimizer), and a
  resume on any number of ranks re-shards them as it reads; `final` also gets the gathered weights in HF
  format (`full_state`), so `rrr evaluate model.path=...` reads it. `load_full_state` still reads the
  gathered checkpoints of earlier versions.
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
    from rrr.models import merge_adapter
    from rrr.precision import load_for_training

    return merge_adapter(load_for_training(cfg.model, cfg.train.finetune, for_training=False)[0])


class GatheredEngine:
    """An engine sampling from an unsharded copy of a sharded policy; `load_weights` gathers the shards."""

    def __init__(self, cfg, tokenizer, build: Callable):
        self.copy = fresh_copy(cfg).requires_grad_(False)
        self.engine = build(cfg, self.copy, tokenizer)

    def generate(self, *args, **kwargs):
        return self.engine.generate(*args, **kwargs)

    def load_weights(self, model) -> None:
        """Gather one parameter at a time into the copy (a collective per parameter, every rank in the same
        order): the extra memory is one full parameter, not a full state dict beside the copy."""
        copy = dict(self.copy.named_parameters())
        with torch.no_grad():
            for name, p in model.named_parameters():
                full = p.full_tensor() if hasattr(p, "full_tensor") else p     # [*shape] on every rank
                copy[name].copy_(full)
                del full
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


SHARDED = "sharded"      # the torch.distributed.checkpoint directory inside a checkpoint


def save_sharded(model, optimizer, directory) -> None:
    """Model and optimizer state as this rank's shards (DTensors) in `directory`, one file per rank plus
    torch.distributed.checkpoint's metadata; a collective: every rank calls it with the same directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": drop_tied(model, model_state), "optimizer": optimizer_state}, checkpoint_id=str(directory))


def load_sharded(model, optimizer, directory) -> None:
    """Read `directory` into the sharded model and optimizer; the ranks that wrote it may have been more
    or fewer (each rank reads the pieces of the saved shards that overlap its own)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": drop_tied(model, model_state), "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))      # a tied key shares its twin's tensor


def full_state(model, optimizer=None) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Gathered model (and, if given, optimizer) state dicts on rank 0 (CPU); a collective: every rank
    calls it. The HF export of `final` gathers only the model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        model_state, optimizer_state = get_model_state_dict(model, options=options), None
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    return drop_tied(model, model_state), optimizer_state


def drop_tied(model, state: dict[str, Any]) -> dict[str, Any]:
    """Tied weights (lm_head = embed_tokens) kept once, as save_pretrained does: the twin is the same
    tensor, and saving it twice doubled the embedding's share of a checkpoint."""
    if getattr(model.config, "tie_word_embeddings", False):
        tied = getattr(model, "_tied_weights_keys", None) or []
        for key in (tied.keys() if isinstance(tied, dict) else tied):
            state.pop(key, None)
    return state


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
