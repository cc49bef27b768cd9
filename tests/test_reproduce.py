import subprocess
from pathlib import Path

import pytest

from rrr import reproduce
from rrr.config import UserError, compose

TRAINED = {
    "function_calling": {"qwen2-1.5b", "qwen2-7b", "llama3.1-8b", "phi3.5-mini"},
    "countdown": {"qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "llama3.1-8b", "llama3.2-3b"},
}
COMPARATORS = {"function_calling": {"qwen2-72b"}, "countdown": {"qwen2.5-72b", "llama3.1-70b"}}
SOURCE = {"function_calling": "task.source=xlam", "countdown": "task.source=hub"}


@pytest.fixture(scope="module")
def plan():
    return reproduce.paper_plan(Path("outputs/paper"))


def _stages_of(plan, task, model):
    return [s.name for s in plan if s.task == task and s.model == model]


def test_every_model_has_its_stages_on_its_task(plan):
    for task in TRAINED:
        for model in TRAINED[task]:
            vanilla = ["forgetting-vanilla"] if (task, model) != ("countdown", "llama3.1-8b") else []  # once
            assert _stages_of(plan, task, model) == ["collect", "train", "evaluate-vanilla", "evaluate-trained",
                                                     *vanilla, "forgetting-trained"]
        for model in COMPARATORS[task]:
            assert _stages_of(plan, task, model) == ["evaluate-vanilla"]  # comparators are never trained
        models = {s.model for s in plan if s.task == task and s.model}
        assert models == TRAINED[task] | COMPARATORS[task]
        for s in (s for s in plan if s.task == task and s.model and s.command != "forgetting"):
            assert f"task={task}" in s.args and SOURCE[task] in s.args and "engine=vllm" in s.args


def test_paper_settings_and_paths_chain_the_stages(plan):
    by = {(s.task, s.model, s.name): s for s in plan}
    collect = by["countdown", "qwen2.5-1.5b", "collect"]
    train = by["countdown", "qwen2.5-1.5b", "train"]
    trained = by["countdown", "qwen2.5-1.5b", "evaluate-trained"]
    assert "collect.samples_per_query=64" in collect.args
    assert f"train.failures={collect.output.parent}" in train.args
    assert {"train.steps=1750", "train.beta=0.001"} <= set(train.args)
    batch = [int(a.split("=")[1]) for a in train.args if a.startswith(("train.batch_queries=", "train.group_size="))]
    assert batch[0] * batch[1] == 256  # the paper's 256 failures per batch
    assert f"model.path={train.output}" in trained.args and train.output.name == "final"
    for s in plan:
        if s.command == "evaluate":
            assert "eval.limit=null" in s.args and s.output.name == "summary.json"


def test_one_compare_per_task_over_all_its_evaluations(plan):
    compares = [s for s in plan if s.command == "compare"]
    assert [s.task for s in compares] == ["function_calling", "countdown"]
    for c in compares:
        evals = [str(s.output.parent) for s in plan if s.task == c.task and s.command == "evaluate"]
        forgetting = [str(s.output.parent) for s in plan if s.task == c.task and s.command == "forgetting"]
        if c.task == "countdown":          # llama3.1-8b's vanilla forgetting run was planned under function_calling
            forgetting.append("outputs/paper/forgetting/llama3.1-8b/vanilla")
        assert sorted(c.args[:-2]) == sorted(evals + forgetting) and c.args[-2] == "--out"
        assert len(set(c.args[:-2])) == len(c.args[:-2])
        assert plan.index(c) > max(plan.index(s) for s in plan if s.task == c.task and s.command == "evaluate")


def test_token_bounds_follow_the_composed_config(plan):
    cfg = compose(["task=countdown", "task.source=hub"])
    n_test = min(round(cfg.task.test_fraction * 490_364), cfg.task.test_size)
    by = {(s.task, s.model, s.name): s for s in plan}
    collect = by["countdown", "qwen2.5-3b", "collect"]
    assert collect.tokens == (490_364 - n_test) * 64 * cfg.collect.max_tokens
    train = by["countdown", "qwen2.5-3b", "train"]
    sampling = cfg.train.sampling
    assert train.tokens >= 1750 * 256 * (sampling.reflection.max_tokens + sampling.attempt2.max_tokens)
    evaluate = by["function_calling", "qwen2-72b", "evaluate-vanilla"]
    assert evaluate.tokens >= 12_000 * (cfg.eval.sampling.attempt1.max_tokens + cfg.eval.sampling.attempt2.max_tokens)
    assert all(s.tokens > 0 for s in plan if s.command != "compare")


def test_forgetting_stage_runs_lm_eval_on_vanilla_once_and_on_each_trained_model(plan):
    """Paper Table 3: MMLU-Pro, GSM8K, HellaSwag, MATH before and after training, on one GPU each."""
    by = {(s.task, s.model, s.name): s for s in plan}
    vanilla = by["function_calling", "llama3.1-8b", "forgetting-vanilla"]
    trained = [by[t, "llama3.1-8b", "forgetting-trained"] for t in ("function_calling", "countdown")]
    train = [by[t, "llama3.1-8b", "train"] for t in ("function_calling", "countdown")]
    assert [s.output for s in plan if s.name == "forgetting-vanilla" and s.model == "llama3.1-8b"] == [vanilla.output]
    assert vanilla.args == ("model=llama3.1-8b", "run_dir=outputs/paper/forgetting/llama3.1-8b/vanilla")
    for s, t in zip(trained, train):
        assert s.command == "forgetting" and f"model.path={t.output}" in s.args and s.output.name == "summary.json"
        assert plan.index(s) > plan.index(t)
    assert compose(list(vanilla.args)).forgetting.tasks == ["mmlu_pro", "gsm8k", "hellaswag", "hendrycks_math"]
    assert vanilla.tokens == 12_032 * 2048 + 1_319 * 256 + 5_000 * 256          # hellaswag scores, generates 0
    assert "hellaswag 10,042 × 4 choices scored" in vanilla.tokens_how
    big = reproduce.paper_plan(Path("outputs/paper"), reproduce.Hardware(gpus=8))
    assert {(s.gpus, s.ranks) for s in big if s.command == "forgetting"} == {(1, 1)}   # lm-eval: one process
    cfg = compose(["forgetting.limit=100"])
    assert reproduce.forgetting_tokens(cfg)[0] == 100 * 2048 + 100 * 256 + 100 * 256


def test_commands_of_one_model_per_kind_compose(plan):
    sample = [s for s in plan if s.model in ("qwen2-1.5b", "qwen2.5-72b")]
    assert len(sample) == 7
    reproduce.validate(sample)


@pytest.mark.slow
def test_every_command_composes(plan):
    reproduce.validate(plan)


def test_dry_run_prints_the_plan_and_runs_nothing(monkeypatch, capsys):
    monkeypatch.setenv("DRY_RUN", "1")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("dry run executed a command"))
    reproduce.main()
    out = capsys.readouterr().out
    commands = [ln for ln in out.splitlines() if ln.startswith("rrr ")]
    # compares, trained models' stages, comparators, vanilla forgetting once per model (8 distinct)
    assert len(commands) == 2 * 1 + 5 * 9 + 3 + 8
    assert "# everything: <= " in out and "rrr compare " in out


def test_real_run_skips_finished_stages_and_stops_on_failure(tmp_path, monkeypatch):
    stages = reproduce.task_plan(reproduce.PAPER_MATRIX[0], tmp_path)
    done = stages[0].output  # the first model's failure set exists
    done.parent.mkdir(parents=True)
    done.write_text("")
    calls = []

    def fake_run(argv, **kwargs):
        calls.append(argv[3])
        return subprocess.CompletedProcess(argv, 1 if len(calls) == 3 else 0)

    monkeypatch.setattr(reproduce, "validate", lambda stages: None)
    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(UserError, match="evaluate-trained qwen2-1.5b failed"):
        reproduce.execute(stages)
    assert calls == ["train", "evaluate", "evaluate"]  # collect skipped; stopped at the failing stage


def test_gpus_knob_plans_torchrun_data_parallel_and_vllm_tensor_parallel():
    hw = reproduce.Hardware(gpus=8, finetune="full")
    plan = reproduce.paper_plan(Path("outputs/paper"), hw)
    by = {(s.task, s.model, s.name): s for s in plan}
    train = by["countdown", "qwen2.5-7b", "train"]
    assert train.argv[:4] == ["torchrun", "--nproc_per_node=8", "-m", "rrr"] and train.gpus == 8
    assert {"train.finetune=full", "train.parallel=fsdp", "engine=vllm"} <= set(train.args)
    big = by["countdown", "llama3.1-70b", "evaluate-vanilla"]     # 141 GB of bf16 weights: TP 4, vLLM DP 2
    assert big.argv[0] == "rrr" and big.ranks == 1 and big.gpus == 8
    assert {"engine.tensor_parallel_size=4", "engine.data_parallel_size=2"} <= set(big.args)
    text = reproduce.format_plan(plan)
    assert "8 GPUs × 8 ranks" in text and "; CPU" in text
    # one GPU: today's single-process commands, with the GPUs a 70B-class model would need said plainly
    single = reproduce.paper_plan(Path("outputs/paper"))
    assert all(s.argv[0] == "rrr" and not any("parallel" in a for a in s.args) for s in single)
    assert "needs >= 4 GPUs" in reproduce.format_plan(single)
    assert [reproduce.Hardware().tensor_parallel(m) for m in ("qwen2.5-1.5b", "qwen2-7b", "qwen2.5-72b")] == [1, 1, 4]


def test_train_token_estimate_bounds_dynamic_sampling_by_max_draws():
    base = ["train.steps=2", "train.batch_queries=3", "train.group_size=4"]
    keep, _ = reproduce.train_tokens(compose(base))
    dynamic, how = reproduce.train_tokens(compose([*base, "train.zero_std=dynamic", "train.max_draws=3"]))
    assert dynamic == 3 * keep and "× 3 for dynamic sampling" in how
