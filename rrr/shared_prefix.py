"""Shared-prefix log-probs: a GRPO group's prompt + attempt 1 + feedback goes through the backbone once.

In R3 the G reflections of a group continue one identical prefix (PROMPT · ATTEMPT1 · FEEDBACK, ~85% of
each sequence on function calling). The per-episode path (`rrr.logprobs.masked_logprobs`) encodes it G
times. Here each group becomes one packed row, as in Prefix Grouper (arXiv 2506.05433):

    [ prefix (P tokens) | suffix_1 | … | suffix_G ]     suffix_i = episode i's tokens from P up to the
                                                         last one its last loss token reads
    attention: a prefix token sees the prefix causally; a suffix token sees the whole prefix and its own
    suffix causally, never another suffix; padding is seen by no real token
    position ids: the prefix 0 … P−1; every suffix restarts at P

Why exact: under causal attention, a token's hidden state depends only on the tokens before it and their
positions. A suffix token sees exactly the keys (same ids, same positions, same values: the prefix rows
are the ones every episode would compute) it sees in its own sequence, so every hidden state, log-prob
and gradient equals the per-episode path's up to float summation order; the prefix's gradient is the
sum of the G episodes' contributions, as it is when the prefix is recomputed G times. Tokens after an
episode's last loss token are dropped: they cannot change a loss log-prob (the update already stops there).

Why a 4D mask and not a prefix KV cache expanded to G: it is one ordinary forward, so HF's gradient
checkpointing (which turns `use_cache` off in train mode), peft LoRA, full fine-tuning and FSDP2 work
unchanged, with no cache plumbing. HF passes a 4D mask through as is (`masking_utils`, eager and sdpa);
Prefix Grouper patches the attention function instead, which saves the masked suffix × suffix block of
attention work (attention is the small part at these lengths: L² over the packed row, not G·(P+s)²).

Fallback: an episode whose prefix no other episode of the micro-batch shares (G = 1, no reflection
token, prefixes that differ) is a row of its own: the per-episode computation, counted in `fallback`.
Groups are found from the tokens (identical ids before the first reflection token), so the check that
a group's prefix is identical is the grouping itself. The caller keeps whole groups in a micro-batch
(`whole_group_micro_batches`): a group split across micro-batches would encode its prefix twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from rrr import precision
from rrr.config import UserError
from rrr.episode import Segment
from rrr.logprobs import _masked_logprobs, backbone_and_head, head_logprobs, masked_logprobs, scatter_to_mask

MASKED_ATTENTION = ("eager", "sdpa")   # the attention implementations that take an arbitrary 4D mask


@dataclass(frozen=True)
class PackedRow:
    """One backbone row: the prefix `members` (batch rows) share, then each member's suffix."""

    members: tuple[int, ...]
    prefix_len: int            # P: tokens before the first reflection token (0 for a row of one episode)
    needed: tuple[int, ...]    # per member: the real tokens its targets read (= its last target's index)

    @property
    def prefix_used(self) -> int:
        """The prefix tokens that any target reads (all P unless every member's targets end inside it)."""
        return min(self.prefix_len, max(self.needed))

    def suffix_len(self, j: int) -> int:
        return max(self.needed[j] - self.prefix_len, 0)

    @property
    def length(self) -> int:
        return self.prefix_used + sum(self.suffix_len(j) for j in range(len(self.members)))


def shared_prefix_len(token_ids: Sequence[Tensor], segment_ids: Sequence[Tensor]) -> int:
    """The G episodes of a group (real tokens, 1-D each) -> P, the tokens before the first reflection
    token, when all G ≥ 2 have one at the same index after identical ids; else 0 (nothing to share)."""
    starts = {reflection_start(s) for s in segment_ids}
    if len(token_ids) < 2 or len(starts) != 1 or None in starts or 0 in starts:
        return 0
    p = starts.pop()
    first = token_ids[0][:p]
    return p if all(torch.equal(ids[:p], first) for ids in token_ids[1:]) else 0


def reflection_start(segment_ids: Tensor) -> int | None:
    """Real-token segment ids [T] -> index of the first REFLECTION token (None without one)."""
    hits = (segment_ids == int(Segment.REFLECTION)).nonzero()
    return int(hits[0]) if len(hits) else None


def prefix_groups(input_ids: Tensor, attention_mask: Tensor, segment_ids: Tensor) -> list[tuple[list[int], int]]:
    """[B, T] each -> the batch rows partitioned into (rows, P): rows with identical ids before their first
    reflection token share P tokens; a row that shares with no other is ([b], 0). In order of first row."""
    by_prefix: dict[tuple[int, ...], list[int]] = {}
    for b in range(len(input_ids)):
        real = attention_mask[b].bool()
        p = reflection_start(segment_ids[b][real])
        key = tuple(input_ids[b][real][:p].tolist()) if p else ("alone", b)   # no reflection: no group
        by_prefix.setdefault(key, []).append(b)
    groups = []
    for rows in by_prefix.values():
        real = [input_ids[b][attention_mask[b].bool()] for b in rows]
        segs = [segment_ids[b][attention_mask[b].bool()] for b in rows]
        groups.append((rows, shared_prefix_len(real, segs)))                  # 0 for a group of one
    return sorted(groups, key=lambda g: g[0][0])


def whole_group_micro_batches(groups: Sequence[Sequence[int]], micro_batch_size: int) -> list[list[int]]:
    """Micro-batches of whole groups, in order: groups are added while the episodes stay ≤ micro_batch_size;
    a group larger than that is a micro-batch of its own (its packed row holds P + Σ suffixes tokens,
    fewer than micro_batch_size unshared rows whenever the suffixes are short next to the prefix)."""
    out: list[list[int]] = []
    for rows in groups:
        if out and len(out[-1]) + len(rows) <= micro_batch_size:
            out[-1] = out[-1] + list(rows)
        else:
            out.append(list(rows))
    return out


def plan_rows(input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor, segment_ids: Tensor) -> list[PackedRow]:
    """[B, T] each -> one PackedRow per prefix group (rows no target reads are dropped). Pure, CPU."""
    real_targets = [target_mask[b][attention_mask[b].bool()].nonzero().flatten() for b in range(len(target_mask))]
    if (target_mask & ~attention_mask.bool()).any() or any(len(t) and int(t[0]) == 0 for t in real_targets):
        raise ValueError("a target must be a real token with a real token before it")
    rows = []
    for members, p in prefix_groups(input_ids, attention_mask, segment_ids):
        needed = tuple(int(real_targets[b][-1]) if len(real_targets[b]) else 0 for b in members)
        row = PackedRow(tuple(members), p, needed)
        if row.length:
            rows.append(row)
    return rows


def token_counts(rows: Sequence[PackedRow]) -> dict[str, int]:
    """Tokens through the backbone: per episode (what `masked_logprobs` reads) vs packed; fallback episodes."""
    return {"episode_tokens": sum(sum(r.needed) for r in rows), "packed_tokens": sum(r.length for r in rows),
            "fallback_episodes": sum(len(r.members) for r in rows if r.prefix_len == 0)}


def pack(input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor,
         rows: Sequence[PackedRow]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The packed backbone input for `rows` of a [B, T] batch -> (ids [R, L], position ids [R, L],
    attends [R, 1, L, L] bool: query row attends key column, hidden_index [N]: for each target of
    target_mask in row-major order, the flat index into [R·L] of the hidden state that predicts it)."""
    if not rows:                                         # no target: one 1-token row keeps a graph (and FSDP's collectives)
        rows = [PackedRow((0,), 1, (1,))]
    n_rows, width = len(rows), max(r.length for r in rows)
    ids = torch.zeros((n_rows, width), dtype=torch.long)
    positions = torch.zeros((n_rows, width), dtype=torch.long)
    owner = torch.full((n_rows, width), -1, dtype=torch.long)   # 0 prefix, j+1 suffix of member j, -1 padding
    where: dict[int, tuple[int, int, int]] = {}          # batch row -> (packed row, suffix start, P)
    for r, row in enumerate(rows):
        real = [input_ids[b][attention_mask[b].bool()] for b in row.members]
        used, p = row.prefix_used, row.prefix_len
        ids[r, :used], positions[r, :used], owner[r, :used] = real[0][:used], torch.arange(used), 0
        at = used
        for j, b in enumerate(row.members):
            s = row.suffix_len(j)
            ids[r, at:at + s], positions[r, at:at + s], owner[r, at:at + s] = real[j][p:p + s], torch.arange(p, p + s), j + 1
            where[b] = (r, at, p)
            at += s
    causal = torch.ones((width, width), dtype=torch.bool).tril()                       # [L, L]
    attends = causal & ((owner[:, None, :] == 0) | (owner[:, None, :] == owner[:, :, None]))   # [R, L, L]
    hidden_index = []
    for b in range(len(target_mask)):
        t = target_mask[b][attention_mask[b].bool()].nonzero().flatten()   # real-token indices of b's targets
        if len(t):
            r, at, p = where[b]
            k = t - 1                                    # the hidden state at t-1 predicts token t
            hidden_index.append(r * width + torch.where(k < p, k, at + k - p))
    index = torch.cat(hidden_index) if hidden_index else torch.zeros(0, dtype=torch.long)
    return ids, positions, attends[:, None], index


def attention_bias(attends: Tensor, implementation: str) -> Tensor:
    """[R, 1, L, L] bool -> the 4D mask the attention implementation takes: sdpa a bool mask, eager an
    additive one (0 / finfo.min, added to the scores: HF's eager mask)."""
    if implementation == "sdpa":
        return attends
    return torch.zeros(attends.shape).masked_fill(~attends, torch.finfo(torch.float32).min)


def check_model(model: nn.Module) -> tuple[str, int | None]:
    """(attention implementation, sliding window or None) of a model whose attention a 4D mask reproduces:
    HF drops its own mask, sliding window included, for a custom one, so a window is exact only for
    sequences no longer than it (`_shared_masked_logprobs` falls back per episode above it)."""
    config = backbone_and_head(model)[0].config
    impl = config._attn_implementation
    if impl not in MASKED_ATTENTION:
        raise UserError(f"train.shared_prefix=true needs model.attn_implementation in {', '.join(MASKED_ATTENTION)} "
                        f"(a custom 4D attention mask), not {impl}; set train.shared_prefix=false or change it")
    layer_types = set(getattr(config, "layer_types", None) or ())
    if layer_types - {"full_attention", "sliding_attention"}:
        raise UserError(f"train.shared_prefix=true: {type(model).__name__} has {sorted(layer_types)} attention "
                        "layers, which a 4D mask cannot express; set train.shared_prefix=false")
    windowed = "sliding_attention" in layer_types if layer_types else getattr(config, "use_sliding_window", True)
    window = getattr(config, "sliding_window", None) if windowed else None
    return impl, int(window) if window else None


def shared_masked_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor, segment_ids: Tensor,
    chunk_size: int = 1024, temperature: float | Tensor = 1.0,
) -> tuple[Tensor, Tensor]:
    """`rrr.logprobs.masked_logprobs` with each prefix group's prefix encoded once: the same (logp [B, T],
    entropy [B, T]) aligned to the [B, T] batch (left or right padded), segment_ids [B, T] finding the groups."""
    if hasattr(model, "rrr_shared_masked_logprobs"):     # FSDP2 (rrr/fsdp.py): a forward method of the root
        return model.rrr_shared_masked_logprobs(input_ids, attention_mask, target_mask, segment_ids, chunk_size, temperature)
    return _shared_masked_logprobs(model, input_ids, attention_mask, target_mask, segment_ids, chunk_size, temperature)


def _shared_masked_logprobs(model, input_ids, attention_mask, target_mask, segment_ids, chunk_size=1024,
                            temperature=1.0) -> tuple[Tensor, Tensor]:
    device = input_ids.device
    temperature = torch.as_tensor(temperature, dtype=torch.float32, device=device).expand(input_ids.shape)
    if (temperature[target_mask] <= 0).any():
        raise ValueError("temperature must be > 0 on target tokens (greedy tokens have no log-prob to train)")
    implementation, window = check_model(model)
    if window is not None and int(attention_mask.sum(-1).max()) > window:    # HF's window, per episode: exact
        return _masked_logprobs(model, input_ids, attention_mask, target_mask, chunk_size, temperature)
    backbone, head = backbone_and_head(model)
    cpu = [x.cpu() for x in (input_ids, attention_mask, target_mask, segment_ids)]
    ids, positions, attends, index = pack(*cpu[:3], plan_rows(*cpu))
    with precision.autocast(model):   # bf16 compute over fp32 master weights (full fine-tuning); else a no-op
        hidden = backbone(input_ids=ids.to(device), attention_mask=attention_bias(attends, implementation).to(device),
                          position_ids=positions.to(device), use_cache=False).last_hidden_state   # [R, L, H]
        rows = hidden.reshape(-1, hidden.shape[-1])[index.to(device)]                              # [N, H]
        logp, entropy = head_logprobs(head, rows, input_ids[target_mask], temperature[target_mask], chunk_size)
    return scatter_to_mask(logp, target_mask), scatter_to_mask(entropy, target_mask)


def update_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor,
                    chunk_size: int, temperature: float | Tensor, segment_ids: Tensor | None = None):
    """The policy's and the reference's log-probs in the update: shared prefixes when segment_ids [B, T] is
    given (train.shared_prefix=true), per episode (`masked_logprobs`) when it is None."""
    if segment_ids is None:
        return masked_logprobs(model, input_ids, attention_mask, target_mask, chunk_size, temperature)
    return shared_masked_logprobs(model, input_ids, attention_mask, target_mask, segment_ids, chunk_size, temperature)


def update_micro_batches(input_ids: Tensor, attention_mask: Tensor, segment_ids: Tensor, size: int,
                         shared: bool) -> list[Tensor]:
    """The update's micro-batches of a [N, T] batch as row indices: whole prefix groups when shared (a
    split group would encode its prefix again), else `size` episodes in order."""
    if not len(input_ids):
        return []
    if not shared:
        return list(torch.arange(len(input_ids)).split(size))
    groups = [rows for rows, _ in prefix_groups(input_ids, attention_mask, segment_ids)]
    return [torch.tensor(mb) for mb in whole_group_micro_batches(groups, size)]


def update_token_stats(input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor, segment_ids: Tensor,
                       shared: bool) -> dict[str, int]:
    """A micro-batch's real tokens through the backbone per forward pass, and those the shared prefix saved."""
    c = token_counts(plan_rows(input_ids, attention_mask, target_mask, segment_ids))
    if not shared:
        return {"update/backbone_tokens": c["episode_tokens"], "update/prefix_tokens_saved": 0,
                "update/prefix_fallback_episodes": 0}
    return {"update/backbone_tokens": c["packed_tokens"], "update/prefix_tokens_saved": c["episode_tokens"] - c["packed_tokens"],
            "update/prefix_fallback_episodes": c["fallback_episodes"]}
