"""rrr.run_dir.RunDir (unit): the life cycle every command runs (plan → lock → check_resumable → claim →
write_run_files → finish), one writer per run dir, refused resumes, and atomic writes under a crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from rrr import run_dir as run_dir_module
from rrr.atomic import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_parquet, atomic_write_text
from rrr.config import UserError
from rrr.run_dir import RunDir, changed_keys
from rrr.run_lock import lock_run_dir, unlock_run_dir

REPO = Path(__file__).resolve().parent.parent
FP = {"train": {"lr": 1e-5, "steps": 10}, "seed": 0}


def cfg_for(root: Path, **more):
    return OmegaConf.create({"out_root": str(root), "name": "demo", "seed": 3, "lr": "${seed}", **more})


def holder_process(code: str) -> subprocess.Popen:
    """A second python process that runs `code`, prints 'ready' and sleeps (killed by the test)."""
    return subprocess.Popen([sys.executable, "-c", code + "; print('ready', flush=True); import time; time.sleep(60)"],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def wait_ready(proc: subprocess.Popen) -> None:
    for line in proc.stdout:                                  # EOF (the process died) ends the loop
        if line.strip() == "ready":
            return
    raise AssertionError(f"the holder process exited with {proc.wait()}")


def test_life_cycle_plan_claim_write_finish(tmp_path, capsys):
    cfg = cfg_for(tmp_path)
    rundir = RunDir.open(cfg, "evaluate", FP)
    assert rundir.path.parent == tmp_path / "evaluate" and rundir.path.name.endswith("-demo")
    assert not rundir.path.exists()                          # planned, not created: a failed start leaves nothing
    assert rundir.claim() == rundir.path and rundir.path.is_dir()
    assert f"run dir: {rundir.path}" in capsys.readouterr().out
    assert run_dir_module.CURRENT_RUN == rundir.path         # what Ctrl-C names
    assert json.loads((rundir.path / ".lock").read_text())["pid"] == os.getpid()
    rundir.write_run_files(cfg, extra={"task": "countdown"})
    assert OmegaConf.load(rundir.path / "config.yaml").lr == 3   # resolved
    manifest = rundir.manifest()
    assert manifest["command"] == "evaluate" and manifest["seed"] == 3 and manifest["task"] == "countdown"
    assert manifest["resume_fingerprint"] == FP and "finished" not in manifest
    assert set(manifest) >= {"started", "argv", "git_sha", "versions", "host"}
    rundir.finish(summary={"n": 5})
    done = rundir.manifest()
    assert done["summary"] == {"n": 5} and done["finished"] and done["started"] == manifest["started"]

    # a second invocation on the same run dir with the same settings continues it; the start time stays
    rundir.update_manifest(started="2020-01-01T00:00:00+0000")
    again = RunDir.open(cfg_for(tmp_path, run_dir=str(rundir.path)), "evaluate", FP)
    assert again.path == rundir.path
    again.claim()
    again.write_run_files(cfg)
    assert again.manifest()["started"] == "2020-01-01T00:00:00+0000"


def test_a_new_run_never_reuses_an_existing_directory(tmp_path):
    first = RunDir.plan(cfg_for(tmp_path), "train")
    first.claim()
    second = RunDir.plan(cfg_for(tmp_path), "train")
    assert second.path != first.path and second.path.name.startswith(first.path.name)


def test_a_second_writer_is_refused_while_the_first_holds_the_run_dir(tmp_path):
    run = tmp_path / "run"
    proc = holder_process(f"from pathlib import Path; from rrr.run_dir import RunDir; "
                          f"RunDir(Path({str(run)!r}), 'evaluate').claim()")
    try:
        wait_ready(proc)
        with pytest.raises(UserError, match=f"in use by PID {proc.pid}"):
            RunDir.open(cfg_for(tmp_path, run_dir=str(run)), "evaluate", FP)      # refused before reading it
        with pytest.raises(UserError, match=f"in use by PID {proc.pid}"):
            RunDir(run, "evaluate").claim()
    finally:
        proc.kill()
        proc.wait()
    RunDir.open(cfg_for(tmp_path, run_dir=str(run)), "evaluate", FP)              # the holder died: taken over
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    unlock_run_dir(run)
    assert not (run / ".lock").exists()


@pytest.mark.parametrize("command, fingerprint, words", [
    ("evaluate", {**FP, "train": {"lr": 2e-5, "steps": 10}}, "different settings (train.lr)"),
    ("train", FP, "is a 'evaluate' run, not 'train'"),
])
def test_a_resume_with_other_settings_or_another_command_is_refused(tmp_path, command, fingerprint, words):
    rundir = RunDir.open(cfg_for(tmp_path), "evaluate", FP)
    rundir.claim()
    rundir.write_run_files(cfg_for(tmp_path))
    before = (rundir.path / "manifest.json").read_text()
    with pytest.raises(UserError) as e:
        RunDir.open(cfg_for(tmp_path, run_dir=str(rundir.path)), command, fingerprint)
    assert words in str(e.value)
    assert (rundir.path / "manifest.json").read_text() == before       # nothing written by the refused run


def test_a_run_dir_that_is_a_file_or_has_a_corrupt_manifest_is_one_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        RunDir.plan(cfg_for(tmp_path, run_dir=str(tmp_path / "file")), "evaluate")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="manifest.json is corrupt"):
        RunDir.open(cfg_for(tmp_path, run_dir=str(tmp_path / "run")), "evaluate", FP)


def test_a_killed_atomic_write_leaves_the_old_file_whole(tmp_path):
    """kill -9 between writing the data and the rename: the target still holds the old content."""
    path = tmp_path / "summary.json"
    path.write_bytes(b"old")
    code = ("import os, time; from rrr import atomic; "
            "os.fsync = lambda fd: (print('ready', flush=True), time.sleep(60)); "
            f"atomic.atomic_write_bytes({str(path)!r}, b'new' * 100_000)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "ready"      # the data is written to the temp file
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert path.read_bytes() == b"old"


def test_a_failed_atomic_write_leaves_no_partial_or_temp_file(tmp_path, monkeypatch):
    from rrr import atomic

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(tmp_path / "a.json", b"x" * 1000)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_parquet(tmp_path / "t.parquet", pd.DataFrame({"a": range(100)}))
    monkeypatch.undo()
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "ckpt") as tmp:
            (tmp / "weights").write_bytes(b"w")
            raise RuntimeError("crash while saving")
    assert list(tmp_path.iterdir()) == []                     # no target, no temp file or directory


def test_run_files_are_0644_like_parquet_files(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.md", "x")
        atomic_write_json(tmp_path / "manifest.json", {})
        atomic_write_parquet(tmp_path / "t.parquet", pd.DataFrame({"a": [1]}))
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
    assert set(modes.values()) == {oct(0o666 & ~old)}, modes


def test_changed_keys_are_dotted_leaves():
    old = {"train": {"lr": 1e-5, "sampling": {"reflection": {"temperature": 1.0}}}, "seed": 0}
    new = {"train": {"lr": 2e-5, "sampling": {"reflection": {"temperature": 0.7}}}, "seed": 0}
    assert changed_keys(old, new) == ["train.lr", "train.sampling.reflection.temperature"]
    assert changed_keys({"a": 1}, {"a": 1, "b": 2}) == ["b"]


def test_two_processes_cannot_hold_one_run_dir(tmp_path):
    (tmp_path / "r").mkdir()
    code = (f"from pathlib import Path; from rrr.run_lock import lock_run_dir; lock_run_dir(Path({str(tmp_path / 'r')!r}));"
            "print('locked', flush=True); import time; time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"PID {proc.pid}"):
            lock_run_dir(tmp_path / "r")
    finally:
        proc.kill()
        proc.wait()
    lock_run_dir(tmp_path / "r")                              # dead holder: taken over
    assert json.loads((tmp_path / "r" / ".lock").read_text())["pid"] == os.getpid()
    unlock_run_dir(tmp_path / "r")
    assert not (tmp_path / "r" / ".lock").exists()
