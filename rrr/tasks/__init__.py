"""Tasks: a data source + prompt rendering + a verifier, behind one small interface.

Each task module (`countdown`, `function_calling`) provides three functions:
    load(task_cfg, split, limit, seed) -> list[Example]
    messages(example, prompts_cfg) -> list[dict]        # chat messages (system + user) for attempt 1
    verify(example, completion) -> Verdict
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import import_module
from types import ModuleType
from typing import Any

TASKS = ("countdown", "function_calling")


@dataclass(frozen=True)
class Example:
    id: str                      # stable across runs (hash of content or the source's own id)
    task: str                    # "countdown" | "function_calling"
    source: str                  # e.g. "generated", "hub", "parquet", "xlam", "jsonl", "bfcl:live_simple"
    fields: dict[str, Any] = field(default_factory=dict)  # task-specific (see each task module)

    def to_row(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task, "source": self.source,
                # key order kept: the prompt renders tool specs from these fields, and a stored attempt 1
                # must continue the very prompt it was sampled after (sorted keys changed BFCL prompts)
                "fields": json.dumps(self.fields)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Example":
        f = row["fields"]
        return cls(id=str(row["id"]), task=row["task"], source=row["source"],
                   fields=json.loads(f) if isinstance(f, str) else dict(f))


def excluded_ids(task: Any, task_cfg: Any, split: str) -> list[str]:
    """Example ids a task leaves out of `split` (e.g. BFCL entries whose gold fails the verifier), for
    run manifests; a task without the hook excludes nothing."""
    hook = getattr(task, "excluded", None)
    return list(hook(task_cfg, split)) if hook else []


def get_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    return import_module(f"rrr.tasks.{name}")
