"""Every user mistake of issue #12 through the real CLI: one line, no traceback, exit != 0, and a failed
start leaves nothing that refuses the corrected command. Tiny-random model, tiny budgets: fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fakes import trainer as trainer_fakes
from rrr.cli import app

torch.set_num_threads(1)
TINY = ["model=tiny-random", "model.device=cpu", "log.progress=false"]
EVAL = ["evaluate", "task=countdown", *TINY, "eval.limit=2", "eval.controls=[]",
        *[f"eval.sampling.{s}.max_tokens=4" for s in ("attempt1", "reflection", "attempt2")]]
COLLECT = ["collect-failures", "task=countdown", *TINY, "data.limit=2", "collect.samples_per_query=2",
           "collect.max_tokens=4"]


def train_args(failures: Path, *extra: str) -> list[str]:
    return ["train", "task=countdown", *TINY, f"train.failures={failures}", "train.steps=1",
            "train.batch_queries=2", "train.group_size=2",
            *[f"train.sampling.{s}.max_tokens=4" for s in ("attempt1", "reflection", "attempt2")], *extra]


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result, needle: str) -> str:
    """exit != 0, no traceback, and the error is exactly one line containing `needle`."""
    text = result.output                             # click >= 8.2: stdout and stderr as the user sees them
    assert result.exit_code not in (0, None), text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in text, text
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, text
    assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A full tiny-random model directory and a LoRA adapter on it (with its base-model record)."""
    from rrr.checkpoint import record_base_model
    from rrr.config import compose
    from rrr.models import apply_lora, load_model

    root = tmp_path_factory.mktemp("models")
    cfg = compose(["model=tiny-random", "model.device=cpu"])
    model, tokenizer = load_model(cfg.model)
    model.save_pretrained(root / "full")
    tokenizer.save_pretrained(root / "full")
    peft = apply_lora(load_model(cfg.model)[0], cfg.model)
    peft.save_pretrained(root / "adapter")
    record_base_model(peft, root / "adapter")
    return root


def corrupt(path: Path, how: str) -> None:
    if how == "garbage":
        path.write_bytes(b"this is not the file you are looking for" * 10)
    else:                                            # truncated: the first half
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])


# ----------------------------------------------------------------------------- bad settings (item 4)

@pytest.mark.parametrize("args, needle", [
    ([*EVAL, "eval.sampling.attempt1.temperature=-1"], "eval.sampling.attempt1.temperature=-1 must be >= 0"),
    ([*EVAL, "eval.sampling.reflection.top_p=0"], "eval.sampling.reflection.top_p=0 must be in (0, 1]"),
    ([*EVAL, "eval.sampling.attempt2.max_tokens=0"], "eval.sampling.attempt2.max_tokens=0 must be an integer >= 1"),
    ([*EVAL, "eval.bootstrap_samples=0"], "eval.bootstrap_samples=0 must be >= 1"),
    ([*EVAL, "eval.limit=-1"], "eval.limit=-1 must be null"),
    ([*COLLECT, "collect.temperature=-1"], "collect.temperature=-1 must be >= 0"),
    ([*COLLECT, "collect.max_tokens=0"], "collect.max_tokens=0 must be an integer >= 1"),
    ([*COLLECT, "collect.top_p=1.5"], "collect.top_p=1.5 must be in (0, 1]"),
    ([*COLLECT, "data.limit=-2"], "data.limit=-2 must be null"),
    ([*COLLECT, "collect.samples_per_query=0"], "collect.samples_per_query must be >= 1 (paper: up to 64)"),
    ([*COLLECT, "collect.keep_attempts=0"], "collect.keep_attempts must be >= 1 (the trainer needs"),
    ([*EVAL, "eval.batch_queries=0"], "eval.batch_queries must be >= 1"),
    ([*COLLECT, "task.generated.num_numbers=[8]"], "at most 5 numbers"),
    ([*COLLECT, "task.generated.value_max=-3", "task.generated.value_min=-9"], "must lie in [0,"),
])
def test_impossible_settings_are_refused_before_any_work(tmp_path, args, needle):
    assert_one_line_error(cli(*args, f"out_root={tmp_path / 'out'}"), needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, needle", [
    (["train.lr=-1"], "train.lr=-1.0 must be > 0"),
    (["train.micro_batch_size=0"], "train.micro_batch_size must be >= 1"),
    (["train.sampling.reflection.temperature=-1"], "train.sampling.reflection.temperature=-1.0 must be >= 0"),
    (["train.sampling.attempt1.max_tokens=0"], "must be an integer >= 1"),
    (["train.leak=maybe"], "train.leak='maybe'; valid choices: keep, no_reward"),
    (["train.malloc_mmap_threshold_mb=-1"], "train.malloc_mmap_threshold_mb=-1.0: a size in MB >= 0"),
    (["train.malloc_mmap_threshold_mb=big"], "train.malloc_mmap_threshold_mb='big' has type str, but"),
    (["train.batch_queries=5"], "train.batch_queries=5 > the 3 failed queries"),
    (["logger=wandb", "logger.mode=online"], "logger.mode=online needs a wandb login"),
])
def test_impossible_train_settings_are_refused(tmp_path, failures, monkeypatch, extra, needle):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert_one_line_error(cli(*train_args(failures, *extra), f"out_root={tmp_path / 'out'}"), needle)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- bad inputs (item 5)

@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_or_truncated_failure_set(tmp_path, failures, how):
    corrupt(failures / "failures.parquet", how)
    assert_one_line_error(cli(*train_args(failures), f"out_root={tmp_path / 'out'}"), "failures.parquet is unreadable")


def test_wrong_schema_failure_set(tmp_path):
    (tmp_path / "f").mkdir()
    pd.DataFrame({"id": ["a"], "x": [1]}).to_parquet(tmp_path / "f" / "failures.parquet")
    assert_one_line_error(cli(*train_args(tmp_path / "f")), "is not a failure set (missing columns")


def test_failure_set_of_the_other_task(tmp_path, failures):
    args = train_args(failures)
    args[1] = "task=function_calling"
    assert_one_line_error(cli(*args), "holds countdown queries, but task=function_calling; pass task=countdown")


def test_train_failures_pointing_at_an_evaluate_run(tmp_path):
    run = tmp_path / "ev"
    (run / "parts").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"command": "evaluate"}))
    assert_one_line_error(cli(*train_args(run)), "is a 'evaluate' run, not a collect-failures run")


@pytest.mark.parametrize("what", ["full", "adapter"])
def test_corrupt_model_or_adapter_weights(tmp_path, saved_models, what):
    import shutil

    copy = tmp_path / what
    shutil.copytree(saved_models / what, copy)
    weights = copy / ("model.safetensors" if what == "full" else "adapter_model.safetensors")
    corrupt(weights, "garbage")
    result = cli(*EVAL, f"model.path={copy}", f"run_dir={tmp_path / 'run'}")
    assert_one_line_error(result, "cannot load the")
    assert not (tmp_path / "run").exists()


def test_adapter_on_another_base_model_is_refused(tmp_path, saved_models):
    manifest = json.loads((saved_models / "adapter" / "rrr_base_model.json").read_text())
    assert manifest["name"] == "tiny-random"
    args = [a if a != "model=tiny-random" else "model=smollm2-135m" for a in EVAL]
    assert_one_line_error(cli(*args, f"model.path={saved_models / 'adapter'}"),
                          "is a LoRA adapter for model=tiny-random, not model=smollm2-135m")


def test_parquet_source_pointing_at_a_csv(tmp_path):
    (tmp_path / "data.csv").write_text("target,nums\n6,\"[1,2,3]\"\n")
    assert_one_line_error(cli(*COLLECT, "task.source=parquet", f"task.path={tmp_path / 'data.csv'}"),
                          "is not a readable parquet file")


def test_non_utf8_jsonl_source(tmp_path):
    (tmp_path / "data.jsonl").write_bytes(b'{"query": "caf\xe9"}\n')
    args = ["collect-failures", "task=function_calling", "task.source=jsonl", f"task.path={tmp_path / 'data.jsonl'}",
            *TINY, "data.limit=1"]
    assert_one_line_error(cli(*args), "is not UTF-8 text")


def eval_run_dir(tmp_path: Path) -> Path:
    result = cli(*EVAL, f"run_dir={tmp_path / 'ev'}")
    assert result.exit_code == 0, result.output
    return tmp_path / "ev"


def test_compare_on_corrupt_results_or_summary(tmp_path):
    run = eval_run_dir(tmp_path)
    assert json.loads((run / "summary.json").read_text())["reflection"].keys() >= {"leak_share"}
    summary = (run / "summary.json").read_bytes()
    (run / "summary.json").write_text("{not json")
    assert_one_line_error(cli("compare", str(run), "--out", str(tmp_path / "c")), "summary.json is corrupt")
    (run / "summary.json").write_bytes(summary)
    corrupt(run / "results.parquet", "truncated")
    assert_one_line_error(cli("compare", str(run), "--out", str(tmp_path / "c")), "results.parquet is unreadable")


def test_corrupt_manifest_and_part_file(tmp_path):
    run = eval_run_dir(tmp_path)
    manifest = (run / "manifest.json").read_bytes()
    (run / "manifest.json").write_text("{")
    assert_one_line_error(cli(*EVAL, f"run_dir={run}"), "manifest.json is corrupt")
    (run / "manifest.json").write_bytes(manifest)
    corrupt(next((run / "parts").glob("part_*.parquet")), "garbage")
    assert_one_line_error(cli(*EVAL, f"run_dir={run}"), "is unreadable (")


def test_run_dir_that_is_a_file_and_out_root_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(cli(*EVAL, f"run_dir={tmp_path / 'file'}"), "is a file, not a directory")
    assert_one_line_error(cli(*EVAL, f"out_root={tmp_path / 'file' / 'sub'}"), "cannot be created")


def test_refused_resume_names_the_changed_key(tmp_path):
    run = eval_run_dir(tmp_path)
    assert_one_line_error(cli(*EVAL, f"run_dir={run}", "eval.sampling.reflection.temperature=0.3"),
                          "different settings (sampling.reflection.temperature)")


def test_a_failed_start_leaves_nothing_that_refuses_the_corrected_command(tmp_path):
    run = tmp_path / "run"
    assert_one_line_error(cli(*EVAL, "model.dtype=fp8", f"run_dir={run}"), "model.dtype='fp8'")
    assert not run.exists()
    result = cli(*EVAL, f"run_dir={run}")
    assert result.exit_code == 0, result.output
    assert f"run dir: {run}" in result.output
    assert oct((run / "config.yaml").stat().st_mode & 0o777) == oct((run / "results.parquet").stat().st_mode & 0o777)


# ----------------------------------------------------------------------------- locks (item 3)

def test_a_run_dir_in_use_is_refused_naming_the_holder_and_a_stale_lock_is_taken_over(tmp_path):
    import socket

    run = eval_run_dir(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        assert_one_line_error(cli(*EVAL, f"run_dir={run}"), f"is in use by PID {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    result = cli(*EVAL, f"run_dir={run}")                      # the holder is gone: its lock is stale
    assert result.exit_code == 0, result.output
    assert "taking over the stale lock" in result.output




# ----------------------------------------------------------------------------- checkpoints

def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, failures, monkeypatch, capsys):
    from rrr import train_log, trainer
    from rrr.config import compose

    trainer_fakes.install(monkeypatch, trainer)
    cfg = compose(train_args(failures, "train.save_every=1", "train.steps=3", f"run_dir={tmp_path / 'run'}")[1:])
    real = trainer_fakes.crash_in_step(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.run(cfg)
    monkeypatch.setattr(train_log, "peak_rss_gb", real)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00001", "step_00002"]
    corrupt(ckpts / "step_00002" / "adapter_model.safetensors", "garbage")
    capsys.readouterr()
    trainer.run(cfg)
    out = capsys.readouterr()
    assert "checkpoint" in out.err and "step_00002" in out.err and "falling back" in out.err
    assert "from step_00001 (step 1)" in out.out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_ctrl_c_names_the_run_dir_on_its_own_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import rrr.evaluate
    from rrr import run_dir
    from rrr.cli import app

    def interrupted(cfg):
        monkeypatch.setattr(run_dir, "CURRENT_RUN", tmp_path / "run")
        raise KeyboardInterrupt

    monkeypatch.setattr(rrr.evaluate, "run", interrupted)
    result = CliRunner().invoke(app, ["evaluate"])
    assert result.exit_code == 130 and "Traceback" not in result.output
    lines = result.output.splitlines()
    assert lines[0] == "" and lines[1].startswith("error: interrupted")         # not glued to a progress bar
    assert lines[2] == f"  run_dir={tmp_path / 'run'}"                           # the path, on its own line
