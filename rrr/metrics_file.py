"""`metrics.jsonl`: one JSON row per training step, appended and fsynced line by line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rrr.atomic import atomic_write_text


class MetricsWriter:
    """Append-only JSONL; each line is flushed and fsynced so a crash loses at most the current line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, default=_jsonable) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (a resumed run re-does those steps)."""
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines()
                if ln.strip() and _row_step(ln) is not None and _row_step(ln) <= step]
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))


def _row_step(line: str) -> int | None:
    try:
        return int(json.loads(line).get("step"))
    except (ValueError, TypeError, json.JSONDecodeError):
        return None


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def read_metrics(run: str | Path):
    import pandas as pd

    path = Path(run) / "metrics.jsonl"
    return pd.read_json(path, lines=True) if path.exists() and path.stat().st_size else pd.DataFrame()
