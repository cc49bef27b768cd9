"""The reflect-retry rollout: attempt 1 → feedback → G reflections → one retry per reflection → reward.

Every stage is one `engine.generate` call over the whole batch. Each sample's seed derives from
(run seed, step, example id, sample index, segment), so a run can be replayed (anchors §7 lesson 7).
A group is exactly G reflections for one fixed (query, failed attempt 1) (lesson 4); a verifier error
makes a retry unscorable (reward None), never reward 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Sequence

from rrr.config import UserError
from rrr.engines.base import Engine, Sample, SamplingParams, derive_seed
from rrr.episode import (SAMPLED_SEGMENTS, Episode, Segment, Tokens, attempt1_prefix, feedback_text,
                         prompt_text, reflection_prefix, render_ids, retry_prefix, template_sample,
                         user_turn_delta)
from rrr.tasks import Example
from rrr.verifiers import Verdict

REFLECTION_MODES = ("model", "generic", "none")
UNSCORABLE = Verdict(False, "unscorable: the verifier raised")   # stands in for a crashed verifier


class Attempt(NamedTuple):
    sample: Sample
    text: str
    verdict: Verdict


@dataclass
class RolloutStats:
    """Generation counts per stage, for throughput logs (generated tokens/s) and unscorable counts."""

    samples: dict[str, int] = field(default_factory=dict)
    generated_tokens: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    unscorable: int = 0

    def record(self, segment: str, samples: list[list[Sample]], seconds: float) -> None:
        flat = [s for per_prompt in samples for s in per_prompt]
        self.samples[segment] = self.samples.get(segment, 0) + len(flat)
        self.generated_tokens[segment] = self.generated_tokens.get(segment, 0) + sum(len(s.token_ids) for s in flat)
        self.seconds[segment] = self.seconds.get(segment, 0.0) + seconds

    @property
    def tokens_per_second(self) -> float:
        secs = sum(self.seconds.values())
        return sum(self.generated_tokens.values()) / secs if secs > 0 else 0.0


def throughput(stats: RolloutStats) -> dict[str, float | int]:
    """Generated tokens and tokens/s of this invocation (a resumed run counts only what it generated)."""
    return {"generated_tokens": int(sum(stats.generated_tokens.values())),
            "tokens_per_s": round(float(stats.tokens_per_second), 1)}


def sampling_from_cfg(cfg_node: Mapping) -> dict[str, SamplingParams]:
    """{attempt1, reflection, attempt2: {max_tokens, temperature, top_p}} → SamplingParams per segment."""
    out = {}
    for segment in SAMPLED_SEGMENTS:
        node = cfg_node.get(segment) if cfg_node is not None else None
        if node is None or node.get("max_tokens") is None:
            raise UserError(f"sampling.{segment}.max_tokens is missing; set it, e.g. "
                            f"train.sampling.{segment}.max_tokens=256")
        out[segment] = sampling_params(node)
    return out


def sampling_params(node: Mapping) -> SamplingParams:
    """The one constructor: a {max_tokens, temperature (default 1), top_p (default 1)} node (collect.*,
    <group>.sampling.<segment>) → SamplingParams."""
    return SamplingParams(max_tokens=int(node["max_tokens"]), temperature=float(node.get("temperature", 1.0)),
                          top_p=float(node.get("top_p", 1.0)))


def prompt_ids(tokenizer, task, example: Example, prompts_cfg: Mapping) -> list[int]:
    """The chat-templated task prompt, ending with the assistant generation prompt."""
    return render_ids(tokenizer, task.messages(example, prompts_cfg), add_generation_prompt=True)


def _prompt_ids_by_example(tokenizer, task, examples: Sequence[Example], prompts_cfg: Mapping) -> list[list[int]]:
    cache: dict[str, list[int]] = {}
    for ex in examples:
        if ex.id not in cache:
            cache[ex.id] = prompt_ids(tokenizer, task, ex, prompts_cfg)
    return [cache[ex.id] for ex in examples]


def _generate(engine: Engine, prompts: list[list[int]], n: int, sampling: SamplingParams,
              seeds: list[list[int]], segment: str, stats: RolloutStats) -> list[list[Sample]]:
    start = time.perf_counter()
    out = engine.generate(prompts, n, sampling, seeds=seeds)
    stats.record(segment, out, time.perf_counter() - start)
    if len(out) != len(prompts) or any(len(per_prompt) != n for per_prompt in out):
        # exact cardinality, or groups silently shrink/grow (AgenticArXiv-RL PR #33, R3L)
        raise RuntimeError(f"engine returned {[len(p) for p in out]} samples for {len(prompts)} prompts × {n}")
    return out


def _verify(task, example: Example, text: str, stats: RolloutStats) -> Verdict | None:
    """The task's verdict, or None when the verifier itself fails (unscorable, counted)."""
    try:
        return task.verify(example, text)
    except Exception:  # noqa: BLE001 — any verifier crash is "unscorable", whatever its type
        stats.unscorable += 1
        return None


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def sample_attempts(engine: Engine, tokenizer, task, examples: Sequence[Example], prompts_cfg: Mapping,
                    sampling: SamplingParams, n: int, seed: int, step: int, segment: str = "attempt1",
                    stats: RolloutStats | None = None) -> list[list[Attempt]]:
    """n verified samples per example, in one engine call (collect-failures: n = k; evaluation: 1 or 2).

    An attempt the verifier cannot score gets the `UNSCORABLE` verdict and is counted."""
    stats = stats if stats is not None else RolloutStats()
    prompts = _prompt_ids_by_example(tokenizer, task, examples, prompts_cfg)
    seeds = [[derive_seed(seed, step, ex.id, j, segment) for j in range(n)] for ex in examples]
    samples = _generate(engine, prompts, n, sampling, seeds, segment, stats)
    out = []
    for ex, per_example in zip(examples, samples):
        attempts = []
        for sample in per_example:
            text = _decode(tokenizer, sample.token_ids)
            verdict = _verify(task, ex, text, stats) or UNSCORABLE
            attempts.append(Attempt(sample, text, verdict))
        out.append(attempts)
    return out


def _retry_text(prompts_cfg: Mapping, reflection_mode: str, reason: str) -> str:
    if reflection_mode != "none":
        return prompt_text(prompts_cfg, "retry")
    # the no-reflection control hears what the reflection arm heard (reason included) and retries at once
    text = prompt_text(prompts_cfg, "retry_no_reflection")
    if prompts_cfg.get("feedback_with_reason", False):
        text += prompt_text(prompts_cfg, "feedback_reason", reason=reason)
    return text


def reflect_retry(engine: Engine, tokenizer, task, examples: Sequence[Example], attempts1: Sequence[Sample],
                  prompts_cfg: Mapping, sampling: Mapping[str, SamplingParams], group_size: int, seed: int,
                  step: int, reflection_mode: str = "model", verdicts1: Sequence[Verdict] | None = None,
                  stats: RolloutStats | None = None) -> list[list[Episode]]:
    """For each (example, failed attempt 1): G reflections from one shared prefix, one retry per
    reflection, reward = 1/0 from the verifier (None when unscorable). Returns G episodes per example.

    reflection_mode: "model" (sampled reflections, the method), "generic" (prompts.generic_reflection
    as a fixed REFLECTION turn) or "none" (prompts.retry_no_reflection right after attempt 1) — the last
    two are evaluation controls. `verdicts1` (attempt-1 verdicts) are recomputed when not given.
    """
    return reflect_retry_modes(engine, tokenizer, task, examples, attempts1, prompts_cfg, sampling, group_size,
                               seed, step, (reflection_mode,), verdicts1, stats)[reflection_mode]


def reflect_retry_modes(engine: Engine, tokenizer, task, examples: Sequence[Example], attempts1: Sequence[Sample],
                        prompts_cfg: Mapping, sampling: Mapping[str, SamplingParams], group_size: int, seed: int,
                        step: int, reflection_modes: Sequence[str] = ("model",),
                        verdicts1: Sequence[Verdict] | None = None,
                        stats: RolloutStats | None = None) -> dict[str, list[list[Episode]]]:
    """`reflect_retry` for several reflection modes at once (evaluation: the method and its controls).

    The retries of every mode go to the engine in one call: decoding on CPU is bound by reading the
    weights once per step, so one loop over 3B rows costs far less than three loops over B. Each retry
    keeps its own seed, so the samples equal those of one call per mode.
    """
    if any(m not in REFLECTION_MODES for m in reflection_modes):
        raise UserError(f"unknown reflection mode in {list(reflection_modes)}; valid: {', '.join(REFLECTION_MODES)}")
    if len(attempts1) != len(examples) or (verdicts1 is not None and len(verdicts1) != len(examples)):
        raise ValueError("reflect_retry needs one attempt 1 (and verdict) per example")
    if group_size < 1:
        raise UserError(f"group_size must be >= 1, got {group_size}")
    stats = stats if stats is not None else RolloutStats()
    prompts = _prompt_ids_by_example(tokenizer, task, examples, prompts_cfg)
    if verdicts1 is None:
        verdicts1 = [_verify(task, ex, _decode(tokenizer, a.token_ids), stats)
                     or UNSCORABLE for ex, a in zip(examples, attempts1)]
    G = group_size

    # Reflect: one shared prefix per example, G reflections each (one engine call for the whole batch).
    reflections: dict[str, list[list[Sample | None]]] = {}
    retry_prefixes: dict[str, list[Tokens]] = {}
    for mode in reflection_modes:
        if mode == "none":
            prefixes = [attempt1_prefix(p, a1) for p, a1 in zip(prompts, attempts1)]
        else:
            prefixes = [reflection_prefix(p, a1, user_turn_delta(tokenizer, feedback_text(prompts_cfg, v1.reason)))
                        for p, a1, v1 in zip(prompts, attempts1, verdicts1)]
        reflections[mode] = _reflections(engine, tokenizer, examples, prefixes, prompts_cfg, sampling["reflection"],
                                         G, seed, step, mode, stats)
        retry_prefixes[mode] = []
        for prefix, a1, v1, group in zip(prefixes, attempts1, verdicts1, reflections[mode]):
            retry = user_turn_delta(tokenizer, _retry_text(prompts_cfg, mode, v1.reason))
            retry_prefixes[mode] += [retry_prefix(prefix, r, r if r is not None else a1, retry) for r in group]

    # Retry: one attempt 2 per reflection, every mode's B·G retries in one engine call.
    seeds = [[derive_seed(seed, step, ex.id, g, "attempt2")] for ex in examples for g in range(G)]
    flat = _generate(engine, [list(p.ids) for m in reflection_modes for p in retry_prefixes[m]], 1,
                     sampling["attempt2"], seeds * len(reflection_modes), "attempt2", stats)

    # Reward: verify each retry.
    out: dict[str, list[list[Episode]]] = {}
    for k, mode in enumerate(reflection_modes):
        attempts2 = flat[k * len(seeds):(k + 1) * len(seeds)]
        episodes = []
        for i, (ex, a1, v1) in enumerate(zip(examples, attempts1, verdicts1)):
            group = []
            for g in range(G):
                a2 = attempts2[i * G + g][0]
                text2 = _decode(tokenizer, a2.token_ids)
                v2 = _verify(task, ex, text2, stats)
                tokens = retry_prefixes[mode][i * G + g].sampled(a2, Segment.ATTEMPT2)
                ep = _episode(ex, i, g, tokens, {"attempt1": a1, "reflection": reflections[mode][i][g],
                                                 "attempt2": a2}, tokenizer, v1)
                ep.attempt2_correct = None if v2 is None else v2.correct
                ep.reward = None if v2 is None else float(v2.correct)
                ep.reasons["attempt2"] = UNSCORABLE.reason if v2 is None else v2.reason
                group.append(ep)
            episodes.append(group)
        out[mode] = episodes
    return out


def _reflections(engine: Engine, tokenizer, examples: Sequence[Example], prefixes: Sequence[Tokens],
                 prompts_cfg: Mapping, sampling: SamplingParams, G: int, seed: int, step: int,
                 reflection_mode: str, stats: RolloutStats) -> list[list[Sample | None]]:
    """G reflections per prefix: sampled ("model"), the fixed generic text ("generic"), or none."""
    if reflection_mode == "model":
        seeds = [[derive_seed(seed, step, ex.id, g, "reflection") for g in range(G)] for ex in examples]
        return _generate(engine, [list(p.ids) for p in prefixes], G, sampling, seeds, "reflection", stats)
    if reflection_mode == "generic":
        end_of_turn = user_turn_delta(tokenizer, prompt_text(prompts_cfg, "retry")).end_of_turn
        generic = template_sample(tokenizer, prompt_text(prompts_cfg, "generic_reflection"), end_of_turn)
        return [[generic] * G for _ in examples]
    return [[None] * G for _ in examples]


def _episode(ex: Example, group_index: int, sample_index: int, tokens: Tokens,
             samples: Mapping[str, Sample | None], tokenizer, verdict1: Verdict) -> Episode:
    """An episode with the per-segment truncation flags and texts of the segments it has; reward unset."""
    present = {name: s for name, s in samples.items() if s is not None}
    return Episode(example_id=ex.id, group_index=group_index, sample_index=sample_index,
                   token_ids=list(tokens.ids), segment_ids=list(tokens.segments),
                   sampler_logprobs=list(tokens.logprobs),
                   truncated={name: s.truncated for name, s in present.items()},
                   texts={name: _decode(tokenizer, s.token_ids) for name, s in present.items()},
                   attempt1_correct=verdict1.correct, reasons={"attempt1": verdict1.reason})


def rollout_online(engine: Engine, tokenizer, task, examples: Sequence[Example], prompts_cfg: Mapping,
                   sampling: Mapping[str, SamplingParams], group_size: int, seed: int, step: int,
                   reflection_mode: str = "model", stats: RolloutStats | None = None) -> list[list[Episode]]:
    """Online attempt 1: sample once per example and verify. A passing (or unscorable) attempt 1 ends the
    episode: the example gets a single episode with no retry (no reflection, no gradient). Failures go
    through `reflect_retry` and get exactly `group_size` episodes."""
    stats = stats if stats is not None else RolloutStats()
    attempts = [a[0] for a in sample_attempts(engine, tokenizer, task, examples, prompts_cfg,
                                              sampling["attempt1"], 1, seed, step, "attempt1", stats)]
    failed = [i for i, a in enumerate(attempts) if not a.verdict.correct and a.verdict != UNSCORABLE]
    groups = reflect_retry(engine, tokenizer, task, [examples[i] for i in failed],
                           [attempts[i].sample for i in failed], prompts_cfg, sampling, group_size, seed, step,
                           reflection_mode, [attempts[i].verdict for i in failed], stats) if failed else []
    by_index = dict(zip(failed, groups))
    out = []
    for i, (ex, a) in enumerate(zip(examples, attempts)):
        if i in by_index:
            for ep in by_index[i]:
                ep.group_index = i   # index in this batch, not in the failed subset
            out.append(by_index[i])
            continue
        tokens = attempt1_prefix(prompt_ids(tokenizer, task, ex, prompts_cfg), a.sample)
        out.append([_episode(ex, i, 0, tokens, {"attempt1": a.sample}, tokenizer, a.verdict)])
    return out
