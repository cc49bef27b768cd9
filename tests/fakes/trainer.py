"""Fakes for the trainer tests: a failure set on disk, an engine whose samples stop at random lengths
(a random tiny model would never emit end-of-turn within a few tokens, so every reflection would be
truncated and masked out), and Countdown prompts with a parity verifier so groups have mixed rewards."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from rrr.engines.base import Sample
from rrr.tasks import Example, get_task
from rrr.verifiers import Verdict

EXAMPLES = [Example(id=f"cd{i}", task="countdown", source="generated",
                    fields={"nums": [i + 1, i + 2, i + 3], "target": 3 * i + 6, "witness": None})
            for i in range(3)]


def write_failures(run_dir: Path, tokenizer, pass_rates=(0.0, 0.25, 0.5)) -> Path:
    """failures.parquet in the format rrr.failures writes: 3 Countdown queries, 2 failed attempts each,
    with the attempt-1 prompt ids the trainer rebuilds (default Countdown prompts)."""
    from rrr.config import compose
    from rrr.rollout import prompt_ids

    prompts = compose(["task=countdown"]).prompts
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for ex, rate in zip(EXAMPLES, pass_rates):
        texts = [f"<answer>{ex.fields['nums'][0]} + 1</answer>", "I do not know"]
        rows.append({**ex.to_row(), "n_samples": 4, "n_correct": int(rate * 4), "pass_rate": rate,
                     "failed_texts": texts,
                     "failed_token_ids": [tokenizer(t, add_special_tokens=False)["input_ids"] + [end] for t in texts],
                     "failed_reasons": ["wrong value", "no answer"], "failed_truncated": [False, False],
                     "prompt_token_ids": prompt_ids(tokenizer, get_task("countdown"), ex, prompts)})
    run_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(run_dir / "failures.parquet", index=False)
    return run_dir


class RandomStopEngine:
    """Samples 1..max_tokens ids from its per-request seed; ends with end-of-turn unless it hits the budget."""

    def __init__(self, end_of_turn: int, vocab: int = 2000):
        self.end, self.vocab = end_of_turn, vocab

    def generate(self, prompts, n, sampling, seeds=None):
        out = []
        for row in seeds:
            samples = []
            for seed in row:
                g = torch.Generator().manual_seed(int(seed))
                length = int(torch.randint(1, sampling.max_tokens + 2, (), generator=g))
                ids = torch.randint(100, self.vocab, (min(length, sampling.max_tokens),), generator=g).tolist()
                stop = length <= sampling.max_tokens
                if stop:
                    ids[-1] = self.end
                samples.append(Sample(token_ids=ids, logprobs=[-1.0] * len(ids),
                                      finish_reason="stop" if stop else "length"))
            out.append(samples)
        return out

    def load_weights(self, model):
        pass


class ParityTask:
    """Countdown prompts; a retry is 'correct' when its decoded text has an even length."""

    def __init__(self):
        self.countdown = get_task("countdown")

    def messages(self, example, prompts_cfg):
        return self.countdown.messages(example, prompts_cfg)

    def verify(self, example, completion: str) -> Verdict:
        ok = len(completion) % 2 == 0
        return Verdict(ok, "ok" if ok else "odd length")

    def answer_in(self, example, text: str) -> bool:
        return "ANSWER" in text


def install(monkeypatch, trainer_module, canary: bool = False) -> None:
    """Route the trainer's engine and task to the fakes. The fake engine's log-probs (−1 per token) are
    no model's, so the post-sync canary is off unless `canary`."""
    if not canary:
        monkeypatch.setattr(trainer_module.sync, "check_logprob_diff", lambda step, diff, limit: None)
    monkeypatch.setattr(trainer_module, "build_engine",
                        lambda cfg, model, tok: RandomStopEngine(tok.convert_tokens_to_ids("<|im_end|>")))
    monkeypatch.setattr(trainer_module, "get_task", lambda name: ParityTask())


def crash_in_step(monkeypatch, step: int):
    """Make `trainer.run` raise RuntimeError("simulated crash") in `step` (after the checkpoint of step - 1),
    through the once-per-step `peak_rss_gb` call; returns the real `peak_rss_gb` to put back."""
    from rrr import train_log

    calls = {"n": 0}
    real = train_log.peak_rss_gb

    def crash():
        calls["n"] += 1
        if calls["n"] == step:
            raise RuntimeError("simulated crash")
        return real()

    monkeypatch.setattr(train_log, "peak_rss_gb", crash)
    return real


class ShiftedEngine:
    """The hf engine sampling from the policy itself, reporting each sampled token's log-prob plus a known
    offset `shift(i)` (i = the token's index in its sample): a sampler whose log-probs are the model's
    plus δ. A random tiny model almost never ends a turn, so every third id stops a sample (~3 tokens)."""

    def __init__(self, model, tokenizer, shift: Callable[[int], float]):
        from rrr.engines.hf import HFEngine

        self.engine = HFEngine(model, tokenizer, stop_ids=list(range(0, len(tokenizer), 3)))
        self.shift = shift

    def generate(self, prompts, n, sampling, seeds=None):
        return [[replace(s, logprobs=[lp + self.shift(i) for i, lp in enumerate(s.logprobs)]) for s in row]
                for row in self.engine.generate(prompts, n, sampling, seeds)]

    def load_weights(self, model):
        self.engine.load_weights(model)
