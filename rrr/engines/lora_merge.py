"""Sample from LoRA weights merged into the base layers, and leave the base weights untouched.

peft's LoRA forward runs the base matmul and then the adapter's two thin matmuls (x·Aᵀ·Bᵀ) in every
targeted layer, for every decoded token: ~7% of a CPU train step beyond the base matmuls (issue 20).
Merged, each layer is one matmul with W + ΔW, ΔW = scaling · B·A (what vLLM does with lora_sync=merged).

peft's own `merge_adapter()` / `unmerge_adapter()` adds ΔW into W in place and subtracts it again;
in floating point (W + ΔW) − ΔW ≠ W, so every cycle moves the frozen base weights by rounding, and the
drift accumulates over a run (tests/test_lora_merge.py measures it). Here the merged weight goes into a
separate buffer: for the length of the `with`, each base layer's `weight.data` points at W + ΔW, then it
points at the original tensor again, which was never written. The restore is exact by construction
(no copy of W is kept, no subtraction); the cost is one buffer per targeted weight while sampling.

The layers are marked merged (peft's own `merged_adapters`), so their forward is the base layer alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def mergeable_lora_layers(model) -> list | None:
    """peft LoRA Linear layers with at least one active adapter, if every LoRA layer of `model` is one
    we merge exactly (vanilla LoRA on an `nn.Linear`, no DoRA/variants, no LoRA bias, not merged
    already). None when the model has none, or when any layer is of another kind (then sample unmerged)."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer
    except ImportError:                                  # peft absent: no adapters to merge
        return None
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        return None
    for layer in layers:
        if not isinstance(layer, LoraLinear) or not isinstance(layer.get_base_layer(), torch.nn.Linear):
            return None
        if layer.merged or getattr(layer, "disable_adapters", False) or getattr(layer, "lora_variant", {}) or \
                any(getattr(layer, "lora_bias", {}).values()):
            return None
    return [layer for layer in layers if _active(layer)]


def _active(layer) -> list[str]:
    return [name for name in layer.active_adapters if name in layer.lora_A]


@contextmanager
def merged_lora(model) -> Iterator[bool]:
    """Inside: every mergeable LoRA layer computes x·(W + ΔW)ᵀ in one matmul. Yields whether it merged.
    On exit the base weights are the very tensors they were (bit-for-bit) and the layers unmerged."""
    layers = mergeable_lora_layers(model)
    swapped: list[tuple[object, torch.Tensor, list[str]]] = []   # (layer, original weight data, merged_adapters)
    try:
        with torch.no_grad():
            for layer in layers or ():
                weight = layer.get_base_layer().weight
                merged = weight.detach().clone()                                  # [out, in]
                for name in _active(layer):          # peft's order and arithmetic: W += ΔW per adapter
                    merged += layer.get_delta_weight(name).to(merged.dtype)
                swapped.append((layer, weight.data, list(layer.merged_adapters)))
                weight.data = merged
                layer.merged_adapters = _active(layer)
        yield bool(swapped)
    finally:
        for layer, original, adapters in reversed(swapped):
            layer.get_base_layer().weight.data = original
            layer.merged_adapters = adapters
