"""Episodes, token-in/token-out: one sequence of ids with one segment id per token.

An episode is  PROMPT · ATTEMPT1 · FEEDBACK · REFLECTION · RETRY_PROMPT · ATTEMPT2.  Model segments keep
the exact ids the sampler produced (end-of-turn included); template segments are chat-template *deltas*
tokenized once per text. Decoded model text is never re-tokenized: re-applying the chat template after
the fact drifts at turn boundaries (anchors §7 lesson 1; verl #6501, #3720).

This module is pure (no model); `collate` imports torch lazily.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Mapping, Sequence

from rrr.config import UserError
from rrr.engines.base import Sample


class Segment(IntEnum):
    PROMPT = 0        # chat-templated system + user task          (template)
    ATTEMPT1 = 1      # first answer, stored or sampled           (model)
    FEEDBACK = 2      # user turn: wrong, write a reflection       (template)
    REFLECTION = 3    # the self-reflection: the only loss tokens  (model)
    RETRY_PROMPT = 4  # user turn: try again                       (template)
    ATTEMPT2 = 5      # the retry                                  (model)
    PAD = 6


SAMPLED_SEGMENTS = ("attempt1", "reflection", "attempt2")   # keys of Episode.truncated / Episode.texts


@dataclass
class Episode:
    example_id: str
    group_index: int              # which query of the batch
    sample_index: int             # which reflection of the group
    token_ids: list[int]
    segment_ids: list[int]        # one Segment per token
    sampler_logprobs: list[float]  # the engine's log-probs on sampled tokens, 0.0 on template tokens
    truncated: dict[str, bool] = field(default_factory=dict)   # per sampled segment: hit max_tokens
    texts: dict[str, str] = field(default_factory=dict)        # decoded, for logs only
    attempt1_correct: bool = False
    attempt2_correct: bool | None = None   # None: no retry, or the verifier could not score it
    reward: float | None = None            # None: unscorable or no retry (never 0 for a verifier error)
    reasons: dict[str, str] = field(default_factory=dict)      # verifier reasons per attempt

    @property
    def has_retry(self) -> bool:
        """False when attempt 1 ended the episode (online mode: passed, or could not be scored)."""
        return "attempt2" in self.truncated

    @property
    def reflection_length(self) -> int:
        return sum(1 for s in self.segment_ids if s == Segment.REFLECTION)


# ----------------------------------------------------------------------------------------------------
# Template deltas


@dataclass(frozen=True)
class TurnDelta:
    """A fixed user turn as it follows an assistant turn: the separator after the model's end-of-turn,
    the user message, and the next assistant generation prompt (`\\n<|im_start|>user\\n…<|im_end|>\\n
    <|im_start|>assistant\\n` for ChatML). `end_of_turn` closes the previous turn when the sampler did not
    (truncated at max_tokens)."""

    ids: tuple[int, ...]
    end_of_turn: int
    stop_ids: frozenset[int]   # ids that already end an assistant turn (end_of_turn, eos)

    def after(self, sample: Sample) -> list[int]:
        closed = bool(sample.token_ids) and sample.token_ids[-1] in self.stop_ids
        return list(self.ids) if closed else [self.end_of_turn, *self.ids]


_USER_PLACEHOLDER = "RRR-USER-PLACEHOLDER"
_ASSISTANT_PLACEHOLDER = "RRR-ASSISTANT-PLACEHOLDER"
# per tokenizer, per (chat template, text): the template is part of the key because tests (and users)
# may swap it on the same tokenizer object
_DELTA_CACHE: "weakref.WeakKeyDictionary[Any, dict[tuple[str, str], TurnDelta]]" = weakref.WeakKeyDictionary()


def render_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """`apply_chat_template` as a plain id list (transformers 5 returns a BatchEncoding by default)."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                              tokenize=True, return_dict=False))


def _render_text(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def user_turn_delta(tokenizer, text: str) -> TurnDelta:
    """The ids a user turn `text` adds after an assistant turn, tokenized once per (template, text).

    The delta is the difference between rendering [user, assistant P] and [user, assistant P, user text]
    (+ generation prompt), both with placeholder content P, taken after P: this keeps whatever separator
    the template puts after the end-of-turn token (Qwen's and SmolLM2's `\\n`, nothing for Llama 3) and does
    not depend on how the template renders a *last* assistant turn. The suffix starts right after P, at a
    special token, so tokenizing it alone gives the same ids as tokenizing the whole conversation.
    """
    per_tok = _DELTA_CACHE.setdefault(tokenizer, {})
    key = (str(tokenizer.chat_template), text)
    if key not in per_tok:
        base = [{"role": "user", "content": _USER_PLACEHOLDER},
                {"role": "assistant", "content": _ASSISTANT_PLACEHOLDER}]
        without = _render_text(tokenizer, base, add_generation_prompt=False)
        with_turn = _render_text(tokenizer, [*base, {"role": "user", "content": text}], add_generation_prompt=True)
        cut = without.index(_ASSISTANT_PLACEHOLDER) + len(_ASSISTANT_PLACEHOLDER)
        if with_turn[:cut] != without[:cut]:
            raise ValueError("chat template renders earlier turns differently when a user turn follows; "
                             "template deltas need an append-only template")
        suffix = _encode(tokenizer, with_turn[cut:])
        end_of_turn = suffix[0]
        if end_of_turn not in set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder):
            raise ValueError(f"chat template does not close an assistant turn with a special token "
                             f"(found {tokenizer.convert_ids_to_tokens(end_of_turn)!r})")
        stop = {end_of_turn} | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        per_tok[key] = TurnDelta(ids=tuple(suffix[1:]), end_of_turn=end_of_turn, stop_ids=frozenset(stop))
    return per_tok[key]


def template_sample(tokenizer, text: str, end_of_turn: int) -> Sample:
    """A fixed assistant message (the generic-reflection control) shaped like a finished sample.

    Its log-probs are 0.0: these tokens are template, not sampled."""
    ids = [*_encode(tokenizer, text), end_of_turn]
    return Sample(token_ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop")


# ----------------------------------------------------------------------------------------------------
# Assembly (prefixes for the rollout, the full episode for training)


@dataclass(frozen=True)
class Tokens:
    """A growing episode: ids, one segment per id, and the sampler's log-prob per id (0.0 on template)."""

    ids: tuple[int, ...] = ()
    segments: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()

    def template(self, ids: Sequence[int], segment: Segment) -> "Tokens":
        return Tokens(self.ids + tuple(ids), self.segments + (int(segment),) * len(ids),
                      self.logprobs + (0.0,) * len(ids))

    def sampled(self, sample: Sample, segment: Segment) -> "Tokens":
        n = len(sample.token_ids)
        if sample.logprobs and len(sample.logprobs) != n:
            raise ValueError(f"{segment.name}: {len(sample.logprobs)} log-probs for {n} sampled tokens")
        lp = tuple(sample.logprobs) if sample.logprobs else (0.0,) * n   # stored attempts may lack them
        return Tokens(self.ids + tuple(sample.token_ids), self.segments + (int(segment),) * n, self.logprobs + lp)


def attempt1_prefix(prompt_ids: Sequence[int], attempt1: Sample) -> Tokens:
    """PROMPT · ATTEMPT1."""
    return Tokens().template(prompt_ids, Segment.PROMPT).sampled(attempt1, Segment.ATTEMPT1)


def reflection_prefix(prompt_ids: Sequence[int], attempt1: Sample, feedback: TurnDelta) -> Tokens:
    """PROMPT · ATTEMPT1 · FEEDBACK (ending in the assistant generation prompt): where reflections are sampled."""
    return attempt1_prefix(prompt_ids, attempt1).template(feedback.after(attempt1), Segment.FEEDBACK)


def retry_prefix(prefix: Tokens, reflection: Sample | None, last: Sample, retry: TurnDelta) -> Tokens:
    """… · REFLECTION · RETRY_PROMPT: where attempt 2 is sampled. `last` is the turn the retry prompt
    follows (the reflection, or attempt 1 when there is no reflection turn)."""
    if reflection is not None:
        prefix = prefix.sampled(reflection, Segment.REFLECTION)
    return prefix.template(retry.after(last), Segment.RETRY_PROMPT)


def assemble(prompt_ids: Sequence[int], attempt1: Sample, feedback: TurnDelta | None,
             reflection: Sample | None, retry: TurnDelta, attempt2: Sample) -> Tokens:
    """The full episode. `feedback` and `reflection` are None for the no-reflection control, where the
    retry turn follows attempt 1 directly."""
    if (feedback is None) != (reflection is None):
        raise ValueError("feedback and reflection go together (both None only without a reflection turn)")
    if feedback is None:
        prefix = attempt1_prefix(prompt_ids, attempt1)
        return retry_prefix(prefix, None, attempt1, retry).sampled(attempt2, Segment.ATTEMPT2)
    prefix = reflection_prefix(prompt_ids, attempt1, feedback)
    return retry_prefix(prefix, reflection, reflection, retry).sampled(attempt2, Segment.ATTEMPT2)


def prompt_text(prompts_cfg: Mapping, key: str, **fields: Any) -> str:
    """A prompt text from conf/prompts/ (a str.format template: literal braces are doubled there)."""
    try:
        return str(prompts_cfg[key]).format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"prompts.{key} has an unknown or malformed {{field}} ({exc}); "
                        f"double literal braces: {{{{ }}}}") from None


def feedback_text(prompts_cfg: Mapping, verdict_reason: str) -> str:
    """The feedback turn: the attempt was wrong, + `feedback_reason` (the verifier's reason) appended
    as is when `feedback_with_reason` is true."""
    text = prompt_text(prompts_cfg, "feedback")
    if prompts_cfg.get("feedback_with_reason", False):
        text += prompt_text(prompts_cfg, "feedback_reason", reason=verdict_reason)
    return text


# ----------------------------------------------------------------------------------------------------
# Batching


def collate(episodes: Sequence[Episode], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors. The attention mask comes from the segments, never from `pad_id` (pad may
    equal eos, trl#4974). The loss mask is `rrr.grpo.reflection_loss_mask(segment_ids, reflection_truncated)`."""
    import torch

    if not episodes:
        raise ValueError("collate needs at least one episode")
    width = max(len(e.token_ids) for e in episodes)
    input_ids = torch.full((len(episodes), width), pad_id, dtype=torch.long)          # [B, T]
    segment_ids = torch.full((len(episodes), width), int(Segment.PAD), dtype=torch.long)
    old_logprobs = torch.zeros((len(episodes), width), dtype=torch.float32)
    for i, e in enumerate(episodes):
        n = len(e.token_ids)
        input_ids[i, :n] = torch.tensor(e.token_ids, dtype=torch.long)
        segment_ids[i, :n] = torch.tensor(e.segment_ids, dtype=torch.long)
        old_logprobs[i, :n] = torch.tensor(e.sampler_logprobs, dtype=torch.float32)
    return {
        "input_ids": input_ids,
        "segment_ids": segment_ids,
        "attention_mask": (segment_ids != int(Segment.PAD)).long(),
        "old_logprobs": old_logprobs,
        "reflection_truncated": torch.tensor([e.truncated.get("reflection", False) for e in episodes]),
    }
