"""The shared R3 workload: failed queries with a stored attempt 1, their reflection prompts, and plain
`model.generate` (what a TRL user calls inside a `rollout_func`, and the raw limit of the rollout bench).

Prompt ids are built with rrr's template deltas (rrr.episode), so every system sees the same ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch


def load_workload(a: dict[str, Any]):
    """(cfg, examples, stored attempts) of the failure set `a['failures']`, first `a['queries']` queries."""
    from rrr.config import compose
    from rrr.failure_set import load_failure_set
    from bench.common import rrr_overrides

    cfg = compose([*rrr_overrides(a), f"train.failures={a['failures']}"])
    examples, stored = load_failure_set(a["failures"], 0.0, 1.0)
    return cfg, examples[:a["queries"]], stored[:a["queries"]]


def trim_failures(src: str | Path, dst: str | Path, n: int) -> Path:
    """A copy of the failure set `src` holding its first `n` failed queries (with a stored attempt), so
    every side trains on exactly the same queries: rrr's cursor then draws all n each step, as TRL's
    sampler does over a dataset of n prompts."""
    import shutil

    import pandas as pd

    src, dst = Path(src), Path(dst)
    df = pd.read_parquet(src / "failures.parquet")
    df = df[[len(t) > 0 for t in df["failed_token_ids"]]].head(n)
    if len(df) < n:
        raise SystemExit(f"error: {src} holds {len(df)} failed queries, the bench needs queries={n}: raise "
                         "collect_queries (more queries to collect failures from) or lower queries")
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for name in ("manifest.json", "config.yaml", "summary.json"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    df.reset_index(drop=True).to_parquet(dst / "failures.parquet")
    return dst


def attempt1(cfg, example, stored: dict, step: int):
    """The stored failed attempt 1 that `rrr train` picks for (example, step)."""
    from rrr.trainer import stored_attempt

    return stored_attempt(stored, example, int(cfg.seed), step)


def reflection_prompts(cfg, tokenizer, task, examples, attempts) -> list:
    """PROMPT · ATTEMPT1 · FEEDBACK token sequences (rrr.episode.Tokens), one per failed query."""
    from rrr.episode import feedback_text, reflection_prefix, user_turn_delta
    from rrr.rollout import prompt_ids

    return [reflection_prefix(prompt_ids(tokenizer, task, ex, cfg.prompts), at.sample,
                              user_turn_delta(tokenizer, feedback_text(cfg.prompts, at.verdict.reason)))
            for ex, at in zip(examples, attempts)]


def retry_prompt(cfg, tokenizer, prefix, reflection_ids: list[int]):
    """… · REFLECTION · RETRY_PROMPT for one reflection (a Tokens)."""
    from rrr.engines.base import Sample
    from rrr.episode import Segment, retry_prefix, user_turn_delta
    from rrr.rollout import prompt_text

    stop = set(_stop_ids(tokenizer))
    reflection = Sample(token_ids=reflection_ids,
                        finish_reason="stop" if reflection_ids and reflection_ids[-1] in stop else "length")
    return retry_prefix(prefix, reflection, reflection, user_turn_delta(tokenizer, prompt_text(cfg.prompts, "retry")))


def _stop_ids(tokenizer) -> list[int]:
    from rrr.engines.hf import stop_token_ids

    return stop_token_ids(tokenizer)


@torch.inference_mode()
def hf_generate(model, tokenizer, prompts: Sequence[Sequence[int]], n: int, max_new_tokens: int,
                temperature: float, top_p: float = 1.0) -> list[list[list[int]]]:
    """One batched `model.generate(num_return_sequences=n)` over left-padded prompts. Returns, per prompt,
    n sampled id lists cut after the first stop token (stop included), as a user of `generate` would."""
    from transformers import GenerationConfig

    stop = _stop_ids(tokenizer)
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p))
        mask[i, width - len(p):] = 1
    gen = GenerationConfig(do_sample=temperature > 0, temperature=temperature or None, top_p=top_p, top_k=0,
                           max_new_tokens=max_new_tokens, num_return_sequences=n, eos_token_id=stop,
                           pad_token_id=pad)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)[:, width:]
    finally:
        model.train(was_training)
    samples = []
    for row in out.tolist():
        cut = next((j + 1 for j, t in enumerate(row) if t in stop), len(row))
        samples.append(row[:cut])
    return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]
