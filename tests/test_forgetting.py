"""`rrr forgetting` (lm-eval-harness) offline: a local lm-eval task (tests/lmeval_tasks: a multiple-choice
group and a generation task over JSONL files) on tiny-random, vanilla and with a LoRA adapter that
`rrr train` really trained; the run dir, the per-document scores, resume, and the compare table.

The hub benchmarks (mmlu_pro, gsm8k, hellaswag, hendrycks_math) cannot run here (no hub): only their
offline failure is tested."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fakes import trainer as trainer_fakes
from rrr import forgetting, trainer
from rrr import report as compare
from rrr.report import forgetting as forgetting_report
from rrr.cli import app
from rrr.config import UserError, compose

pytest.importorskip("lm_eval")
torch.set_num_threads(1)
TASKS = Path(__file__).parent / "lmeval_tasks"
LOCAL = [f"forgetting.include_path={TASKS}", "forgetting.tasks=[rrr_arith,rrr_arith_gen]", "forgetting.bootstrap_iters=0"]
N_ADD, N_SUB, N_GEN = 16, 12, 8


def forgetting_cfg(run: Path, *extra: str):
    return compose(["model=tiny-random", "model.device=cpu", f"run_dir={run}", *LOCAL, *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smol_tokenizer) -> dict[str, Path]:
    """A 2-step LoRA train run on tiny-random (real GRPO updates; fake engine and verifier, as in
    test_trainer), then `rrr forgetting` on the vanilla model and on its final adapter."""
    root = tmp_path_factory.mktemp("forgetting")
    failures = trainer_fakes.write_failures(root / "failures", smol_tokenizer)
    with pytest.MonkeyPatch.context() as mp:
        trainer_fakes.install(mp, trainer)
        train = trainer.run(compose([
            "task=countdown", "model=tiny-random", f"train.failures={failures}", f"run_dir={root / 'train'}",
            "train.steps=2", "train.batch_queries=2", "train.group_size=4", "train.micro_batch_size=4",
            "train.lr=0.05", "train.warmup_steps=0", "train.sampling.attempt1.max_tokens=8",
            "train.sampling.reflection.max_tokens=8", "train.sampling.attempt2.max_tokens=8", "log.progress=false"]))
    adapter = train / "checkpoints" / "final"
    vanilla = forgetting.run(forgetting_cfg(root / "vanilla"))
    trained = forgetting.run(forgetting_cfg(root / "trained", f"model.path={adapter}"))
    return {"root": root, "train": train, "adapter": adapter, "vanilla": vanilla, "trained": trained}


def samples(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "samples.parquet")


def test_run_dir_has_config_manifest_results_and_per_document_scores(runs):
    run = runs["trained"]
    for f in ("config.yaml", "manifest.json", "benchmark.parquet", "samples.parquet", "summary.json",
              "tasks/rrr_arith/results.json", "tasks/rrr_arith_gen/samples.parquet"):
        assert (run / f).exists(), f
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["command"] == "forgetting" and manifest["model_label"] == "trained"
    assert manifest["lm_eval_version"] and manifest["versions"]["torch"]
    assert Path(manifest["train_run"]) == runs["train"].resolve()
    s = samples(run)
    counts = s.groupby(["subtask", "metric", "filter"]).size().to_dict()
    assert counts == {("rrr_arith_add", "acc", "none"): N_ADD, ("rrr_arith_sub", "acc", "none"): N_SUB,
                      ("rrr_arith_gen", "exact_match", "first-number"): N_GEN}
    assert set(s.score.unique()) <= {0.0, 1.0}
    table = pd.read_parquet(run / "benchmark.parquet")
    group = table[(table.name == "rrr_arith") & (table.metric == "acc")].iloc[0]
    assert group.is_group and group.n == N_ADD + N_SUB
    # lm-eval's size-weighted group mean is the pooled mean of the per-document scores rrr stores
    assert group.value == pytest.approx(s[s.task == "rrr_arith"].score.mean())
    add = table[table.name == "rrr_arith_add"].iloc[0]
    assert add.value == pytest.approx(s[s.subtask == "rrr_arith_add"].score.mean())


def _loglikelihoods(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """log p(' ' + choice | context), split as lm-eval splits a request (context ids, then the rest)."""
    out = []
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    for c in choices:
        whole = tokenizer(context + " " + c, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
        out.append(float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole)))))
    return out


@pytest.mark.parametrize("which", ["vanilla", "trained"])
def test_scores_are_the_models_own_loglikelihoods_adapter_applied(runs, which):
    """Recompute document 0's choice log-likelihoods with the model rrr loads (the adapter through
    model.path for the trained run): lm-eval scored exactly that model, and the adapter changed them."""
    from rrr.models import load_model

    overrides = ["model=tiny-random", "model.device=cpu"] + ([f"model.path={runs['adapter']}"] if which == "trained" else [])
    model, tokenizer = load_model(compose(overrides).model)
    doc = json.loads((TASKS / "arith_add.jsonl").read_text().splitlines()[0])
    expected = _loglikelihoods(model, tokenizer, f"Question: {doc['question']}\nAnswer:", doc["choices"])
    row = samples(runs[which]).query("subtask == 'rrr_arith_add' and doc_id == 0").iloc[0]
    got = [ll for ll, _ in json.loads(row.response)]
    assert got == pytest.approx(expected, abs=1e-3)
    other = "vanilla" if which == "trained" else "trained"
    theirs = [ll for ll, _ in json.loads(samples(runs[other]).query("subtask == 'rrr_arith_add' and doc_id == 0")
                                          .iloc[0].response)]
    assert max(abs(a - b) for a, b in zip(got, theirs)) > 1e-3


def test_compare_table_pairs_vanilla_and_trained_per_document(runs, capsys):
    out = compare.run([runs["trained"], runs["vanilla"]], runs["root"] / "cmp")
    report = (out / "report.md").read_text()
    assert "Forgetting check" in report and "benchmarks.png" in report
    assert "| rrr_arith · acc | 28 |" in report and "| rrr_arith_gen · exact_match (first-number) | 8 |" in report
    assert (out / "benchmarks.png").stat().st_size > 0
    deltas = pd.read_csv(out / "benchmark_deltas.csv")
    s_t, s_v = samples(runs["trained"]), samples(runs["vanilla"])
    for bench, task in (("rrr_arith", "rrr_arith"), ("rrr_arith_gen", "rrr_arith_gen")):
        row = deltas[deltas.benchmark == bench].iloc[0]
        expected = s_t[s_t.task == task].score.mean() - s_v[s_v.task == task].score.mean()
        assert row.delta == pytest.approx(expected)
        assert row.lo <= row.delta <= row.hi and row.n == len(s_t[s_t.task == task])
    scores = pd.read_csv(out / "benchmarks.csv")
    assert set(scores.run) == {"tiny-random vanilla", "tiny-random trained"}
    assert "tiny-random trained" in capsys.readouterr().out


def test_compare_refuses_to_pair_different_documents_or_prompts(runs, tmp_path):
    fewer = tmp_path / "fewer"
    shutil.copytree(runs["trained"], fewer)
    s = samples(fewer)
    s[~((s.subtask == "rrr_arith_add") & (s.doc_id == 0))].to_parquet(fewer / "samples.parquet")
    other_prompt = tmp_path / "prompt"
    shutil.copytree(runs["trained"], other_prompt)
    s = samples(other_prompt)
    s.loc[s.task == "rrr_arith_gen", "prompt_hash"] = "x"
    s.to_parquet(other_prompt / "samples.parquet")
    for run, note in ((fewer, "different documents"), (other_prompt, "prompts differ")):
        deltas = forgetting_report.paired_deltas(forgetting_report.name_runs(
            [forgetting_report.load_forgetting_run(run), forgetting_report.load_forgetting_run(runs["vanilla"])]), 200)
        bad = deltas[deltas.note.str.contains(note)]
        assert len(bad) == 1 and np.isnan(bad.delta.iloc[0])


def test_resume_skips_finished_tasks_and_refuses_other_settings(runs, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a finished task was evaluated again")

    monkeypatch.setattr(forgetting, "evaluate_task", boom)
    monkeypatch.setattr(forgetting, "build_lm", boom)
    before = (runs["vanilla"] / "samples.parquet").read_bytes()
    forgetting.run(forgetting_cfg(runs["vanilla"]))
    assert pd.read_parquet(runs["vanilla"] / "samples.parquet").equals(pd.read_parquet(pd.io.common.BytesIO(before)))
    with pytest.raises(UserError, match="different settings"):
        forgetting.run(forgetting_cfg(runs["vanilla"], "forgetting.num_fewshot=1"))


def test_a_run_of_the_former_benchmark_command_is_continued_and_compared(runs, monkeypatch, tmp_path):
    """Run dirs written as `rrr benchmark` (manifest command "benchmark") resume under `rrr forgetting`
    and still count as forgetting-check runs in `rrr compare`."""
    def boom(*a, **k):
        raise AssertionError("a finished task was evaluated again")

    old = tmp_path / "old"
    shutil.copytree(runs["vanilla"], old)
    (old / ".lock").unlink(missing_ok=True)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "command": "benchmark"}))
    assert forgetting_report.is_forgetting_run(old)
    monkeypatch.setattr(forgetting, "evaluate_task", boom)
    monkeypatch.setattr(forgetting, "build_lm", boom)
    forgetting.run(forgetting_cfg(old))
    assert json.loads((old / "manifest.json").read_text())["command"] == "forgetting"


def test_the_benchmark_alias_says_the_new_name_and_runs_it_into_outputs_forgetting(tmp_path):
    """`rrr benchmark bench.X=...` (the old name and keys): one line naming `rrr forgetting`, then the
    forgetting check, with its run dir under <out_root>/forgetting/."""
    old_keys = [o.replace("forgetting.", "bench.") for o in LOCAL]
    result = CliRunner().invoke(app, ["benchmark", "model=tiny-random", "model.device=cpu", f"out_root={tmp_path}",
                                      *old_keys, "bench.limit=2"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("note: `rrr benchmark` is now `rrr forgetting`")
    [run] = list((tmp_path / "forgetting").iterdir())
    assert json.loads((run / "manifest.json").read_text())["command"] == "forgetting"
    assert set(pd.read_parquet(run / "samples.parquet").doc_id) == {0, 1}          # bench.limit=2 arrived


def test_task_plans_apply_per_task_overrides_and_reject_bad_values():
    cfg = compose(["forgetting.tasks=[gsm8k,hellaswag]", "forgetting.limit=50", "forgetting.per_task={gsm8k:{num_fewshot:8}}"])
    plans = forgetting.task_plans(cfg.forgetting)
    assert [(p.name, p.num_fewshot, p.limit) for p in plans] == [("gsm8k", 8, 50), ("hellaswag", None, 50)]
    assert forgetting.task_plans(compose(["forgetting.limit=0.25"]).forgetting)[0].limit == 0.25
    assert [p.name for p in forgetting.task_plans(compose([]).forgetting)] == list(forgetting.PAPER_TASKS)
    for bad, words in ((["forgetting.per_task={mmlu:{limit:3}}"], "not in forgetting.tasks"),
                       (["forgetting.per_task={gsm8k:{shots:3}}"], "unknown keys"),
                       (["forgetting.limit=1.5"], r"\(0, 1\)"), (["forgetting.tasks=[]"], "empty"),
                       (["forgetting.tasks=[gsm8k,gsm8k]"], "twice"), (["forgetting.num_fewshot=-1"], ">= 0")):
        with pytest.raises(UserError, match=words):
            forgetting.task_plans(compose(bad).forgetting)


@pytest.mark.slow   # an unknown name is looked up in lm-eval's full index of ~15k tasks (~10-30 s)
@pytest.mark.parametrize("args, words", [
    (["forgetting.tasks=[rrr_arith_ad]", f"forgetting.include_path={TASKS}"], "unknown lm-eval task 'rrr_arith_ad'; did you mean"),
    (["forgetting.include_path=/no/such/dir"], "not a folder"),
])
def test_cli_user_errors_are_one_line(args, words, tmp_path):
    result = CliRunner().invoke(app, ["forgetting", "model=tiny-random", f"run_dir={tmp_path / 'r'}", *args])
    assert result.exit_code == 1, result.output
    assert words in result.output and "Traceback" not in result.output


@pytest.mark.slow   # lm-eval's full task index (~10-30 s)
def test_a_hub_benchmark_offline_is_one_clear_error(tmp_path, monkeypatch):
    """gsm8k needs the hub (tests run with HF_HUB_OFFLINE=1 and an empty datasets cache)."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    with pytest.raises(UserError, match="lm-eval task 'gsm8k' cannot load its data"):
        forgetting.run(compose(["model=tiny-random", "model.device=cpu", f"run_dir={tmp_path / 'r'}",
                               f"forgetting.include_path={TASKS}", "forgetting.tasks=[gsm8k]", "forgetting.limit=2"]))


def test_missing_lm_eval_says_how_to_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_lm_eval(name, *a, **k):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(UserError, match=r"\.\[forgetting\]"):
        forgetting.require_lm_eval()


def test_a_failed_start_leaves_no_run_dir(tmp_path, monkeypatch):
    """The model loads before the run dir exists: a start that fails there leaves nothing that would
    refuse the corrected command."""
    def no_model(cfg):
        raise UserError("cannot load the model")

    monkeypatch.setattr(forgetting, "build_lm", no_model)
    run = tmp_path / "r"
    with pytest.raises(UserError, match="cannot load"):
        forgetting.run(forgetting_cfg(run))
    assert not run.exists()
