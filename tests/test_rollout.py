"""The batched reflect-retry rollout against a scripted engine, a fake task and the real SmolLM2 tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fakes.episode import PROMPTS, SAMPLING, FakeEngine, FakeTask, example, qwen_style_tokenizer  # noqa: F401
from rrr.config import UserError
from rrr.engines.base import Sample, SamplingParams, derive_seed
from rrr.episode import Segment, render_ids, user_turn_delta
from rrr.rollout import (UNSCORABLE, RolloutStats, prompt_ids, reflect_retry, rollout_online, sample_attempts,
                         sampling_from_cfg)

CONF = Path(__file__).resolve().parents[1] / "conf"
SEED, STEP, G = 3, 5, 4


def scripts(attempt1=lambda i, j, p: f"I think {i + j}.",
            reflection=lambda i, j, p: f"Reflection {j}: I misread the numbers.",
            attempt2=lambda i, j, p: "ANSWER 7" if (i // G) % 2 == 0 else "ANSWER 0"):
    """Per segment, (prompt index, sample index, prompt) -> text. Retry prompts are example-major: i // G
    is the example, i % G the reflection."""
    return {"attempt1": attempt1, "reflection": reflection, "attempt2": attempt2}


def failed_attempt(tok, text: str = "I think 3.") -> Sample:
    ids = list(tok(text, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
    return Sample(token_ids=ids, logprobs=[-0.3] * len(ids))


def run_reflect_retry(tok, engine, n_examples=3, mode="model", prompts=PROMPTS, stats=None):
    examples = [example(i) for i in range(n_examples)]
    attempts = [failed_attempt(tok) for _ in examples]
    return examples, attempts, reflect_retry(engine, tok, FakeTask(), examples, attempts, prompts, SAMPLING,
                                             group_size=G, seed=SEED, step=STEP, reflection_mode=mode,
                                             stats=stats)


def test_sampling_from_cfg_reads_train_and_eval_defaults():
    train = sampling_from_cfg(OmegaConf.load(CONF / "train" / "default.yaml").sampling)
    assert set(train) == {"attempt1", "reflection", "attempt2"}
    assert train["reflection"] == SamplingParams(max_tokens=128, temperature=1.0, top_p=1.0)
    assert train["attempt2"].temperature == 0.7
    assert sampling_from_cfg(OmegaConf.load(CONF / "eval" / "default.yaml").sampling)["attempt1"].temperature == 0.7
    with pytest.raises(UserError, match="sampling.attempt2.max_tokens"):
        sampling_from_cfg({"attempt1": {"max_tokens": 8}, "reflection": {"max_tokens": 8}})


def test_prompt_ids_are_the_chat_template_with_generation_prompt(smol_tokenizer):
    task, ex = FakeTask(), example(1)
    ids = prompt_ids(smol_tokenizer, task, ex, PROMPTS)
    assert ids == render_ids(smol_tokenizer, task.messages(ex, PROMPTS), add_generation_prompt=True)
    assert smol_tokenizer.decode(ids).endswith("Solve 1.<|im_end|>\n<|im_start|>assistant\n")


def test_sample_attempts_n_per_example_with_derived_seeds_and_verdicts(smol_tokenizer):
    engine = FakeEngine(smol_tokenizer, scripts(attempt1=lambda i, j, p: "ANSWER 7" if j == 1 else "CRASH"))
    examples, stats = [example(0), example(1)], RolloutStats()
    out = sample_attempts(engine, smol_tokenizer, FakeTask(), examples, PROMPTS, SAMPLING["attempt1"], n=3,
                          seed=SEED, step=STEP, stats=stats)
    assert [len(a) for a in out] == [3, 3] and len(engine.calls) == 1
    call = engine.calls[0]
    assert call["n"] == 3 and call["sampling"] == SAMPLING["attempt1"]
    assert call["seeds"] == [[derive_seed(SEED, STEP, ex.id, j, "attempt1") for j in range(3)] for ex in examples]
    assert [a.verdict.correct for a in out[0]] == [False, True, False]
    assert out[0][0].verdict == UNSCORABLE and stats.unscorable == 4
    assert out[1][1].text == "ANSWER 7"


def test_reflect_retry_groups_have_exactly_G_episodes_from_two_batched_calls(smol_tokenizer):
    engine = FakeEngine(smol_tokenizer, scripts())
    examples, attempts, groups = run_reflect_retry(smol_tokenizer, engine)
    assert [len(g) for g in groups] == [G] * 3
    assert [c["segment"] for c in engine.calls] == ["reflection", "attempt2"]
    refl_call, retry_call = engine.calls
    assert refl_call["n"] == G and len(refl_call["prompts"]) == 3            # one shared prefix per example
    assert retry_call["n"] == 1 and len(retry_call["prompts"]) == 3 * G      # one retry per reflection
    assert refl_call["sampling"] == SAMPLING["reflection"] and retry_call["sampling"] == SAMPLING["attempt2"]
    for i, group in enumerate(groups):
        assert {(e.example_id, e.group_index) for e in group} == {(examples[i].id, i)}
        assert [e.sample_index for e in group] == list(range(G))
        assert [e.reward for e in group] == [1.0 if i % 2 == 0 else 0.0] * G
        assert all(e.attempt1_correct is False and e.reasons["attempt1"] == "wrong answer" for e in group)


def test_reflection_prefix_is_the_chat_template_of_the_conversation_so_far(smol_tokenizer):
    engine = FakeEngine(smol_tokenizer, scripts())
    examples, attempts, groups = run_reflect_retry(smol_tokenizer, engine, n_examples=1)
    msgs = [*FakeTask().messages(examples[0], PROMPTS), {"role": "assistant", "content": "I think 3."},
            {"role": "user", "content": PROMPTS["feedback"]}]
    assert engine.calls[0]["prompts"][0] == render_ids(smol_tokenizer, msgs, add_generation_prompt=True)
    msgs += [{"role": "assistant", "content": "Reflection 2: I misread the numbers."},
             {"role": "user", "content": PROMPTS["retry"]}]
    assert engine.calls[1]["prompts"][2] == render_ids(smol_tokenizer, msgs, add_generation_prompt=True)


def test_seeds_are_derived_and_distinct_per_example_sample_and_segment(smol_tokenizer):
    engine = FakeEngine(smol_tokenizer, scripts())
    examples, _, _ = run_reflect_retry(smol_tokenizer, engine)
    refl_seeds, retry_seeds = engine.calls[0]["seeds"], engine.calls[1]["seeds"]
    assert refl_seeds == [[derive_seed(SEED, STEP, ex.id, g, "reflection") for g in range(G)] for ex in examples]
    assert retry_seeds == [[derive_seed(SEED, STEP, ex.id, g, "attempt2")] for ex in examples for g in range(G)]
    flat = [s for row in refl_seeds + retry_seeds for s in row]
    assert len(set(flat)) == len(flat) == 2 * 3 * G


def test_episodes_hold_the_sampled_ids_verbatim_with_their_segments(smol_tokenizer):
    engine = FakeEngine(smol_tokenizer, scripts())
    examples, attempts, groups = run_reflect_retry(smol_tokenizer, engine)
    outputs = [[engine._sample(engine.scripts[c["segment"]](i, j, p), c["sampling"]) for i, p in
                enumerate(c["prompts"]) for j in range(c["n"])] for c in engine.calls]
    for i, group in enumerate(groups):
        for g, ep in enumerate(group):
            by_seg = {s: [t for t, x in zip(ep.token_ids, ep.segment_ids) if x == s] for s in Segment}
            assert by_seg[Segment.ATTEMPT1] == attempts[i].token_ids
            assert by_seg[Segment.REFLECTION] == outputs[0][i * G + g].token_ids
            assert by_seg[Segment.ATTEMPT2] == outputs[1][i * G + g].token_ids
            assert ep.token_ids[: len(engine.calls[1]["prompts"][i * G + g])] == engine.calls[1]["prompts"][i * G + g]
            refl_lp = [p for p, x in zip(ep.sampler_logprobs, ep.segment_ids) if x == Segment.REFLECTION]
            assert refl_lp == outputs[0][i * G + g].logprobs
            assert ep.reflection_length == len(outputs[0][i * G + g].token_ids)
            assert ep.texts["reflection"] == f"Reflection {g}: I misread the numbers."


def test_truncation_is_recorded_per_segment_and_the_turn_closed(smol_tokenizer):
    long = " ".join(["word"] * 60)   # over the 41-token reflection budget
    engine = FakeEngine(smol_tokenizer, scripts(reflection=lambda i, j, p: long if j == 0 else "short"))
    _, _, groups = run_reflect_retry(smol_tokenizer, engine, n_examples=1)
    cut, whole = groups[0][0], groups[0][1]
    assert cut.truncated == {"attempt1": False, "reflection": True, "attempt2": False}
    assert whole.truncated["reflection"] is False
    assert cut.reflection_length == SAMPLING["reflection"].max_tokens
    first_retry = cut.segment_ids.index(Segment.RETRY_PROMPT)
    assert cut.token_ids[first_retry] == smol_tokenizer.eos_token_id          # closed in RETRY_PROMPT
    assert cut.token_ids[first_retry - 1] != smol_tokenizer.eos_token_id      # not inside the reflection


def test_unscorable_retry_gets_reward_none_never_zero(smol_tokenizer):
    engine = FakeEngine(smol_tokenizer, scripts(attempt2=lambda i, j, p: "CRASH" if i % G == 0 else "ANSWER 1"))
    stats = RolloutStats()
    _, _, groups = run_reflect_retry(smol_tokenizer, engine, n_examples=2, stats=stats)
    assert [e.reward for e in groups[0]] == [None, 0.0, 0.0, 0.0]
    assert groups[0][0].attempt2_correct is None and groups[0][0].reasons["attempt2"] == UNSCORABLE.reason
    assert stats.unscorable == 2


def test_feedback_with_reason_puts_the_attempt1_reason_in_the_feedback_turn(smol_tokenizer):
    engine = FakeEngine(smol_tokenizer, scripts())
    run_reflect_retry(smol_tokenizer, engine, n_examples=1, prompts={**PROMPTS, "feedback_with_reason": True})
    assert "The checker said: wrong answer.<|im_end|>" in smol_tokenizer.decode(engine.calls[0]["prompts"][0])


def test_generic_mode_uses_the_fixed_reflection_as_template_tokens(smol_tokenizer):
    engine = FakeEngine(smol_tokenizer, scripts())
    _, _, groups = run_reflect_retry(smol_tokenizer, engine, n_examples=2, mode="generic")
    assert [c["segment"] for c in engine.calls] == ["attempt2"] and [len(g) for g in groups] == [G, G]
    ep = groups[1][0]
    refl = [t for t, s in zip(ep.token_ids, ep.segment_ids) if s == Segment.REFLECTION]
    assert smol_tokenizer.decode(refl) == PROMPTS["generic_reflection"] + "<|im_end|>"
    assert {p for p, s in zip(ep.sampler_logprobs, ep.segment_ids) if s == Segment.REFLECTION} == {0.0}
    assert engine.calls[0]["seeds"][0] != engine.calls[0]["seeds"][1]   # G retries, distinct seeds


def test_none_mode_retries_right_after_attempt1(smol_tokenizer):
    engine = FakeEngine(smol_tokenizer, scripts())
    _, attempts, groups = run_reflect_retry(smol_tokenizer, engine, n_examples=1, mode="none")
    assert [c["segment"] for c in engine.calls] == ["attempt2"]
    ep = groups[0][0]
    assert Segment.REFLECTION not in ep.segment_ids and Segment.FEEDBACK not in ep.segment_ids
    retry = [t for t, s in zip(ep.token_ids, ep.segment_ids) if s == Segment.RETRY_PROMPT]
    assert retry == list(user_turn_delta(smol_tokenizer, PROMPTS["retry_no_reflection"]).ids)
    assert "reflection" not in ep.truncated and ep.has_retry


def test_unknown_reflection_mode_is_a_user_error(smol_tokenizer):
    with pytest.raises(UserError, match="reflection mode"):
        run_reflect_retry(smol_tokenizer, FakeEngine(smol_tokenizer, scripts()), mode="sometimes")


def test_engine_returning_wrong_cardinality_fails_loudly(smol_tokenizer):
    class ShortEngine(FakeEngine):
        def generate(self, prompts, n, sampling, seeds=None):
            return [group[:-1] for group in super().generate(prompts, n, sampling, seeds)]

    with pytest.raises(RuntimeError, match="samples for"):
        run_reflect_retry(smol_tokenizer, ShortEngine(smol_tokenizer, scripts()))


def test_online_mode_stops_on_a_passing_attempt1(smol_tokenizer):
    # example 1 passes at attempt 1; examples 0 and 2 fail and get reflect-retry groups
    engine = FakeEngine(smol_tokenizer, scripts(attempt1=lambda i, j, p: "ANSWER 7" if i == 1 else "ANSWER 3"))
    examples, stats = [example(i) for i in range(3)], RolloutStats()
    out = rollout_online(engine, smol_tokenizer, FakeTask(), examples, PROMPTS, SAMPLING, group_size=G,
                         seed=SEED, step=STEP, stats=stats)
    assert [c["segment"] for c in engine.calls] == ["attempt1", "reflection", "attempt2"]
    assert engine.calls[0]["seeds"] == [[derive_seed(SEED, STEP, ex.id, 0, "attempt1")] for ex in examples]
    assert len(engine.calls[1]["prompts"]) == 2 and len(engine.calls[2]["prompts"]) == 2 * G
    assert [len(g) for g in out] == [G, 1, G]
    passed = out[1][0]
    assert passed.attempt1_correct and not passed.has_retry and passed.reward is None
    assert set(passed.segment_ids) == {Segment.PROMPT, Segment.ATTEMPT1}
    assert all(e.group_index == 2 and e.has_retry and not e.attempt1_correct for e in out[2])
    assert stats.samples == {"attempt1": 3, "reflection": 2 * G, "attempt2": 2 * G}
    assert stats.generated_tokens["attempt1"] == sum(len(s) for s in [
        engine._sample(t, SAMPLING["attempt1"]).token_ids for t in ("ANSWER 3", "ANSWER 7", "ANSWER 3")])
    assert stats.tokens_per_second > 0


def test_assembled_rollout_matches_the_qwen_style_template(qwen_style_tokenizer):
    tok = qwen_style_tokenizer
    engine = FakeEngine(tok, scripts())
    examples, _, groups = run_reflect_retry(tok, engine, n_examples=1)
    ep = groups[0][3]
    msgs = [*FakeTask().messages(examples[0], PROMPTS), {"role": "assistant", "content": "I think 3."},
            {"role": "user", "content": PROMPTS["feedback"]},
            {"role": "assistant", "content": "Reflection 3: I misread the numbers."},
            {"role": "user", "content": PROMPTS["retry"]}, {"role": "assistant", "content": "ANSWER 7"}]
    expected = render_ids(tok, msgs, add_generation_prompt=False)
    # the template closes the last turn with `<|im_end|>\n`; the episode ends at the sampled `<|im_end|>`
    assert ep.token_ids == expected[:-1] and tok.decode(expected[-1:]) == "\n"


def test_several_modes_share_one_retry_call_and_equal_one_call_per_mode(smol_tokenizer):
    from rrr.rollout import reflect_retry_modes

    engine = FakeEngine(smol_tokenizer, scripts())
    examples = [example(i) for i in range(2)]
    attempts = [failed_attempt(smol_tokenizer) for _ in examples]
    modes = ("model", "none", "generic")
    together = reflect_retry_modes(engine, smol_tokenizer, FakeTask(), examples, attempts, PROMPTS, SAMPLING,
                                   group_size=G, seed=SEED, step=STEP, reflection_modes=modes)
    retry_calls = [c for c in engine.calls if c["sampling"] == SAMPLING["attempt2"]]
    assert len(engine.calls) == 2 and len(retry_calls) == 1               # one reflection call, one retry call
    assert len(retry_calls[0]["seeds"]) == len(modes) * len(examples) * G
    for mode in modes:
        alone = reflect_retry(FakeEngine(smol_tokenizer, scripts()), smol_tokenizer, FakeTask(), examples,
                              attempts, PROMPTS, SAMPLING, group_size=G, seed=SEED, step=STEP, reflection_mode=mode)
        assert [[(e.token_ids, e.segment_ids, e.reward) for e in g] for g in together[mode]] == \
               [[(e.token_ids, e.segment_ids, e.reward) for e in g] for g in alone]
