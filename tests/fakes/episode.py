"""Fakes for the episode and rollout tests: a Qwen2.5-style tokenizer, a scripted engine, a task.

The engine is deterministic: each sample's text comes from a script keyed by the segment, which the
engine recognises by its max_tokens budget (SAMPLING below), and is tokenized with the real tokenizer so
decoded text round-trips. Texts longer than the budget are cut without eos (finish_reason "length").
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import pytest

from rrr.engines.base import Sample, SamplingParams
from rrr.tasks import Example
from rrr.verifiers import Verdict

QWEN25_TEMPLATE = (Path(__file__).parent / "episode_qwen25_chat_template.jinja").read_text()

SAMPLING = {"attempt1": SamplingParams(max_tokens=40, temperature=1.0),
            "reflection": SamplingParams(max_tokens=41, temperature=0.9),
            "attempt2": SamplingParams(max_tokens=42, temperature=0.7, top_p=0.95)}
SEGMENT_BY_BUDGET = {p.max_tokens: name for name, p in SAMPLING.items()}

PROMPTS = {
    "system": "You solve small puzzles.",
    "user": "Solve {q}.",
    "feedback": "Your answer was wrong. Write a short reflection on what went wrong.",
    "feedback_with_reason": False,
    "feedback_reason": " The checker said: {reason}.",
    "retry": "Try again.",
    "retry_no_reflection": "Your answer was wrong. Try again.",
    "generic_reflection": "I should check my work more carefully.",
}


@pytest.fixture(scope="session")
def qwen_style_tokenizer(smol_tokenizer):
    """SmolLM2's tokenizer (same <|im_start|>/<|im_end|> tokens) with the Qwen2.5 chat template: a
    default system prompt when none is given, and `<|im_end|>\\n` separators."""
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = QWEN25_TEMPLATE
    return tok


def example(i: int, answer: int = 7) -> Example:
    return Example(id=f"ex{i}", task="fake", source="test", fields={"q": i, "answer": answer})


class FakeTask:
    """verify: correct iff the completion says `ANSWER <answer>`; raises when it says CRASH."""

    def messages(self, ex: Example, prompts_cfg) -> list[dict]:
        return [{"role": "system", "content": prompts_cfg["system"]},
                {"role": "user", "content": prompts_cfg["user"].format(q=ex.fields["q"])}]

    def verify(self, ex: Example, completion: str) -> Verdict:
        if "CRASH" in completion:
            raise RuntimeError("verifier bug")
        ok = f"ANSWER {ex.fields['answer']}" in completion
        return Verdict(ok, "ok" if ok else "wrong answer")


Script = Callable[[int, int, list[int]], str]   # (prompt index, sample index, prompt ids) -> text


class FakeEngine:
    def __init__(self, tokenizer, scripts: dict[str, Script]):
        self.tokenizer = tokenizer
        self.scripts = scripts
        self.calls: list[dict] = []   # every generate call: segment, prompts, n, sampling, seeds

    def generate(self, prompts, n, sampling, seeds=None):
        segment = SEGMENT_BY_BUDGET[sampling.max_tokens]
        self.calls.append({"segment": segment, "prompts": [list(p) for p in prompts], "n": n,
                           "sampling": sampling, "seeds": seeds})
        return [[self._sample(self.scripts[segment](i, j, list(p)), sampling) for j in range(n)]
                for i, p in enumerate(prompts)]

    def _sample(self, text: str, sampling: SamplingParams) -> Sample:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + [self.tokenizer.eos_token_id]
        finish = "stop"
        if len(ids) > sampling.max_tokens:
            ids, finish = ids[: sampling.max_tokens], "length"
        return Sample(token_ids=ids, logprobs=[-0.5 - 0.01 * k for k in range(len(ids))], finish_reason=finish)

    def load_weights(self, model) -> None:
        pass
