"""Episode assembly: template deltas, segment ids, token-in/token-out, truncation, collate."""

from __future__ import annotations

import pytest

from fakes.episode import PROMPTS, qwen_style_tokenizer  # noqa: F401  (fixture)
from rrr.config import UserError
from rrr.engines.base import Sample
from rrr.episode import (Episode, Segment, Tokens, assemble, collate, feedback_text, prompt_text,
                         reflection_prefix, render_ids, retry_prefix, template_sample, user_turn_delta)

TEMPLATES = ["smol_tokenizer", "qwen_style_tokenizer"]
SYSTEM_USER = [{"role": "system", "content": "You solve small puzzles."},
               {"role": "user", "content": "Using 3, 5 and 7 make 22."}]
A1, REFL, A2 = "3 * 5 + 6 = 21", "I added wrongly: 3 * 5 = 15 and 15 + 7 = 22.", "3 * 5 + 7 = 22"


@pytest.fixture(params=TEMPLATES)
def tok(request):
    return request.getfixturevalue(request.param)


def encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def sampled(tok, text: str, eos: bool = True, logprob: float = -0.25) -> Sample:
    """What an engine returns for `text`: its ids (+ end of turn), or cut without eos when truncated."""
    ids = encode(tok, text) + ([tok.eos_token_id] if eos else [])
    return Sample(token_ids=ids, logprobs=[logprob] * len(ids), finish_reason="stop" if eos else "length")


def conversation(a1: str, refl: str | None, a2: str) -> list[dict]:
    msgs = [*SYSTEM_USER, {"role": "assistant", "content": a1}]
    if refl is not None:
        msgs += [{"role": "user", "content": PROMPTS["feedback"]}, {"role": "assistant", "content": refl}]
        msgs += [{"role": "user", "content": PROMPTS["retry"]}]
    else:
        msgs += [{"role": "user", "content": PROMPTS["retry_no_reflection"]}]
    return [*msgs, {"role": "assistant", "content": a2}]


def full_episode(tok, a1: Sample, refl: Sample, a2: Sample) -> Tokens:
    return assemble(render_ids(tok, SYSTEM_USER, True), a1, user_turn_delta(tok, PROMPTS["feedback"]), refl,
                    user_turn_delta(tok, PROMPTS["retry"]), a2)


def assert_matches_template(tok, ids: tuple[int, ...], messages: list[dict]) -> None:
    # Both templates render the LAST assistant turn like any other (`…<|im_end|>\n`). The episode ends
    # with the sampled `<|im_end|>`: the separator after it belongs to a next turn that does not exist.
    # So the episode is the template's ids minus that trailing separator.
    expected = render_ids(tok, messages, add_generation_prompt=False)
    assert list(ids) == expected[: len(ids)]
    assert expected[len(ids):] == encode(tok, "\n")


def test_user_turn_delta_is_separator_turn_and_generation_prompt(tok):
    delta = user_turn_delta(tok, "Try again.")
    assert delta.end_of_turn == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(list(delta.ids)) == "\n<|im_start|>user\nTry again.<|im_end|>\n<|im_start|>assistant\n"
    assert user_turn_delta(tok, "Try again.") is delta   # tokenized once per text


def test_qwen_style_template_differs_from_smol(smol_tokenizer, qwen_style_tokenizer):
    # guards the parametrisation: the two templates really differ (default system prompts)
    user_only = [{"role": "user", "content": "hi"}]
    smol = smol_tokenizer.apply_chat_template(user_only, tokenize=False)
    qwen = qwen_style_tokenizer.apply_chat_template(user_only, tokenize=False)
    assert "You are Qwen" in qwen and "You are Qwen" not in smol


def test_assembled_ids_equal_chat_template_of_the_conversation(tok):
    ep = full_episode(tok, sampled(tok, A1), sampled(tok, REFL), sampled(tok, A2))
    assert_matches_template(tok, ep.ids, conversation(A1, REFL, A2))


def test_prefixes_equal_chat_template_with_generation_prompt(tok):
    a1, refl = sampled(tok, A1), sampled(tok, REFL)
    prefix = reflection_prefix(render_ids(tok, SYSTEM_USER, True), a1, user_turn_delta(tok, PROMPTS["feedback"]))
    msgs = conversation(A1, REFL, A2)
    assert list(prefix.ids) == render_ids(tok, msgs[:4], add_generation_prompt=True)
    retry = retry_prefix(prefix, refl, refl, user_turn_delta(tok, PROMPTS["retry"]))
    assert list(retry.ids) == render_ids(tok, msgs[:6], add_generation_prompt=True)


def test_no_reflection_and_generic_reflection_match_the_template(tok):
    a1, a2 = sampled(tok, A1), sampled(tok, A2)
    none = assemble(render_ids(tok, SYSTEM_USER, True), a1, None, None,
                    user_turn_delta(tok, PROMPTS["retry_no_reflection"]), a2)
    assert_matches_template(tok, none.ids, conversation(A1, None, A2))
    assert Segment.REFLECTION not in none.segments and Segment.FEEDBACK not in none.segments

    generic = template_sample(tok, PROMPTS["generic_reflection"], tok.eos_token_id)
    ep = full_episode(tok, a1, generic, a2)
    assert_matches_template(tok, ep.ids, conversation(A1, PROMPTS["generic_reflection"], A2))
    assert all(lp == 0.0 for lp, s in zip(ep.logprobs, ep.segments) if s == Segment.REFLECTION)


def test_segments_are_contiguous_and_sampled_ids_appear_verbatim(smol_tokenizer):
    tok = smol_tokenizer
    a1, refl, a2 = sampled(tok, A1, logprob=-1.0), sampled(tok, REFL, logprob=-2.0), sampled(tok, A2, logprob=-3.0)
    ep = full_episode(tok, a1, refl, a2)
    order = [s for i, s in enumerate(ep.segments) if i == 0 or ep.segments[i - 1] != s]
    assert order == [Segment.PROMPT, Segment.ATTEMPT1, Segment.FEEDBACK, Segment.REFLECTION,
                     Segment.RETRY_PROMPT, Segment.ATTEMPT2]
    for sample, seg, lp in ((a1, Segment.ATTEMPT1, -1.0), (refl, Segment.REFLECTION, -2.0),
                            (a2, Segment.ATTEMPT2, -3.0)):
        assert [t for t, s in zip(ep.ids, ep.segments) if s == seg] == sample.token_ids
        assert {p for p, s in zip(ep.logprobs, ep.segments) if s == seg} == {lp}
    template = [p for p, s in zip(ep.logprobs, ep.segments) if s in (Segment.PROMPT, Segment.FEEDBACK,
                                                                       Segment.RETRY_PROMPT)]
    assert set(template) == {0.0}
    assert len(ep.ids) == len(ep.segments) == len(ep.logprobs)


def test_sampled_ids_are_never_retokenized(smol_tokenizer):
    # "Hello" as two odd pieces: decoding and re-encoding would merge them; the episode must not.
    tok = smol_tokenizer
    pieces = encode(tok, "Hel") + encode(tok, "lo") + [tok.eos_token_id]
    assert encode(tok, "Hello") != pieces[:-1]
    odd = Sample(token_ids=pieces, logprobs=[-0.1] * len(pieces))
    ep = full_episode(tok, sampled(tok, A1), odd, sampled(tok, A2))
    assert [t for t, s in zip(ep.ids, ep.segments) if s == Segment.REFLECTION] == pieces


@pytest.mark.parametrize("truncated", ["attempt1", "reflection"])
def test_truncated_turn_is_closed_in_the_next_template_segment(tok, truncated):
    a1 = sampled(tok, A1, eos=truncated != "attempt1")
    refl = sampled(tok, REFL, eos=truncated != "reflection")
    ep = full_episode(tok, a1, refl, sampled(tok, A2))
    cut, closing = (a1, Segment.FEEDBACK) if truncated == "attempt1" else (refl, Segment.RETRY_PROMPT)
    seg_of_cut = Segment.ATTEMPT1 if truncated == "attempt1" else Segment.REFLECTION
    assert [t for t, s in zip(ep.ids, ep.segments) if s == seg_of_cut] == cut.token_ids   # no eos added there
    first_closing = ep.segments.index(closing)
    assert ep.ids[first_closing] == tok.eos_token_id
    # the closed turn renders like the template's (the cut text round-trips here)
    assert_matches_template(tok, ep.ids, conversation(A1, REFL, A2))


def test_logprob_count_mismatch_is_an_error(smol_tokenizer):
    bad = Sample(token_ids=[5, 6, 2], logprobs=[-0.1])
    with pytest.raises(ValueError, match="REFLECTION"):
        full_episode(smol_tokenizer, sampled(smol_tokenizer, A1), bad, sampled(smol_tokenizer, A2))


def test_stored_attempt_without_logprobs_gets_zeros(smol_tokenizer):
    a1 = Sample(token_ids=encode(smol_tokenizer, A1) + [smol_tokenizer.eos_token_id])
    ep = full_episode(smol_tokenizer, a1, sampled(smol_tokenizer, REFL), sampled(smol_tokenizer, A2))
    assert {p for p, s in zip(ep.logprobs, ep.segments) if s == Segment.ATTEMPT1} == {0.0}


def test_feedback_and_reflection_go_together(smol_tokenizer):
    tok = smol_tokenizer
    with pytest.raises(ValueError):
        assemble(render_ids(tok, SYSTEM_USER, True), sampled(tok, A1), None, sampled(tok, REFL),
                 user_turn_delta(tok, "Try again."), sampled(tok, A2))


def test_feedback_text_adds_the_reason_only_when_asked():
    assert feedback_text(PROMPTS, "used 4 twice") == PROMPTS["feedback"]
    with_reason = feedback_text({**PROMPTS, "feedback_with_reason": True}, "used {4} twice")
    assert with_reason == PROMPTS["feedback"] + " The checker said: used {4} twice."


def test_prompt_texts_are_format_templates():
    assert prompt_text({"retry": 'Reply [{{"name": "f"}}].'}, "retry") == 'Reply [{"name": "f"}].'
    with pytest.raises(UserError, match="prompts.retry"):
        prompt_text({"retry": "Reply {name}."}, "retry")


def episode(ids: list[int], segs: list[Segment], truncated_reflection: bool = False) -> Episode:
    return Episode(example_id="e", group_index=0, sample_index=0, token_ids=ids, segment_ids=[int(s) for s in segs],
                   sampler_logprobs=[-0.5 if s == Segment.REFLECTION else 0.0 for s in segs],
                   truncated={"attempt1": False, "reflection": truncated_reflection, "attempt2": False})


def test_reflection_length_and_has_retry():
    S = Segment
    ep = episode([1, 2, 3, 4, 5, 6, 7], [S.PROMPT, S.ATTEMPT1, S.FEEDBACK, S.REFLECTION, S.REFLECTION,
                                         S.RETRY_PROMPT, S.ATTEMPT2])
    assert ep.reflection_length == 2 and ep.has_retry
    first_only = Episode("e", 0, 0, [1, 2], [S.PROMPT, S.ATTEMPT1], [0.0, 0.0], truncated={"attempt1": False})
    assert first_only.reflection_length == 0 and not first_only.has_retry


def test_collate_pads_right_and_takes_attention_from_segments_not_pad_id():
    S, eos = Segment, 2   # pad id == eos id, as for SmolLM2
    long = episode([9, 8, 7, 5, 5, 6, eos], [S.PROMPT, S.ATTEMPT1, S.FEEDBACK, S.REFLECTION, S.REFLECTION,
                                             S.RETRY_PROMPT, S.ATTEMPT2])
    short = episode([9, eos, 4, eos, 3], [S.PROMPT, S.ATTEMPT1, S.FEEDBACK, S.REFLECTION, S.ATTEMPT2],
                    truncated_reflection=True)
    batch = collate([long, short], pad_id=eos)
    assert batch["input_ids"].shape == (2, 7)
    assert batch["input_ids"][1].tolist() == [9, eos, 4, eos, 3, eos, eos]
    assert batch["segment_ids"][1].tolist()[5:] == [S.PAD, S.PAD]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 5 + [0, 0]]   # real eos tokens attended
    assert batch["old_logprobs"][0].tolist() == [0, 0, 0, -0.5, -0.5, 0, 0]
    assert batch["reflection_truncated"].tolist() == [False, True]
