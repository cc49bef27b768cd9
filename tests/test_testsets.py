"""eval.test_sets: spec strings → per-set task/prompt configs, names, limits, and how a set relates to
what a model was trained on."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from rrr.config import UserError, compose
from rrr.testsets import resolve, source_name, training_relation


def test_no_test_sets_is_the_one_source_of_task_as_before():
    (fc,) = resolve(compose(["task=function_calling", "eval.limit=7"]))
    assert fc.default and fc.task == "function_calling" and fc.limit == 7
    assert fc.name == "bfcl:simple_python+multiple+parallel+parallel_multiple"
    (cd,) = resolve(compose(["task=countdown"]))
    assert cd.name == "countdown:generated" and cd.task == "countdown"


def test_each_spec_gets_its_own_task_and_prompts():
    cfg = compose(["task=function_calling", "prompts.feedback_with_reason=true", "eval.limit=5",
                   "eval.test_sets=[bfcl:simple_python,bfcl:live_multiple,countdown,{set:bfcl:multiple,limit:2}]"])
    sets = resolve(cfg)
    assert [s.name for s in sets] == ["bfcl:simple_python", "bfcl:live_multiple", "countdown:generated", "bfcl:multiple"]
    assert [s.limit for s in sets] == [5, 5, 5, 2]
    live = sets[1].cfg.task
    assert list(live.bfcl.test_categories) == ["live_multiple"]
    assert "live_multiple" not in live.bfcl.train_categories              # kept disjoint for the loader
    # a set of the run's own task keeps the user's overrides; another task starts from its defaults
    assert sets[0].cfg.prompts.feedback_with_reason is True
    countdown = sets[2].cfg
    assert countdown.task.name == "countdown" and countdown.prompts == compose(["task=countdown"]).prompts
    assert cfg.task.name == "function_calling" and list(cfg.task.bfcl.test_categories) != ["live_multiple"]


def test_a_set_loads_its_own_examples():
    cfg = compose(["task=function_calling", "eval.test_sets=[bfcl:multiple,bfcl:parallel]"])
    for s in resolve(cfg):
        from rrr.tasks import get_task

        examples = get_task(s.task).load(s.cfg.task, "test", 3, 0)
        assert len(examples) == 3 and {e.source for e in examples} == {s.name}


@pytest.mark.parametrize("sets, words", [
    ("[bfcl:simple]", "unknown BFCL category 'simple'"),
    ("[gsm8k]", "cannot read 'gsm8k'"),
    ("[countdown:parquet]", "cannot read"),
    ("[bfcl:multiple,bfcl:multiple]", "more than once"),
    ("[{limit:3}]", "needs `set`"),
])
def test_bad_entries_are_user_errors(sets, words):
    with pytest.raises(UserError, match=words):
        resolve(compose(["task=function_calling", f"eval.test_sets={sets}"]))


def test_training_relation_names_trained_source_unseen_source_and_unseen_task():
    train = compose(["task=function_calling", "task.bfcl.train_categories=[live_simple]"]).task
    def rel(spec):
        (s,) = resolve(compose(["task=function_calling", f"eval.test_sets=[{spec}]"]))
        return training_relation(s.cfg.task, train)
    assert rel("bfcl:live_simple") == "trained source"
    assert rel("bfcl:multiple") == "same task, unseen source"
    assert rel("countdown") == "unseen task"
    assert training_relation(compose(["task=countdown"]).task, compose(["task=countdown"]).task) == "trained source"
    xlam = OmegaConf.merge(train, {"source": "xlam"})
    assert training_relation(xlam, xlam) == "trained source"                 # its held-out split
    assert training_relation(xlam, None).startswith("unknown")
    assert source_name(OmegaConf.merge(train, {"source": "jsonl", "path": "/d/f.jsonl"})) == "jsonl:f.jsonl"
