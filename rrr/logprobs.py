"""Per-token log-probs where the loss needs them, without full-vocabulary fp32 logits for whole sequences.

The backbone runs over the whole sequence (it must: causal attention), but the LM head and the fp32
log-softmax run only on the hidden states that predict target tokens, a chunk of rows at a time; under
autograd each chunk is checkpointed, so backward keeps [N, H] hidden rows, not [N, V] log-probs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rrr import precision
from rrr.config import UserError


def token_logprobs(logits: Tensor, targets: Tensor, chunk_size: int = 1024) -> Tensor:
    """log softmax(logits)[targets]: logits [N, V] (any dtype), targets [N] -> [N] fp32, chunks of rows."""
    return torch.cat(
        [
            lg.float().log_softmax(-1).gather(-1, tg[:, None]).squeeze(-1)  # [n]
            for lg, tg in zip(logits.split(chunk_size), targets.split(chunk_size))
        ]
    )


def entropy_from_logits(logits: Tensor, chunk_size: int = 1024) -> Tensor:
    """H = logsumexp(z) − Σ softmax(z)·z per row: logits [N, V] -> [N] fp32, chunks of rows."""
    out = []
    for lg in logits.split(chunk_size):
        z = lg.float()  # [n, V]
        out.append(torch.logsumexp(z, -1) - (z.softmax(-1) * z).sum(-1))
    return torch.cat(out)


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder without the LM head, and the LM head, of a HF causal LM, peft-wrapped or not.

    For peft, LoRA layers live inside the base model's modules, so the base backbone applies them (and
    `with model.disable_adapter():` gives the reference).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if backbone is None or backbone is base or head is None:
        raise UserError(f"{type(base).__name__} has no decoder + LM head split: use a HF causal LM (Qwen2, Llama, ...)")
    return backbone, head


def _head_logprobs(head: nn.Module, hidden: Tensor, targets: Tensor, temperature: Tensor) -> tuple[Tensor, Tensor]:
    """hidden [n, H], targets [n], temperature [n] -> (logp [n], entropy [n], detached) for one chunk of
    rows, both of softmax(logits / T): the distribution the engine sampled from."""
    logits = head(hidden) / temperature[:, None]  # [n, V]: the only full-vocabulary tensor, one chunk at a time
    with torch.no_grad():
        entropy = entropy_from_logits(logits, chunk_size=len(logits))
    return token_logprobs(logits, targets, chunk_size=len(logits)), entropy


def masked_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    target_mask: Tensor,
    chunk_size: int = 1024,
    temperature: float | Tensor = 1.0,
) -> tuple[Tensor, Tensor]:
    """logp[b, t] = log softmax(z_t / T[b, t])[input_ids[b, t]] where target_mask[b, t], else 0, with z_t
    the logits after input_ids[b, <t].

    input_ids/attention_mask/target_mask [B, T], temperature a float or [B, T] (the temperature each
    target token was sampled at, as vLLM's processed log-probs and TRL score) -> (logp [B, T] fp32,
    entropy [B, T] fp32 of the same tempered distribution, detached).
    Position ids come from the attention mask (cumsum − 1), so left padding does not change the result.
    """
    if hasattr(model, "rrr_masked_logprobs"):  # FSDP2 (rrr/fsdp.py): runs as a forward method of the root
        return model.rrr_masked_logprobs(input_ids, attention_mask, target_mask, chunk_size, temperature)
    return _masked_logprobs(model, input_ids, attention_mask, target_mask, chunk_size, temperature)


def _masked_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor, chunk_size: int = 1024,
    temperature: float | Tensor = 1.0,
) -> tuple[Tensor, Tensor]:
    if target_mask[:, 0].any():
        raise ValueError("position 0 has no context: it cannot be a target")
    temperature = torch.as_tensor(temperature, dtype=torch.float32, device=input_ids.device).expand(input_ids.shape)
    if (temperature[target_mask] <= 0).any():
        raise ValueError("temperature must be > 0 on target tokens (greedy tokens have no log-prob to train)")
    with precision.autocast(model):  # bf16 compute over fp32 master weights (full fine-tuning); else a no-op
        return _masked_logprobs_in(model, input_ids, attention_mask, target_mask, chunk_size, temperature)


def _masked_logprobs_in(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor,
                        chunk_size: int, temperature: Tensor) -> tuple[Tensor, Tensor]:
    backbone, head = backbone_and_head(model)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # [B, T, H]
    predicts = target_mask[:, 1:]  # [B, T-1]: hidden state at t-1 predicts token t
    rows = hidden[:, :-1][predicts]  # [N, H]
    logp, entropy = head_logprobs(head, rows, input_ids[target_mask], temperature[target_mask], chunk_size)  # [N]
    return scatter_to_mask(logp, target_mask), scatter_to_mask(entropy, target_mask)


def head_logprobs(head: nn.Module, rows: Tensor, targets: Tensor, temps: Tensor,
                  chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """The LM head on the hidden rows that predict targets only, `chunk_size` rows at a time: rows [N, H],
    targets [N], temps [N] -> (logp [N] fp32, entropy [N] fp32 detached)."""
    logp, entropy = [], []
    for h, tg, tt in zip(rows.split(chunk_size), targets.split(chunk_size), temps.split(chunk_size)):  # N = 0: one chunk
        if torch.is_grad_enabled():  # recompute the chunk's logits in backward instead of storing them
            chunk = checkpoint(_head_logprobs, head, h, tg, tt, use_reentrant=False)
        else:
            chunk = _head_logprobs(head, h, tg, tt)
        logp.append(chunk[0])
        entropy.append(chunk[1])
    return torch.cat(logp), torch.cat(entropy)


def scatter_to_mask(values: Tensor, target_mask: Tensor) -> Tensor:
    """[N] values at the True positions of target_mask [B, T] (row-major) -> [B, T], 0 elsewhere (differentiable)."""
    return values.new_zeros(target_mask.shape).masked_scatter(target_mask, values)


def segment_temperatures(segment_ids: Tensor, temperatures: dict[int, float]) -> Tensor:
    """[B, T] segment ids -> [B, T] fp32: each token's sampling temperature (`temperatures[segment]`),
    1.0 on segments not in the dict (template tokens, padding: never scored)."""
    out = torch.ones(segment_ids.shape, dtype=torch.float32)
    for segment, t in temperatures.items():
        out = torch.where(segment_ids == int(segment), float(t), out)
    return out
