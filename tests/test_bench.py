"""The benchmark's own logic: the R3 `rollout_func` it hands TRL (cardinality, prompts, env_mask,
reward), its arguments, medians and the target table. TRL itself is not needed (not in rrr's deps)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench import common, run, trl_grpo, workload
from rrr.config import compose
from rrr.episode import Segment
from rrr.rollout import sampling_from_cfg
from rrr.tasks import get_task

G = 3


@pytest.fixture
def r3(smol_tokenizer, monkeypatch):
    """make_r3_rollout over 2 Countdown queries with a scripted `generate`: even reflections end their
    turn, odd ones are cut at max_tokens; the retry of query 0 is its witness (correct)."""
    tok = smol_tokenizer
    cfg = compose(["model=smollm2-135m", "task=countdown"])
    task = get_task("countdown")
    examples = task.load(cfg.task, "train", 2, 0)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    wrong = tok("<answer>1 + 2</answer>", add_special_tokens=False)["input_ids"] + [eot]
    stored = [{"token_ids": [wrong, wrong[:-1]], "truncated": [False, True], "reasons": ["wrong", "no_answer"]}
              for _ in examples]
    calls = []
    witness = tok(f"<answer>{examples[0].fields['witness']}</answer>", add_special_tokens=False)["input_ids"] + [eot]

    def fake_generate(model, tokenizer, prompts, n, max_new_tokens, temperature, top_p=1.0):
        calls.append((len(prompts), n, max_new_tokens, temperature))
        if n == G:                                                           # reflections
            return [[[100 + g, 101, eot] if g % 2 == 0 else [200 + g, 201, 202] for g in range(n)] for _ in prompts]
        return [[witness] if i < G else [[300, eot]] for i in range(len(prompts))]

    monkeypatch.setattr(trl_grpo, "hf_generate", fake_generate)
    counts = {"generated_tokens": 0}
    fn = trl_grpo.make_r3_rollout(cfg, tok, task, examples, stored, G, sampling_from_cfg(cfg.train.sampling), counts)
    prompts = [task.messages(ex, cfg.prompts) for ex in examples for _ in range(G)]   # RepeatSampler order
    return SimpleNamespace(fn=fn, cfg=cfg, tok=tok, task=task, examples=examples, stored=stored, calls=calls,
                           counts=counts, prompts=prompts, eot=eot, witness=witness)


def test_r3_rollout_returns_one_completion_per_prompt_with_reflection_env_mask(r3):
    out = r3.fn(r3.prompts, SimpleNamespace(model=None, state=SimpleNamespace(global_step=4)))
    assert r3.calls == [(2, G, 128, 1.0), (2 * G, 1, 256, 0.7)]       # one batched generate per stage
    assert set(out) == {"prompt_ids", "completion_ids", "logprobs", "env_mask", "retry_reward"}
    assert out["logprobs"] is None
    assert len(out["prompt_ids"]) == len(out["completion_ids"]) == len(out["env_mask"]) == 2 * G
    for row in range(2 * G):
        q, g = divmod(row, G)
        at = workload.attempt1(r3.cfg, r3.examples[q], r3.stored[q], 5)     # the attempt rrr train picks at step 5
        prefix = workload.reflection_prompts(r3.cfg, r3.tok, r3.task, [r3.examples[q]], [at])[0]
        assert out["prompt_ids"][row] == list(prefix.ids)
        reflection = [100 + g, 101, r3.eot] if g % 2 == 0 else [200 + g, 201, 202]
        retry = workload.retry_prompt(r3.cfg, r3.tok, prefix, reflection)
        retry_ids = out["completion_ids"][row][len(retry.ids) - len(prefix.ids):]
        assert out["completion_ids"][row] == list(retry.ids[len(prefix.ids):]) + retry_ids
        segments = retry.segments[len(prefix.ids):]
        expected_mask = [int(s == Segment.REFLECTION and g % 2 == 0) for s in segments] + [0] * len(retry_ids)
        assert out["env_mask"][row] == expected_mask                 # 1 on a finished reflection only
        assert len(out["env_mask"][row]) == len(out["completion_ids"][row])
    assert out["retry_reward"] == [1.0] * G + [0.0] * G            # verify(retry): the witness is correct
    witness = len(r3.witness)
    assert r3.counts["generated_tokens"] == 2 * G * 3 + G * witness + G * 2   # reflections + retries only


def test_r3_rollout_refuses_prompts_not_in_repeat_sampler_order(r3):
    shuffled = r3.prompts[1:] + r3.prompts[:1]
    with pytest.raises(AssertionError, match="RepeatSampler"):
        r3.fn(shuffled, SimpleNamespace(model=None, state=SimpleNamespace(global_step=0)))


def test_parse_args_keeps_types_and_rejects_unknown_keys():
    a = common.parse_args(["queries=3", "model=qwen2.5-coder-0.5b", "beta=0"])
    assert (a["queries"], a["model"], a["beta"]) == (3, "qwen2.5-coder-0.5b", 0.0)
    with pytest.raises(SystemExit, match="unknown key"):
        common.parse_args(["qeuries=3"])


def test_summarize_steps_drops_the_warmup_and_takes_medians():
    s = common.summarize_steps([{"step_s": 100.0}, {"step_s": 3.0}, {"step_s": 1.0}, {"step_s": 2.0}])
    assert s["median"]["step_s"] == 2.0 and s["measured_steps"] == 3 and s["warmup_steps"] == 1


def _part(**median):
    return {"median": median, "process_peak_rss_gb": 1.0}


def test_targets_are_ratios_of_medians_in_the_same_results():
    results = {"args": {**run.RUN_DEFAULTS}, "notes": [], "parts": {
        "rrr_train_hf": _part(tokens_per_s=10.0, step_s=5.0), "trl_r3": _part(tokens_per_s=4.0, step_s=9.0),
        "rollout_hf": {"results": {"engine=hf": _part(tokens_per_s=8.0), "raw generate": _part(tokens_per_s=10.0)}},
        "memory": {"process_peak_rss_gb": 2.5, "episodes": 8, "tokens": 512, "update_s": 3.0}}}
    got = {name: (value, goal(value) if value is not None else None) for name, value, goal in run.targets(results)}
    assert got["rrr train (hf) ÷ TRL-R3, generated tok/s ≥ 2"] == (2.5, True)
    assert got["engine=hf rollout ÷ raw generate ≥ 0.9"] == (0.8, False)
    assert got["peak RSS of a LoRA step ≤ 2.0 GB"] == (2.5, False)        # smollm2-135m: 2 GB
    assert got["rrr train (vllm) ÷ TRL-R3, generated tok/s ≥ 3"] == (None, None)
    table = run.markdown(results)
    assert "| rrr train, engine=hf | 5.0 | 10.00 | 2.50 |" in table
    assert "| engine=hf rollout ÷ raw generate ≥ 0.9 | 0.80 | no |" in table


def test_rrr_overrides_vllm_cpu_defaults_extra_args_and_that_given_keys_win(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    hf = common.rrr_overrides(dict(common.DEFAULTS, rrr_args="train.beta=0", vllm_args="engine.enforce_eager=true"))
    assert "train.beta=0" in hf and not any(kv.startswith("engine.enforce_eager") for kv in hf)  # vllm_args: vllm only
    vllm = compose(common.rrr_overrides(dict(common.DEFAULTS, engine="vllm", vllm_args="engine.enforce_eager=true")))
    assert vllm.engine.enforce_eager is True and vllm.engine.gpu_memory_utilization == 0.1   # vllm_args win
    assert compose(common.rrr_overrides(dict(common.DEFAULTS, engine="vllm"))).engine.enforce_eager is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert common.vllm_cpu_overrides(dict(common.DEFAULTS, engine="vllm")) == []


def test_vllm_cpu_env_binds_as_many_cores_as_threads_from_the_allowed_set(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(run.os, "sched_getaffinity", lambda pid: {3, 1, 5})
    assert run.vllm_cpu_env(2) == {"VLLM_CPU_OMP_THREADS_BIND": "1,3", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    assert run.vllm_cpu_env(2) == {}
