"""Scripted fakes for the collect-failures and evaluate pipelines: an engine that records what it was
asked (and can crash on a given call), a task whose verdicts are fixed per example and segment, and a
rollout with the real module's signatures built on them. Sample j of segment S of an example is correct
iff j < example.fields["solve"][S]."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from rrr.engines.base import Sample, derive_seed
from rrr.episode import Segment
from rrr.rollout import UNSCORABLE, RolloutStats
from rrr.tasks import Example
from rrr.verifiers import Verdict

REFLECTION_IDS = [50, 51, 52, 50, 51, 52, 9]   # 7 tokens: 5 3-grams, 4 of them distinct


class CrashingEngine(RuntimeError):
    pass


class FakeEngine:
    def __init__(self, crash_on_call: int | None = None):
        self.crash_on_call = crash_on_call
        self.prompts: list[list[int]] = []   # every prompt it was asked for, in order
        self.seeds: list[list[list[int]]] = []   # the seeds of each call
        self.calls = 0

    def generate(self, prompts, n, sampling, seeds=None):
        self.calls += 1
        if self.calls == self.crash_on_call:
            raise CrashingEngine(f"simulated crash on call {self.calls}")
        assert seeds is not None and len(seeds) == len(prompts) and all(len(s) == n for s in seeds)
        self.prompts.extend(prompts)
        self.seeds.append(seeds)
        return [[Sample(token_ids=[p[0], 100 + j], logprobs=[-0.1, -0.2],
                        finish_reason="length" if j == 1 else "stop") for j in range(n)] for p in prompts]

    def load_weights(self, model):
        pass


def make_examples(solve: list[dict[str, int]]) -> list[Example]:
    return [Example(id=f"q{i:03d}", task="countdown", source="fake", fields={"q": i, "solve": s})
            for i, s in enumerate(solve)]


class FakeTask:
    """Module-like: load / messages / verify."""

    def __init__(self, examples: list[Example]):
        self.examples = examples
        self.loaded: list[tuple[str, Any]] = []

    def load(self, task_cfg, split, limit, seed):
        self.loaded.append((split, limit))
        return self.examples[:limit] if limit else list(self.examples)

    def messages(self, example, prompts_cfg):
        return [{"role": "user", "content": str(example.fields["q"])}]

    def verify(self, example, completion: str) -> Verdict:
        segment, j = completion.rsplit(":", 1)
        ok = int(j) < example.fields["solve"].get(segment, 0)
        return Verdict(ok, "ok" if ok else f"wrong {segment}")


def prompt_ids(tokenizer, task, example, prompts_cfg) -> list[int]:
    return [1000 + int(example.fields["q"]), 7]


def sample_attempts(engine, tokenizer, task, examples, prompts_cfg, sampling, n, seed, step,
                    segment="attempt1", stats=None):
    seeds = [[derive_seed(seed, step, ex.id, j, segment) for j in range(n)] for ex in examples]
    outs = engine.generate([prompt_ids(tokenizer, task, ex, prompts_cfg) for ex in examples], n, sampling, seeds)
    stats.record(segment, outs, 0.5)
    return [[SimpleNamespace(sample=s, text=f"{segment}:{j}", verdict=task.verify(ex, f"{segment}:{j}"))
             for j, s in enumerate(samples)] for ex, samples in zip(examples, outs)]


def reflect_retry(engine, tokenizer, task, examples, attempts1, prompts_cfg, sampling, group_size, seed, step,
                  reflection_mode="model", verdicts1=None, stats=None):
    assert len(attempts1) == len(examples) and all(isinstance(a, Sample) for a in attempts1)
    assert verdicts1 is not None and not any(v.correct for v in verdicts1)
    prompts = [prompt_ids(tokenizer, task, ex, prompts_cfg) for ex in examples]
    seeds = [[derive_seed(seed, step, ex.id, g, "attempt2") for g in range(group_size)] for ex in examples]
    engine.generate(prompts, group_size, sampling["attempt2"], seeds)
    groups = []
    for ex, a1 in zip(examples, attempts1):
        reflection = REFLECTION_IDS if reflection_mode == "model" else []
        ids = [1, 2] + a1.token_ids + [3] + reflection + [4] + [60, 61]
        segs = ([Segment.PROMPT] * 2 + [Segment.ATTEMPT1] * len(a1.token_ids) + [Segment.FEEDBACK]
                + [Segment.REFLECTION] * len(reflection) + [Segment.RETRY_PROMPT] + [Segment.ATTEMPT2] * 2)
        group = []
        for g in range(group_size):            # retry g is correct iff g < solve["attempt2:<mode>"]
            text2 = f"attempt2:{reflection_mode}:{g}"
            verdict = task.verify(ex, text2)
            group.append(SimpleNamespace(
                example_id=ex.id, token_ids=ids, segment_ids=[int(s) for s in segs],
                texts={"attempt1": "a1", "reflection": "r " * len(reflection), "attempt2": text2},
                truncated={"reflection": ex.fields["q"] % 2 == 1, "attempt2": False},
                attempt1_correct=False, attempt2_correct=verdict.correct, reward=float(verdict.correct),
                reasons={"attempt2": verdict.reason}, reflection_length=len(reflection)))
        groups.append(group)
    return groups


def reflect_retry_modes(engine, tokenizer, task, examples, attempts1, prompts_cfg, sampling, group_size, seed, step,
                        reflection_modes=("model",), verdicts1=None, stats=None):
    return {m: reflect_retry(engine, tokenizer, task, examples, attempts1, prompts_cfg, sampling, group_size, seed,
                             step, m, verdicts1, stats) for m in reflection_modes}


fake_rollout = SimpleNamespace(prompt_ids=prompt_ids, sample_attempts=sample_attempts, reflect_retry=reflect_retry,
                               reflect_retry_modes=reflect_retry_modes,
                               RolloutStats=RolloutStats, UNSCORABLE=UNSCORABLE)
