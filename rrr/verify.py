"""`rrr verify task=<task> input=FILE.jsonl`: grade the completions in a JSONL file, one verdict per line.

Each row carries the task's fields plus `completion`:
  countdown         nums, target
  function_calling  answers (+ optional tools): xLAM gold, lists or JSON strings as in the xLAM file; or
                    ground_truth + tools (or function): BFCL gold and function docs
A line that is not such a row is *malformed*: it is reported with its line number, written to the
verdicts as incorrect with an `error`, and counted in the accuracy denominator, never dropped.
Blank lines are not rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig

from rrr.config import UserError
from rrr.atomic import atomic_write_json, atomic_write_text
from rrr.provenance import sha256_file
from rrr.run_dir import RunDir
from rrr.verifiers import Verdict, countdown, function_calling

MAX_REPORTED = 20   # malformed lines printed one by one; the rest are summarised


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def verify_countdown_row(row: dict) -> Verdict:
    nums, target = row.get("nums"), row.get("target")
    if not (isinstance(nums, list) and all(_is_int(n) for n in nums)):
        raise ValueError("countdown rows need `nums`: a list of integers")
    if not _is_int(target):
        raise ValueError("countdown rows need `target`: an integer")
    return countdown.verify(row["completion"], nums, target)


def verify_function_calling_row(row: dict) -> Verdict:
    if "ground_truth" in row:
        tools = row.get("tools", row.get("function"))
        if tools is None:
            raise ValueError("BFCL rows (ground_truth) need `tools`: the function docs")
        return function_calling.verify_bfcl(row["completion"], row["ground_truth"], tools)
    if "answers" not in row:
        raise ValueError("function_calling rows need `answers` (xLAM) or `ground_truth` + `tools` (BFCL)")
    return function_calling.verify(row["completion"], row["answers"], row.get("tools"))


ROW_VERIFIERS = {"countdown": verify_countdown_row, "function_calling": verify_function_calling_row}


def verify_line(task: str, line: bytes) -> tuple[Verdict | None, str | None]:
    """(verdict, None) for a well-formed row, (None, error) for a malformed one."""
    try:
        row = json.loads(line.decode("utf-8"))
        if not isinstance(row, dict):
            raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        if not isinstance(row.get("completion"), str):
            raise ValueError("missing `completion` (a string)")
        return ROW_VERIFIERS[task](row), None
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError) as e:  # JSON/UTF-8 errors are ValueErrors
        return None, f"{type(e).__name__}: {str(e)[:200]}"


def verdict_rows(task: str, path: Path) -> Iterator[dict]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            verdict, error = verify_line(task, line)
            if verdict is None:
                yield {"line": lineno, "correct": False, "reason": "malformed", "error": error}
            else:
                yield {"line": lineno, "correct": verdict.correct, "reason": verdict.reason, "error": None}


def summarize(task: str, rows: list[dict]) -> dict:
    malformed = [r["line"] for r in rows if r["error"] is not None]
    correct = sum(r["correct"] for r in rows)
    return {"task": task, "rows": len(rows), "correct": correct,
            "accuracy": correct / len(rows) if rows else 0.0,
            "malformed": len(malformed), "malformed_lines": malformed}


def _input_path(cfg: DictConfig) -> Path:
    if not cfg.get("input"):
        raise UserError("no input file: pass input=FILE.jsonl (one JSON object per line with `completion`)")
    path = Path(str(cfg.input)).expanduser()
    if not path.is_file():
        raise UserError(f"input file {str(path)!r} not found: pass input=FILE.jsonl with an existing file")
    return path


def run(cfg: DictConfig) -> Path:
    task = str(cfg.task.name)
    if task not in ROW_VERIFIERS:
        raise UserError(f"rrr verify knows tasks {', '.join(ROW_VERIFIERS)}, not {task!r}")
    path = _input_path(cfg)
    rows = list(verdict_rows(task, path))
    summary = summarize(task, rows)

    rundir = RunDir.plan(cfg, "verify")
    run_dir = rundir.claim()
    rundir.write_run_files(cfg, extra={"input": str(path.resolve()), "input_sha256": sha256_file(path)})
    atomic_write_text(run_dir / "verdicts.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(run_dir / "summary.json", summary)

    for r in [r for r in rows if r["error"] is not None][:MAX_REPORTED]:
        print(f"line {r['line']}: malformed: {r['error']}")
    lines = ", ".join(map(str, summary["malformed_lines"][:MAX_REPORTED]))
    more = f", ... {summary['malformed'] - MAX_REPORTED} more" if summary["malformed"] > MAX_REPORTED else ""
    print(f"accuracy: {summary['correct']}/{summary['rows']} ({100 * summary['accuracy']:.1f}%) on {task}; "
          f"malformed: {summary['malformed']}" + (f" (lines {lines}{more})" if summary["malformed"] else ""))
    print(f"run dir: {run_dir}")
    return run_dir
