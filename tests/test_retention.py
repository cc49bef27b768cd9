"""train.keep_checkpoints: the newest N step checkpoints and `final` stay, the one a resume loads is
never deleted, and a deletion killed midway leaves nothing the loader would pick."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rrr import checkpoint as ckpt
from rrr.config import UserError, compose
from rrr.validate import check


def fake_checkpoint(run: Path, name: str, step: int, complete: bool = True) -> Path:
    path = run / "checkpoints" / name
    path.mkdir(parents=True)
    (path / ckpt.STATE_JSON).write_text(json.dumps({"step": step, "cursor": {}}))
    if complete:
        (path / ckpt.COMPLETE).write_text(f"{step}\n")
    return path


def names(run: Path) -> set[str]:
    return {p.name for p in (run / "checkpoints").iterdir()}


def test_keeps_the_newest_n_step_checkpoints_and_final(tmp_path):
    for step in (1, 2, 3, 10, 11):            # 10 and 11 sort by step, not as text of equal width only
        fake_checkpoint(tmp_path, ckpt.checkpoint_name(step), step)
    fake_checkpoint(tmp_path, "final", 11)
    fake_checkpoint(tmp_path, "step_00012", 12, complete=False)   # incomplete: not counted, not touched
    (tmp_path / "checkpoints" / ".step_00013.x.tmp").mkdir()       # a temp dir: remove_partial's business
    deleted = ckpt.prune_checkpoints(tmp_path, 2, newest_step=11)
    assert sorted(p.name for p in deleted) == ["step_00001", "step_00002", "step_00003"]
    assert names(tmp_path) == {"step_00010", "step_00011", "final", "step_00012", ".step_00013.x.tmp"}
    assert ckpt.latest_checkpoint(tmp_path).name == "final"


@pytest.mark.parametrize("keep", [None, 0])
def test_null_or_zero_keeps_all(tmp_path, keep):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, ckpt.checkpoint_name(step), step)
    assert ckpt.prune_checkpoints(tmp_path, keep, newest_step=3) == []
    assert names(tmp_path) == {"step_00001", "step_00002", "step_00003"}


def test_never_deletes_the_checkpoint_just_written_nor_a_later_one(tmp_path):
    """A run that fell back past a damaged step_00006 to step_00004 writes step_00005: keep=1 keeps
    step_00005 (what a resume now needs), deletes step_00004, and leaves step_00006 for the run to
    overwrite when it gets there."""
    for step in (4, 5, 6):
        fake_checkpoint(tmp_path, ckpt.checkpoint_name(step), step)
    deleted = ckpt.prune_checkpoints(tmp_path, 1, newest_step=5)
    assert [p.name for p in deleted] == ["step_00004"]
    assert names(tmp_path) == {"step_00005", "step_00006"}


def test_a_deletion_killed_midway_leaves_a_tombstone_the_loader_ignores(tmp_path, monkeypatch):
    for step in (1, 2):
        fake_checkpoint(tmp_path, ckpt.checkpoint_name(step), step)

    def killed(path, ignore_errors=False):       # the process dies after the rename, before the removal
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune_checkpoints(tmp_path, 1, newest_step=2)
    monkeypatch.undo()
    assert names(tmp_path) == {"step_00002", ".step_00001.deleted"}
    (tmp_path / "checkpoints" / "step_00002" / ckpt.COMPLETE).unlink()     # even with nothing else left,
    assert ckpt.latest_checkpoint(tmp_path) is None                        # the tombstone is never loaded
    ckpt.remove_partial(tmp_path)
    assert names(tmp_path) == {"step_00002"}


@pytest.mark.parametrize("value", ["-1", "1.5"])
def test_a_bad_keep_checkpoints_is_refused(value):
    with pytest.raises(UserError, match="train.keep_checkpoints"):      # Hydra's type check, or ours
        check(compose(["task=countdown", f"train.keep_checkpoints={value}"]), "train")


def test_a_run_keeps_what_it_is_told_and_resumes_with_another_limit(tmp_path, failures, monkeypatch):
    from fakes import trainer as trainer_fakes
    from rrr import trainer

    trainer_fakes.install(monkeypatch, trainer)
    args = ["task=countdown", "model=tiny-random", f"train.failures={failures}", f"run_dir={tmp_path / 'run'}",
            "train.batch_queries=2", "train.group_size=2", "train.save_every=1", "log.progress=false",
            "engine.max_logprob_diff=null", *[f"train.sampling.{s}.max_tokens=4" for s in ("attempt1", "reflection", "attempt2")]]
    run = trainer.run(compose([*args, "train.steps=4", "train.keep_checkpoints=3"]))
    assert names(run) == {"step_00002", "step_00003", "step_00004", "final"}
    for name in ("final", "step_00004"):              # as if killed after step 3's checkpoint
        shutil.rmtree(run / "checkpoints" / name)
    run = trainer.run(compose([*args, "train.steps=4", "train.keep_checkpoints=1"]))   # may change on resume
    assert names(run) == {"step_00004", "final"}
