"""Save on signal (issue #23 item 1): SIGTERM / SIGUSR1 stop `rrr train` after the current step with a
checkpoint and exit 75; the same command resumes and ends exactly where an uninterrupted run ends.
collect-failures and evaluate stop after the part in flight is written, and resume from their parts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from rrr.train_log import TIMING_KEYS
from rrr import preemption
from rrr.checkpoint import COMPLETE
from rrr.config import compose

TIMING = TIMING_KEYS
TINY = ["model=tiny-random", "model.device=cpu", "log.progress=false"]


def rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_command(failures: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "rrr", "train", "task=countdown", *TINY, f"train.failures={failures}",
            f"run_dir={run}", "train.steps=4", "train.save_every=100", "train.batch_queries=2",
            "train.group_size=2", "train.lr=0.01", "engine.max_logprob_diff=null",
            *[f"train.sampling.{s}.max_tokens=8" for s in ("attempt1", "reflection", "attempt2")]]


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)])
def test_a_signal_mid_run_saves_exits_75_and_the_same_command_finishes_the_straight_run(tmp_path, failures, sig):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    done = subprocess.run(train_command(failures, straight), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    run = tmp_path / "preempted"
    args = train_command(failures, run)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, sig)                         # step 1 logged: the signal lands in step 1's tail or step 2
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == preemption.EXIT_RESUME, err[-2000:]
    stopped = len(rows(run))
    assert 1 <= stopped < 4 and f"stopped on {sig.name}: checkpoint step_{stopped:05d} written" in err
    assert "Traceback" not in err
    assert (run / "checkpoints" / f"step_{stopped:05d}" / COMPLETE).exists()
    assert not (run / "checkpoints" / "final").exists()

    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"from step_{stopped:05d} (step {stopped})" in resumed.stdout
    assert rows(run) == rows(straight) and [r["step"] for r in rows(run)] == [1, 2, 3, 4]
    a, b = (load_file(str(r / "checkpoints" / "final" / "adapter_model.safetensors")) for r in (straight, run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def signalled(monkeypatch):
    """The CLI's handlers installed in this (main) thread, and a real signal delivered to this process
    as the first part is written (the handler sets the flag; the pipeline polls it after the part)."""
    import rrr.parts

    write, sent = rrr.parts.write_part, []

    def write_then_signal(parts, rows):
        write(parts, rows)
        if not sent:                                   # once: the resumed run is not signalled
            sent.append(os.kill(os.getpid(), signal.SIGUSR1))

    assert preemption.install()
    yield lambda module: monkeypatch.setattr(module, "write_part", write_then_signal)
    preemption.uninstall()


def test_collect_failures_flushes_its_part_and_resumes(tmp_path, signalled):
    from rrr import failures

    signalled(failures)
    cfg = compose(["task=countdown", *TINY, "data.limit=3", "collect.samples_per_query=2",
                   "collect.max_tokens=4", "collect.batch_queries=1", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(preemption.Preempted, match="stopped on SIGUSR1: 1 of 3 queries written to parts/"):
        failures.run(cfg)
    assert len(list((tmp_path / "run" / "parts").glob("*.parquet"))) == 1
    preemption.uninstall()
    preemption.install()                                   # a fresh start: the flag is clear
    run = failures.run(cfg)
    ids = pd.concat(pd.read_parquet(p) for p in (run / "parts").glob("*.parquet")).id.tolist()
    assert len(ids) == len(set(ids)) == 3 and (run / "failures.parquet").exists()   # each query once


def test_evaluate_flushes_its_part_and_resumes(tmp_path, signalled):
    from rrr import evaluate

    signalled(evaluate)
    cfg = compose(["task=countdown", *TINY, "eval.limit=2", "eval.controls=[]", "eval.batch_queries=1",
                   f"run_dir={tmp_path / 'run'}",
                   *[f"eval.sampling.{s}.max_tokens=4" for s in ("attempt1", "reflection", "attempt2")]])
    with pytest.raises(preemption.Preempted, match="stopped on SIGUSR1: 1 of 2 examples"):
        evaluate.run(cfg)
    assert len(list((tmp_path / "run" / "parts").glob("*.parquet"))) == 1
    preemption.uninstall()
    preemption.install()
    run = evaluate.run(cfg)
    assert len(list((run / "parts").glob("*.parquet"))) == 2 and (run / "summary.json").exists()


def test_every_rank_stops_when_one_is_signalled(tmp_path):
    from fakes import dist_workers

    out = tmp_path / "agreed"
    dist_workers.spawn(dist_workers.preempt_one, 2, str(out))
    got = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    assert got == [[False, True, False], [False, True, True]]   # rank 0 was not signalled, and stops too


@pytest.mark.parametrize("command, module, caught", [("train", "trainer", True), ("verify", "verify", False)])
def test_only_the_pipelines_that_poll_catch_the_signals(monkeypatch, command, module, caught):
    """A command that never polls the flag (verify, benchmark) keeps SIGTERM's default: it must still die."""
    from importlib import import_module

    from typer.testing import CliRunner

    from rrr.cli import app

    seen = {}
    monkeypatch.setattr(import_module(f"rrr.{module}"), "run",
                        lambda cfg: seen.update(handler=signal.getsignal(signal.SIGTERM)))
    CliRunner().invoke(app, [command, "task=countdown"])
    assert (seen["handler"] is preemption._on_signal) == caught
    assert signal.getsignal(signal.SIGTERM) is not preemption._on_signal        # restored after the run
