"""`engine=hf`: batched sampling with a plain transformers model on CPU or GPU.

We write the decode loop over `model.forward` with a KV cache instead of calling `generate`, for three
things `generate` does not give us:
- per-request seeds: sample j of prompt i draws its randomness from its own `torch.Generator`, so a
  sample is replayable whatever else shares its batch;
- one shared prefix per prompt: each unique prompt is prefilled once and its KV cache is then indexed
  out to its n samples (the G reflections of a group share their whole prompt);
- the log-prob of every sampled token under the distribution it was sampled from, recorded as we go.
Finished rows leave the batch (their cache rows are dropped), so long tails do not pay for short ones.

Across calls, a `PrefixCache` keeps the KV of every prompt we prefilled. The stages of Reflect, Retry,
Reward extend each other token for token (reflection prompt = attempt-1 prompt + attempt 1 + feedback;
retry prompt = reflection prompt + reflection + retry turn; the controls re-use the same heads), so a
later prompt prefills only what its longest cached prefix lacks. On CPU, prefill of long tool prompts
was most of an evaluation's time. The cache is emptied whenever the weights change (`load_weights`).

With `merge_lora` (engine.merge_lora, the default) a LoRA policy samples from its adapters merged into
the base weights, one matmul a layer instead of peft's three (rrr.engines.lora_merge): merged for the
length of each `generate` call, the base weights untouched, so the update right after sees the very
tensors it saw before.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from typing import Iterator

import numpy as np
import torch

from rrr import precision
from rrr.engines.base import Sample, SamplingParams
from rrr.engines.lora_merge import merged_lora

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


def stop_token_ids(tokenizer) -> list[int]:
    """eos plus whichever end-of-turn tokens this vocabulary has (ChatML, Llama 3, Phi-3)."""
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id} | {vocab[t] for t in END_OF_TURN if t in vocab}
    return sorted(i for i in ids if i is not None)


def _cache_kwarg(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@contextmanager
def eval_mode(model) -> Iterator[None]:
    """Sample in eval mode (no dropout) and hand the model back in the mode we found it in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def sample_tokens(logits: torch.Tensor, sampling: SamplingParams, generators: list[torch.Generator]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token per row and its log-prob.  logits: [R, V] -> tokens [R], logprobs [R].

    The log-prob is under softmax(logits / T) (T = 1 for greedy), i.e. what a teacher-forced forward
    at the same temperature gives the trainer; top-p only decides which tokens may be drawn.
    """
    logits = logits.float()
    logp = torch.log_softmax(logits / (sampling.temperature or 1.0), dim=-1)            # [R, V]
    if sampling.temperature == 0:
        tokens = logp.argmax(-1)
    else:
        probs = logp.exp()
        if sampling.top_p < 1.0:
            probs = _top_p(probs, sampling.top_p)
        # inverse-CDF sampling with one uniform per row from that row's own generator
        u = torch.stack([torch.rand((), generator=g) for g in generators]).to(probs.device)   # [R]
        cdf = probs.cumsum(-1)                                                          # [R, V]
        tokens = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
        tokens = tokens.clamp(max=probs.shape[-1] - 1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest set whose mass reaches top_p (the top token always stays)."""
    sorted_p, order = probs.sort(-1, descending=True)
    outside = sorted_p.cumsum(-1) - sorted_p >= top_p                                   # [R, V]
    return probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[U, L] ids and attention mask, padded on the left so every prompt ends at the last column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


KV = list[tuple[torch.Tensor, torch.Tensor]]     # per layer: keys, values [kv_heads, L, head_dim]


class PrefixCache:
    """KV caches of whole prompts, least recently used first out, within `max_bytes`.

    `longest(prompt)` finds the entry sharing the longest head with `prompt` (a common prefix, not only a
    whole entry: the KV of position t depends on tokens <= t alone, so any shared head is exact).
    An entry that is a prefix of a newer one is dropped: the newer one covers it.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], tuple[np.ndarray, KV, int]] = OrderedDict()
        self.bytes = 0
        self.hit_tokens = 0           # prompt tokens served from the cache (for benchmarks)
        self.miss_tokens = 0          # prompt tokens prefilled

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def longest(self, prompt: list[int]) -> tuple[int, KV | None]:
        """(n, kv) with the first n tokens of `prompt` cached; n <= len(prompt) − 1, since the last
        prompt token must still go through the model to give the next token's logits."""
        query = np.asarray(prompt)
        best, best_key = 0, None
        for key, (ids, _, _) in self.entries.items():
            m = min(len(ids), len(query) - 1)
            differ = np.flatnonzero(ids[:m] != query[:m])
            n = int(differ[0]) if len(differ) else m
            if n > best:
                best, best_key = n, key
        if best_key is None:
            return 0, None
        self.entries.move_to_end(best_key)
        return best, self.entries[best_key][1]

    def add(self, prompt: list[int], kv: KV) -> None:
        if self.max_bytes <= 0:
            return
        key = tuple(prompt)
        size = sum(k.nbytes + v.nbytes for k, v in kv)
        if key in self.entries or size > self.max_bytes:
            return
        ids = np.asarray(prompt)
        for old in [k for k, (o, _, _) in self.entries.items()
                    if len(o) <= len(ids) and np.array_equal(o, ids[:len(o)])]:
            self._drop(old)
        self.entries[key] = (ids, kv, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: tuple[int, ...]) -> None:
        self.bytes -= self.entries.pop(key)[2]


class HFEngine:
    """Generation with the trainer's own model object (so `load_weights` is free)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 16, stop_ids: list[int] | None = None,
                 prefix_cache_gb: float = 0.0, merge_lora: bool = True):
        self.model = model
        self.merge_lora = merge_lora
        self.prefix_cache = PrefixCache(int(prefix_cache_gb * 2**30))
        self.batch_size = batch_size
        self.stop_ids = stop_ids if stop_ids is not None else stop_token_ids(tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id
        self._cache_kwarg = _cache_kwarg(model)

    def load_weights(self, model) -> None:
        self.prefix_cache.clear()         # cached KV was computed with the old weights
        if model is self.model:
            return                        # the trainer updates this very object in place
        self.model.load_state_dict(model.state_dict())

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
                 seeds: list[list[int]] | None = None) -> list[list[Sample]]:
        if seeds is None:                 # not replayable by request, but by the global torch seed
            seeds = torch.randint(0, 2**62, (len(prompts), n)).tolist()
        if len(seeds) != len(prompts) or any(len(s) != n for s in seeds):
            raise ValueError(f"seeds must be {len(prompts)} lists of {n} seeds")
        out: list[list[Sample]] = []
        merged = merged_lora(self.model) if self.merge_lora else nullcontext()
        with eval_mode(self.model), merged, torch.inference_mode(), precision.autocast(self.model):   # the trainer's numerics
            for start in range(0, len(prompts), self.batch_size):
                chunk = slice(start, start + self.batch_size)
                out += self._generate_chunk(prompts[chunk], n, sampling, seeds[chunk])
        return out

    def _generate_chunk(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
                        seeds: list[list[int]]) -> list[list[Sample]]:
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        unique = {tuple(p): None for p in prompts}                       # prefill each prompt once
        prefix_of = {p: i for i, p in enumerate(unique)}
        slot_prompt = [prefix_of[tuple(p)] for p in prompts for _ in range(n)]      # sample slot -> prefix
        cache = DynamicCache()
        logits, mask = self._prefill([list(u) for u in unique], cache, device)      # [U, V], [U, L]

        rows = torch.tensor(slot_prompt, device=device)        # expand each prefix to its samples
        cache.batch_select_indices(rows)
        logits, mask = logits[rows], mask[rows]                                     # [R, V], [R, L]
        generators = [torch.Generator().manual_seed(int(s)) for row in seeds for s in row]
        active = list(range(len(slot_prompt)))                 # batch row -> sample slot
        tokens: list[list[int]] = [[] for _ in slot_prompt]
        logprobs: list[list[float]] = [[] for _ in slot_prompt]
        finish = ["length"] * len(slot_prompt)
        stop = torch.tensor(self.stop_ids, device=device)

        for step in range(sampling.max_tokens):
            next_ids, next_lp = sample_tokens(logits, sampling, [generators[s] for s in active])
            for row, (tok, lp) in enumerate(zip(next_ids.tolist(), next_lp.tolist())):
                tokens[active[row]].append(tok)
                logprobs[active[row]].append(lp)
            done = torch.isin(next_ids, stop)
            for row in done.nonzero().flatten().tolist():
                finish[active[row]] = "stop"
            if step == sampling.max_tokens - 1 or bool(done.all()):
                break
            if bool(done.any()):                                # finished rows leave the batch
                keep = (~done).nonzero().flatten()
                cache.batch_select_indices(keep)
                next_ids, mask = next_ids[keep], mask[keep]
                active = [active[i] for i in keep.tolist()]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            logits = self._forward(next_ids.unsqueeze(-1), mask, cache)

        samples = [Sample(token_ids=t, logprobs=lp, finish_reason=f)
                   for t, lp, f in zip(tokens, logprobs, finish)]
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _prefill(self, prompts: list[list[int]], cache, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill `prompts` into the empty `cache`, each starting from its longest cached prefix.

        Layout per row: [left pad | cached prefix | left pad | new tokens]. The mask zeros both pads and
        position ids count only real tokens, so the hole in the middle changes nothing. -> logits [U, V]
        of each prompt's last token, attention mask [U, C + D].
        """
        hits = [self.prefix_cache.longest(p) for p in prompts]
        width = max(n for n, _ in hits)                                             # C
        past = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, (n, _) in enumerate(hits):
            past[i, width - n:] = 1
        if width:
            first = next(kv for n, kv in hits if n)
            for layer, (k0, v0) in enumerate(first):
                keys = k0.new_zeros((len(prompts), k0.shape[0], width, k0.shape[2]))
                values = v0.new_zeros((len(prompts), v0.shape[0], width, v0.shape[2]))
                for i, (n, kv) in enumerate(hits):
                    if n:
                        keys[i, :, width - n:] = kv[layer][0][:, :n]
                        values[i, :, width - n:] = kv[layer][1][:, :n]
                cache.update(keys, values, layer)
        ids, new = left_pad([p[n:] for p, (n, _) in zip(prompts, hits)], self.pad_id, device)
        mask = torch.cat([past.to(device), new], dim=1)
        logits = self._forward(ids, mask, cache)
        self.prefix_cache.hit_tokens += sum(n for n, _ in hits)
        self.prefix_cache.miss_tokens += int(new.sum())
        if self.prefix_cache.max_bytes > 0:
            for i, p in enumerate(prompts):
                real = mask[i].bool()
                self.prefix_cache.add(p, [(layer.keys[i][:, real].clone(), layer.values[i][:, real].clone())
                                          for layer in cache.layers])
        return logits, mask

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        """Logits of the last position: ids [B, T] new tokens, mask [B, past + T]. -> [B, V]"""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]          # left padding aware
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_kwarg: cache})
        return out.logits[:, -1]
