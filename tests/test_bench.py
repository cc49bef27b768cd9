"""The benchmark's own logic: the R3 `rollout_func` it hands TRL (cardinality, prompts, env_mask,
reward; the lean completion = the reflection), its arguments, medians, the equal-work bookkeeping
(order, spread, per-step ratios: fake timings, never real ones), the JSON it writes and the target table.
TRL itself is not needed (not in rrr's deps)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import json
import sys

from bench import common, equal_work, rrr_train, run, trl_grpo, workload
from rrr.config import compose
from rrr.episode import Segment
from rrr.rollout import sampling_from_cfg
from rrr.tasks import get_task

G = 3


@pytest.fixture
def r3(smol_tokenizer, monkeypatch, request):
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
    counts = trl_grpo.new_counts()
    fn = trl_grpo.make_r3_rollout(cfg, tok, task, examples, stored, G, sampling_from_cfg(cfg.train.sampling), counts,
                                  lean=getattr(request, "param", False))
    prompts = [task.messages(ex, cfg.prompts) for ex in examples for _ in range(G)]   # RepeatSampler order
    return SimpleNamespace(fn=fn, cfg=cfg, tok=tok, task=task, examples=examples, stored=stored, calls=calls,
                           counts=counts, prompts=prompts, eot=eot, witness=witness)


def reflection_of(g: int, eot: int) -> list[int]:
    """The scripted reflection g of a group: even ones end their turn, odd ones are cut at max_tokens."""
    return [100 + g, 101, eot] if g % 2 == 0 else [200 + g, 201, 202]


@pytest.mark.parametrize("r3", [True], indirect=True, ids=["lean"])
def test_lean_r3_rollout_completes_with_the_reflection_alone_and_carries_the_retry_reward(r3):
    out = r3.fn(r3.prompts, SimpleNamespace(model=None, state=SimpleNamespace(global_step=4)))
    for row in range(2 * G):
        q, g = divmod(row, G)
        at = workload.attempt1(r3.cfg, r3.examples[q], r3.stored[q], 5)
        prefix = workload.reflection_prompts(r3.cfg, r3.tok, r3.task, [r3.examples[q]], [at])[0]
        assert out["prompt_ids"][row] == list(prefix.ids)
        assert out["completion_ids"][row] == reflection_of(g, r3.eot)          # no retry prompt, no retry
        assert out["env_mask"][row] == [int(g % 2 == 0)] * 3                   # 0 on a truncated reflection
    assert out["retry_reward"] == [1.0] * G + [0.0] * G                       # the retry's verdict, as extra key
    assert r3.counts["generated_tokens"] == 2 * G * 3 + G * len(r3.witness) + G * 2   # retries still sampled
    assert r3.counts["reflections"] == 2 * G and r3.counts["truncated_reflections"] == 2 * (G // 2)
    retry = workload.retry_prompt(r3.cfg, r3.tok, prefix, reflection_of(G - 1, r3.eot))
    assert r3.counts["update_len_max"] == len(prefix.ids) + 3                  # prompt + reflection
    assert r3.counts["seq_len_max"] >= len(retry.ids) + 2                      # the whole episode


def test_r3_rollout_returns_one_completion_per_prompt_with_reflection_env_mask(r3):
    """The full variant (mode=r3_full): completion = reflection · retry prompt · retry."""
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
        reflection = reflection_of(g, r3.eot)
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


def fake_result(step_s: list[float], side: str = "x", warmup: int = 1, **workload) -> dict:
    """A worker result as bench.common.summarize_steps returns it, from fake step times (no clock)."""
    args = {**run.task_args(run.RUN_DEFAULTS, set(), "countdown"), "failures": "f", **workload}
    steps = [{"step_s": t, "sampled_tokens": 100.0, "tokens_per_s": 100.0 / t, "generation_s": t * 0.4,
              "update_s": t * 0.5, "truncated_reflection_share": 0.25, "seq_len_max": 300 + i}
             for i, t in enumerate(step_s)]
    return {"system": side, "args": args, **common.summarize_steps(steps, warmup)}


def test_rollout_and_memory_targets_are_ratios_of_medians_in_the_same_results():
    results = {"args": run.task_args(run.RUN_DEFAULTS, set(), "countdown"), "notes": [], "parts": {
        "rollout_hf": {"results": {"engine=hf": _part(tokens_per_s=8.0), "raw generate": _part(tokens_per_s=10.0)}},
        "memory": {"process_peak_rss_gb": 2.5, "episodes": 8, "tokens": 512, "update_s": 3.0}}}
    got = {name: (value, goal(value) if value is not None else None) for name, value, goal in run.targets(results)}
    assert got["engine=hf rollout ÷ raw generate ≥ 0.9"] == (0.8, False)
    assert got["peak RSS of a LoRA step ≤ 2.0 GB"] == (2.5, False)        # smollm2-135m: 2 GB
    assert got["rrr train (vllm) ÷ TRL-R3, per step at equal work ≥ 3"] == (None, None)
    table = run.markdown(results)
    assert "| engine=hf rollout ÷ raw generate ≥ 0.9 | 0.80 | no |" in table
    assert "| engine=hf | – | 8.00 | 0.80 | 1.00 |" in table


def test_schedule_alternates_the_order_of_the_sides_each_round():
    assert equal_work.schedule(["a", "b", "c"], 2) == [(0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a")]
    assert equal_work.schedule(["a", "b"], 3)[4:] == [(2, "a"), (2, "b")]


def test_run_rounds_calls_the_sides_in_schedule_order_then_the_once_sides():
    calls = []
    runs = equal_work.run_rounds(["rrr", "trl"], 2, lambda side, r: calls.append((side, r)) or {"side": side, "r": r},
                                 once=["old"])
    assert calls == [("rrr", 0), ("trl", 0), ("trl", 1), ("rrr", 1), ("old", 0)]
    assert [x["r"] for x in runs["rrr"]] == [0, 1] and len(runs["old"]) == 1


def test_summary_pools_timed_steps_reports_the_spread_and_divides_per_step_seconds():
    runs = {"rrr_hf": [fake_result([99.0, 10.0, 12.0, 11.0]), fake_result([99.0, 13.0, 14.0, 15.0])],
            "trl_r3": [fake_result([99.0, 30.0, 30.0, 30.0]), fake_result([99.0, 36.0, 36.0, 36.0])]}
    s = equal_work.summarize(runs)
    assert s["rrr_hf"]["step_s"] == 12.5                          # median of 10, 11, 12, 13, 14, 15 (warm-up out)
    assert s["rrr_hf"]["run_step_s"] == [11.0, 14.0]
    assert s["rrr_hf"]["spread"] == pytest.approx(3 / 12.5)
    assert s["rrr_hf"]["timed_steps"] == 6 and s["rrr_hf"]["runs"] == 2
    assert s["trl_r3"]["step_s"] == 33.0 and s["trl_r3"]["per_step_x"] == 1.0
    assert s["rrr_hf"]["per_step_x"] == pytest.approx(33.0 / 12.5)          # TRL's s/step ÷ rrr's, not tok/s
    assert s["rrr_hf"]["seq_len_max"] == 303 and s["rrr_hf"]["truncated_reflection_share"] == 0.25
    assert s["rrr_hf"]["update_s"] == pytest.approx(0.5 * 12.5)
    table = equal_work.table([("countdown", "rrr", s["rrr_hf"]), ("countdown", "TRL", s["trl_r3"])])
    assert "| countdown | rrr | 12.5 | 11.0 / 14.0 (24%) | 2.64 | 100 | " in table
    assert "| 25% | 5.0 | 6.2 | 303 |" in table


def test_unequal_work_is_refused():
    runs = {"rrr_hf": [fake_result([1.0, 1.0], queries=2)], "trl_r3": [fake_result([1.0, 1.0], queries=4)]}
    with pytest.raises(SystemExit, match="not equal work: rrr_hf and trl_r3 differ in queries"):
        equal_work.check_equal_work(runs)
    equal_work.check_equal_work({"rrr_hf": runs["rrr_hf"], "trl_r3": [fake_result([5.0, 5.0], queries=2)]})


def test_timer_accumulates_phases_from_its_clock():
    ticks = iter([0.0, 2.0, 10.0, 13.5])
    timer = common.Timer(clock=lambda: next(ticks))
    with timer.phase("generation_s"):
        pass
    timer.wrap(lambda: None, "generation_s")()
    assert timer.take() == {"generation_s": 5.5} and timer.take() == {}


def test_rrr_step_record_counts_sampled_tokens_truncation_and_lengths():
    from rrr.episode import Episode

    R, A2, P = int(Segment.REFLECTION), int(Segment.ATTEMPT2), int(Segment.PROMPT)
    eps = [Episode("q", 0, 0, list(range(8)), [P, P, R, R, R, P, A2, A2], [0.0] * 8,
                   truncated={"reflection": False, "attempt2": False}),
           Episode("q", 0, 1, list(range(6)), [P, P, R, P, A2, A2], [0.0] * 6,
                   truncated={"reflection": True, "attempt2": True})]
    s = rrr_train.step_record({"generation_s": 4.0, "update_s": 6.0, "ref_s": 1.5}, [eps])
    assert (s["sampled_tokens"], s["reflections"], s["truncated_reflection_share"]) == (3 + 2 + 1 + 2, 2, 0.5)
    assert (s["seq_len_max"], s["update_len_max"]) == (8, 5)       # rows end at the last token of an ended reflection
    eps[0].truncated["reflection"] = True
    assert rrr_train.step_record({}, [eps])["update_len_max"] == 0            # truncated: no loss, no update row
    assert (s["generation_s"], s["update_s"], s["ref_logprobs_s"], s["fwd_bwd_opt_s"]) == (4.0, 6.0, 1.5, 4.5)
    rrr_train.finish_record(s, {"step_time_s": 11.0, "reward_mean": 0.5})
    assert s["other_s"] == 1.0 and s["tokens_per_s"] == 8 / 11.0


def test_trl_step_record_splits_generation_reference_and_update():
    counts = {**trl_grpo.new_counts(), "generated_tokens": 40, "reflections": 4, "truncated_reflections": 1}
    s = trl_grpo.trl_step_record(20.0, {"generation_s": 8.0, "ref_logprobs_s": 2.0, "prepare_s": 11.0}, counts)
    assert (s["fwd_bwd_opt_s"], s["update_s"], s["other_s"]) == (9.0, 11.0, 1.0)
    assert s["truncated_reflection_share"] == 0.25 and s["tokens_per_s"] == 2.0 and s["sampled_tokens"] == 40


def test_equal_work_json_holds_order_labels_runs_summary_and_the_unshared_row(monkeypatch, tmp_path):
    calls = []

    def fake_worker(py, module, args, threads=1):
        calls.append((module, args))
        a = dict(item.split("=", 1) for item in args)
        side_s = {"bench.trl_grpo": 30.0}.get(module, 20.0 if "shared_prefix=false" in a.get("rrr_args", "") else 10.0)
        return fake_result([99.0, side_s, side_s, side_s], side=module)

    monkeypatch.setattr(run, "worker", fake_worker)
    monkeypatch.setattr(run, "shared_prefix_key_exists", lambda: True)
    a = {**run.task_args(run.RUN_DEFAULTS, set(), "countdown"), "rrr_args": "train.beta=0"}
    results = {"notes": [], "parts": {}, "args": a}
    run.run_equal_work(a, ["failures=f", "rrr_args=train.beta=0"], "py", None, results, lambda: None)
    block = results["equal_work"]
    assert block["order"] == [[0, "rrr_hf"], [0, "rrr_hf_unshared"], [0, "trl_r3"], [1, "trl_r3"],
                              [1, "rrr_hf_unshared"], [1, "rrr_hf"], [0, "trl_r3_full"]]
    assert [len(block["sides"][s]["runs"]) for s in ("rrr_hf", "rrr_hf_unshared", "trl_r3", "trl_r3_full")] == [2, 2, 2, 1]
    unshared = [args for module, args in calls if any("shared_prefix=false" in x for x in args)]
    assert len(unshared) == 2 and unshared[0][-1] == "rrr_args=train.beta=0 train.shared_prefix=false"
    assert [x for x in calls[0][1] if x.startswith("mode=")] == [] and "mode=r3" in calls[2][1]
    summary = block["summary"]
    assert summary["rrr_hf"]["per_step_x"] == 3.0 and summary["rrr_hf_unshared"]["per_step_x"] == 1.5
    for key in ("step_s", "run_step_s", "spread", "sampled_tokens", "tokens_per_s", "truncated_reflection_share",
                "generation_s", "update_s", "seq_len_max", "per_step_x"):
        assert summary["trl_r3"][key] is not None, key
    json.dumps(results)                                                        # the results file is JSON
    got = {name: value for name, value, _ in run.targets(results)}
    assert got["update (policy + reference), shared prefix ÷ train.shared_prefix=false ≤ 0.4"] == 0.5
    assert got["rrr train (hf) ÷ TRL-R3, per step at equal work ≥ 2"] == 3.0
    assert "| countdown | rrr train, engine=hf, train.shared_prefix=false | 20.0 |" in run.markdown(results)


def test_the_unshared_row_waits_for_the_shared_prefix_key(monkeypatch):
    monkeypatch.setattr(run, "shared_prefix_key_exists", lambda: False)
    notes = []
    sides, once = run.sides_of(run.task_args(run.RUN_DEFAULTS, set(), "countdown"), None, notes)
    assert sides == ["rrr_hf", "trl_r3"] and once == ["trl_r3_full"] and "shared_prefix" in notes[0]
    monkeypatch.setattr(run, "shared_prefix_key_exists", lambda: True)
    sides, _ = run.sides_of(run.task_args(run.RUN_DEFAULTS, set(), "function_calling"), "vpy", [])
    assert sides == ["rrr_hf", "rrr_hf_unshared", "trl_r3", "rrr_vllm"]
    with pytest.raises(SystemExit, match="not one of"):
        run.sides_of({**run.task_args(run.RUN_DEFAULTS, set(), "countdown"), "sides": "rrr"}, None, [])
    a = {**run.task_args(run.RUN_DEFAULTS, set(), "countdown"), "rrr_args": ""}
    assert run.side_args("rrr_hf_unmerged", a, ["failures=f"]) == ["failures=f", "engine=hf",
                                                                    "rrr_args=engine.merge_lora=false"]


def test_shared_prefix_key_check_reads_the_train_defaults():
    text = (run.ROOT / "conf" / "train" / "default.yaml").read_text()
    assert run.shared_prefix_key_exists() == any(line.startswith("shared_prefix:") for line in text.splitlines())


def test_task_defaults_and_that_the_command_line_wins():
    parsed = run.parse_args(["task=both", "queries=3", "steps=5"], defaults=run.RUN_DEFAULTS)
    fc = run.task_args(parsed, {"task", "queries", "steps"}, "function_calling")
    assert (fc["model"], fc["experiment"], fc["reflection_tokens"], fc["retry_tokens"]) == ("qwen2.5-coder-0.5b", "demo", 96, 96)
    assert (fc["queries"], fc["steps"], fc["collect_queries"], fc["task"]) == (3, 5, 16, "function_calling")
    cd = run.task_args(parsed, {"task", "queries", "steps"}, "countdown")
    assert (cd["model"], cd["experiment"], cd["reflection_tokens"], cd["once"]) == ("smollm2-135m", "", 64, "trl_r3_full")
    cfg = compose(common.rrr_overrides({**fc, "failures": ""}))
    assert cfg.task.name == "function_calling" and cfg.train.zero_std == "keep"        # TRL does not re-draw
    assert cfg.train.sampling.reflection.max_tokens == 96 and cfg.train.min_pass_rate == 0.0
    assert "one short sentence" in cfg.prompts.feedback                                # the demo's prompts


def test_main_with_both_tasks_prints_one_equal_work_table(monkeypatch, capsys):
    def fake_run_task(a):
        s = equal_work.summarize({"rrr_hf": [fake_result([9.0, 5.0, 5.0])], "trl_r3": [fake_result([9.0, 10.0, 10.0])]})
        return {"args": a, "equal_work": {"summary": s, "sides": {k: {"label": run.SIDES[k][2]} for k in s}}}

    monkeypatch.setattr(run, "run_task", fake_run_task)
    run.main(["steps=3"])
    out = capsys.readouterr().out
    assert "| countdown | rrr train, engine=hf | 5.0 |" in out and "| function_calling | rrr train, engine=hf | 5.0 |" in out
    with pytest.raises(SystemExit, match="task='chess'"):
        run.main(["task=chess"])


def test_a_run_needs_a_timed_step_after_its_warm_up():
    with pytest.raises(SystemExit, match="steps=1: a run's first step is its warm-up"):
        run.run_task({**run.task_args(run.RUN_DEFAULTS, set(), "countdown"), "steps": 1})


def test_trim_failures_keeps_the_first_n_failed_queries(tmp_path, failures):
    from rrr.failures import load_failures

    out = workload.trim_failures(failures, tmp_path / "trimmed", 2)
    examples, _ = load_failures(out)
    assert [e.id for e in examples] == [e.id for e in load_failures(failures)[0][:2]]
    with pytest.raises(SystemExit, match="holds 3 failed queries"):
        workload.trim_failures(failures, tmp_path / "more", 4)


def test_engine_config_records_compilation_lora_sync_and_shared_prefix():
    hf = rrr_train.engine_config(compose(["model=tiny-random"]))
    assert (hf["name"], hf["compiled"], hf["lora_sync"]) == ("hf", False, "merged per generate call")
    off = rrr_train.engine_config(compose(["model=tiny-random", "engine.merge_lora=false"]))
    assert off["lora_sync"].startswith("peft unmerged")
    vllm = rrr_train.engine_config(compose(["model=tiny-random", "engine=vllm", "engine.enforce_eager=false"]))
    assert (vllm["compiled"], vllm["lora_sync"]) == (True, "merged")
    assert rrr_train.engine_config(compose(["model=tiny-random", "engine=vllm", "engine.enforce_eager=true"]))["compiled"] is False
    assert "shared_prefix" in hf


def test_patch_replaces_the_loop_function_wherever_it_is_held(monkeypatch):
    from rrr import trainer

    original = trainer.policy_update
    seen = []
    for name, module in list(sys.modules.items()):                # monkeypatch restores them afterwards
        if (name == "rrr" or name.startswith("rrr.")) and getattr(module, "policy_update", None) is original:
            monkeypatch.setattr(module, "policy_update", original)
    rrr_train.patch("policy_update", lambda fn: seen.append(fn) or (lambda *a, **k: "wrapped"))
    assert seen == [original] and trainer.policy_update() == "wrapped"
    with pytest.raises(SystemExit, match="no no_such_function"):
        rrr_train.patch("no_such_function", lambda fn: fn)


def test_rrr_overrides_vllm_cpu_defaults_extra_args_and_that_given_keys_win(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    hf = common.rrr_overrides(dict(common.DEFAULTS, rrr_args="train.beta=0", vllm_args="engine.enforce_eager=true"))
    assert "train.beta=0" in hf and not any(kv.startswith("engine.enforce_eager") for kv in hf)  # vllm_args: vllm only
    vllm = compose(common.rrr_overrides(dict(common.DEFAULTS, engine="vllm", vllm_args="engine.enforce_eager=true")))
    assert vllm.engine.enforce_eager is True and vllm.engine.gpu_memory_utilization == 0.1   # vllm_args win
    assert compose(common.rrr_overrides(dict(common.DEFAULTS, engine="vllm"))).engine.enforce_eager is False
    fc = run.task_args(run.RUN_DEFAULTS, set(), "function_calling")      # Qwen 0.5B fp32 needs more than 0.1
    assert compose(common.rrr_overrides({**fc, "engine": "vllm"})).engine.gpu_memory_utilization == 0.3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert common.vllm_cpu_overrides(dict(common.DEFAULTS, engine="vllm")) == []


def test_vllm_cpu_env_binds_as_many_cores_as_threads_from_the_allowed_set(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(run.os, "sched_getaffinity", lambda pid: {3, 1, 5})
    assert run.vllm_cpu_env(2) == {"VLLM_CPU_OMP_THREADS_BIND": "1,3", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    assert run.vllm_cpu_env(2) == {}


def test_table_of_saved_results_joins_tasks_run_separately_and_refuses_a_missing_file(tmp_path, capsys):
    paths = []
    for task, rrr_s in (("countdown", 5.0), ("function_calling", 2.5)):
        s = equal_work.summarize({"rrr_hf": [fake_result([9.0, rrr_s, rrr_s])],
                                  "trl_r3": [fake_result([9.0, 10.0, 10.0])]})
        results = {"args": {**run.task_args(run.RUN_DEFAULTS, set(), task)}, "parts": {},
                   "equal_work": {"summary": s, "sides": {k: {"label": run.SIDES[k][2]} for k in s}}}
        paths.append(tmp_path / f"{task}.json")
        paths[-1].write_text(json.dumps(results))
    run.main([f"table={paths[0]},{paths[1]}"])
    out = capsys.readouterr().out
    assert "| countdown | rrr train, engine=hf | 5.0 |" in out and "| function_calling | rrr train, engine=hf | 2.5 |" in out
    assert "| rrr train (hf) ÷ TRL-R3, per step at equal work ≥ 2 | 2.00 | yes |" in out
    assert "| rrr train (hf) ÷ TRL-R3, per step at equal work ≥ 3 | 4.00 | yes |" in out
    with pytest.raises(SystemExit, match="cannot read"):
        run.main([f"table={tmp_path / 'missing.json'}"])


THROUGHPUT = {"collect": {"samples_per_s": 1.0, "samples": 4}, "evaluate": {"examples_per_s": 1.0, "examples": 2}}


def test_resume_reuses_the_failure_set_and_finished_runs_of_the_same_workload(monkeypatch, tmp_path):
    calls = []

    def fake_worker(py, module, args, threads=1):
        calls.append((module, args))
        if module == "bench.throughput":
            return {"failures": "fresh"}
        workload = {k: a[k] for k in ("model", "task", "experiment", "reflection_tokens", "retry_tokens")}
        return fake_result([9.0, 10.0, 10.0], side=module, **workload,
                           failures=dict(x.split("=", 1) for x in args)["failures"])

    monkeypatch.setattr(run, "worker", fake_worker)
    monkeypatch.setattr(run, "shared_prefix_key_exists", lambda: True)
    monkeypatch.setattr(run, "machine", lambda: {})
    monkeypatch.setattr("bench.workload.trim_failures", lambda src, dst, n: dst)
    a = {**run.task_args(run.RUN_DEFAULTS, set(), "function_calling"), "results": str(tmp_path), "tag": "t"}
    ran = {**fake_result([9.0, 4.0, 4.0], failures="old-first2"), "round": 0}
    other = {**fake_result([9.0, 4.0, 4.0], failures="old-first2", seed=7), "round": 1}   # not this workload
    for k in ("model", "task", "experiment", "reflection_tokens", "retry_tokens"):     # the same workload
        ran["args"][k] = other["args"][k] = a[k]
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"args": {"task": "function_calling"}, "started": "then",
                                   "parts": {"throughput": {"failures": "old", **THROUGHPUT}},
                                   "equal_work": {"sides": {"rrr_hf": {"runs": [ran, other]}}}}))
    results = run.run_task({**a, "resume": str(earlier)})
    modules = [m for m, _ in calls]
    assert "bench.throughput" not in modules                        # the failure set is reused, not collected
    assert modules.count("bench.rrr_train") == 3                    # rrr_hf round 1 + rrr_hf_unshared × 2
    assert results["equal_work"]["summary"]["rrr_hf"]["run_step_s"] == [4.0, 10.0]
    assert results["resumed_from"]["path"] == str(earlier) and "rrr_hf (round 0)" in " ".join(results["notes"])
    (tmp_path / "countdown.json").write_text(json.dumps({"args": {"task": "countdown"}}))
    with pytest.raises(SystemExit, match="holds task 'countdown'"):
        run.run_task({**a, "resume": str(tmp_path / "countdown.json")})
