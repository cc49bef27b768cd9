"""Test sets: several test sources in one `rrr evaluate` run, each scored and reported apart, so a gain on
the trained source can be told from transfer to other sources and tasks.

`eval.test_sets` empty (default) = one set, the run's `task.*` (as before). Otherwise a list of:
    bfcl:<category>          function calling on one BFCL category (any of the eight, live_* included)
    xlam                     function calling, the xLAM test split (hub, gated)
    jsonl:<path>             function calling, an xLAM-format local file's test split
    countdown                Countdown, generated test split
    countdown:hub            Countdown, Jiayi-Pan/Countdown-Tasks-3to4's test split
    countdown:parquet:<path> Countdown, a local parquet file's test split
or a mapping `{set: <one of those>, limit: N, name: NAME}` (limit defaults to `eval.limit`).

A set of the run's own task starts from the run's `task.*` and `prompts.*` (the user's overrides kept); a
set of the other task starts from that task's defaults (`conf/task/<task>.yaml`, `conf/prompts/<task>.yaml`).
Sampling (`eval.sampling`) and controls are shared by all sets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from rrr.config import UserError

FORMS = "bfcl:<category>, xlam, jsonl:<path>, countdown, countdown:hub, countdown:parquet:<path>"


@dataclass(frozen=True)
class TestSet:
    __test__ = False          # not a pytest test class
    name: str                 # e.g. "bfcl:multiple", "countdown:generated"
    task: str                 # task module: "function_calling" | "countdown"
    cfg: DictConfig           # the run's config with this set's task.* and prompts.*
    limit: int | None
    default: bool = False     # the one set of a run without eval.test_sets (today's behaviour)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.name)


# ----------------------------------------------------------------------------- names of sources

def source_name(task_cfg: Any) -> str:
    """The name of the test source a task config reads (also the default test set's name)."""
    src = str(task_cfg.source)
    if task_cfg.name == "function_calling":
        if src == "bfcl":
            return "bfcl:" + "+".join(str(c) for c in task_cfg.bfcl.test_categories)
        return "xlam" if src == "xlam" else f"jsonl:{Path(str(task_cfg.path)).name}"
    if src == "parquet":
        return f"countdown:parquet:{Path(str(task_cfg.path)).name}"
    return f"countdown:{src}"


def _sources(task_cfg: Any, split: str) -> set[str]:
    """The sources a split of a task config draws from (BFCL: one per category)."""
    if task_cfg.name == "function_calling" and str(task_cfg.source) == "bfcl":
        cats = task_cfg.bfcl.train_categories if split == "train" else task_cfg.bfcl.test_categories
        return {f"bfcl:{c}" for c in cats}
    return {source_name(task_cfg)}


def training_relation(test_task_cfg: Any, train_task_cfg: Any | None) -> str:
    """How a test set relates to what a model was trained on (the train run's task config)."""
    if train_task_cfg is None:
        return "unknown (no train run config)"
    if str(train_task_cfg.name) != str(test_task_cfg.name):
        return "unseen task"
    if _sources(test_task_cfg, "test") & _sources(train_task_cfg, "train"):
        return "trained source"
    return "same task, unseen source"


def trained_on(train_task_cfg: Any) -> str:
    return ", ".join(sorted(_sources(train_task_cfg, "train")))


# ----------------------------------------------------------------------------- building the sets

def _defaults(task: str) -> tuple[DictConfig, DictConfig]:
    from rrr.config import compose

    base = compose([f"task={task}"])
    return base.task, base.prompts


def _parse(entry: Any) -> tuple[str, int | None, str | None, bool]:
    """(spec, limit, name, has_limit) of one eval.test_sets entry."""
    if isinstance(entry, (dict, DictConfig)):
        entry = dict(entry)
        bad = sorted(set(entry) - {"set", "limit", "name"})
        if bad or "set" not in entry:
            raise UserError(f"eval.test_sets entry {entry} needs `set` and may have `limit`, `name` (not {bad})")
        return str(entry["set"]), entry.get("limit"), entry.get("name"), "limit" in entry
    return str(entry), None, None, False


def _task_config(spec: str, cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """(task, task.* overrides) for one spec string."""
    head, _, rest = spec.partition(":")
    if head == "bfcl" and rest:
        from rrr.tasks.function_calling import BFCL_CATEGORIES

        if rest not in BFCL_CATEGORIES:
            raise UserError(f"eval.test_sets: unknown BFCL category {rest!r}; valid: {', '.join(BFCL_CATEGORIES)}")
        base = cfg.task if cfg.task.name == "function_calling" else _defaults("function_calling")[0]
        train = [c for c in base.bfcl.train_categories if c != rest]   # keep the train/test lists disjoint
        return "function_calling", {"source": "bfcl", "bfcl": {"test_categories": [rest], "train_categories": train}}
    if head == "xlam" and not rest:
        return "function_calling", {"source": "xlam"}
    if head == "jsonl" and rest:
        return "function_calling", {"source": "jsonl", "path": rest}
    if head == "countdown":
        src, _, path = rest.partition(":")
        if src in ("", "generated", "hub") and not path:
            return "countdown", {"source": src or "generated"}
        if src == "parquet" and path:
            return "countdown", {"source": "parquet", "path": path}
    raise UserError(f"eval.test_sets: cannot read {spec!r}; use one of {FORMS}")


def resolve(cfg: DictConfig) -> list[TestSet]:
    """The test sets of an evaluate config, in the order given; names are unique."""
    entries = list(cfg.eval.get("test_sets") or [])
    limit = None if cfg.eval.limit is None else int(cfg.eval.limit)
    if not entries:
        return [TestSet(name=source_name(cfg.task), task=str(cfg.task.name), cfg=cfg, limit=limit, default=True)]
    sets = []
    for entry in entries:
        spec, set_limit, name, has_limit = _parse(entry)
        task, overrides = _task_config(spec, cfg)
        task_cfg, prompts = (cfg.task, cfg.prompts) if task == cfg.task.name else _defaults(task)
        task_cfg = OmegaConf.merge(task_cfg, overrides)
        set_cfg = cfg.copy()
        with open_dict(set_cfg):
            set_cfg.task, set_cfg.prompts = task_cfg, prompts
        sets.append(TestSet(name=str(name or source_name(task_cfg)), task=task, cfg=set_cfg,
                            limit=(None if set_limit is None else int(set_limit)) if has_limit else limit))
    names = [s.name for s in sets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"eval.test_sets names {dup} more than once; give each entry its own `name`")
    return sets
