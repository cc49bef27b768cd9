"""`rrr verify` end to end through the CLI: one verdict per line, accuracy, malformed lines reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rrr.cli import app

runner = CliRunner()

COUNTDOWN_ROWS = [
    {"nums": [1, 2, 3], "target": 9, "completion": "<answer>(1+2)*3</answer>"},
    {"nums": [1, 2, 3], "target": 9, "completion": "<answer>1+2+3</answer>"},
    "not json at all",
    {"nums": [2, 2, 7], "target": 7, "completion": "<think>hm</think><answer>7/2*2 = 7</answer>"},
    "",                                                     # blank lines are not rows
    {"nums": "1,2,3", "target": 6, "completion": "<answer>1+2+3</answer>"},
    {"nums": [1, 2], "target": 3},
    [1, 2, 3],
]

TOOLS = [{"name": "live_giveaways_by_type", "description": "",
          "parameters": {"type": {"description": "", "type": "str", "default": "game"}}}]
ANSWERS = [{"name": "live_giveaways_by_type", "arguments": {"type": "beta"}},
           {"name": "live_giveaways_by_type", "arguments": {"type": "game"}}]
BFCL_DOC = {"name": "area", "description": "", "parameters": {"type": "dict", "properties": {
    "base": {"type": "integer"}, "unit": {"type": "string"}}, "required": ["base"]}}
FC_ROWS = [
    # xLAM, with tools/answers as JSON strings as in the xLAM file; the default may be left out
    {"completion": '<tool_call>{"name": "live_giveaways_by_type", "arguments": {"type": "beta"}}</tool_call>'
                   '<tool_call>{"name": "live_giveaways_by_type", "arguments": {}}</tool_call>',
     "answers": json.dumps(ANSWERS), "tools": json.dumps(TOOLS)},
    {"completion": json.dumps(ANSWERS[:1]), "answers": ANSWERS},
    {"completion": "[]", "answers": "[not json"},
    # BFCL
    {"completion": '[{"name": "area", "arguments": {"base": 10}}]',
     "ground_truth": [{"area": {"base": [10], "unit": ["units", ""]}}], "tools": [BFCL_DOC]},
    {"completion": '[{"name": "area", "arguments": {"base": 11}}]',
     "ground_truth": [{"area": {"base": [10], "unit": ["units", ""]}}], "function": [BFCL_DOC]},
    {"completion": "x", "ground_truth": [{"area": {"base": [10]}}]},          # BFCL without tools
    {"completion": "x"},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run_verify(tmp_path: Path, *overrides: str):
    return runner.invoke(app, ["verify", f"out_root={tmp_path / 'outputs'}", *overrides])


def read_run(tmp_path: Path) -> tuple[list[dict], dict]:
    (run,) = (tmp_path / "outputs" / "verify").iterdir()
    verdicts = [json.loads(x) for x in (run / "verdicts.jsonl").read_text().splitlines()]
    assert (run / "manifest.json").exists() and (run / "config.yaml").exists()
    return verdicts, json.loads((run / "summary.json").read_text())


def test_verify_countdown(tmp_path):
    path = write_jsonl(tmp_path / "cd.jsonl", COUNTDOWN_ROWS)
    result = run_verify(tmp_path, "task=countdown", f"input={path}")
    assert result.exit_code == 0, result.output
    assert "accuracy: 2/7 (28.6%)" in result.output
    assert "malformed: 4 (lines 3, 6, 7, 8)" in result.output
    for line in (3, 6, 7, 8):
        assert f"line {line}: malformed" in result.output
    assert "run dir: " in result.output

    verdicts, summary = read_run(tmp_path)
    assert [v["line"] for v in verdicts] == [1, 2, 3, 4, 6, 7, 8]
    assert [v["correct"] for v in verdicts] == [True, False, False, True, False, False, False]
    assert verdicts[1]["reason"] == "wrong_value: got 6, want 9" and verdicts[1]["error"] is None
    assert verdicts[2]["reason"] == "malformed" and "JSON" in verdicts[2]["error"]
    assert "nums" in verdicts[4]["error"] and "completion" in verdicts[5]["error"]
    assert summary["correct"] == 2 and summary["rows"] == 7 and summary["malformed_lines"] == [3, 6, 7, 8]


def test_verify_function_calling_xlam_and_bfcl(tmp_path):
    path = write_jsonl(tmp_path / "fc.jsonl", FC_ROWS)
    result = run_verify(tmp_path, "task=function_calling", f"input={path}")
    assert result.exit_code == 0, result.output
    assert "accuracy: 2/7 (28.6%)" in result.output
    assert "malformed: 3 (lines 3, 6, 7)" in result.output
    verdicts, _ = read_run(tmp_path)
    assert [v["correct"] for v in verdicts] == [True, False, False, True, False, False, False]
    assert verdicts[1]["reason"].startswith("wrong_count")
    assert verdicts[4]["reason"].startswith("value_error")
    assert "tools" in verdicts[5]["error"] and "answers" in verdicts[6]["error"]


def test_malformed_utf8_line_is_reported(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"nums": [1], "target": 1, "completion": "<answer>1</answer>"}\n\xff\xfe{\n')
    result = run_verify(tmp_path, "task=countdown", f"input={path}")
    assert result.exit_code == 0, result.output
    assert "accuracy: 1/2 (50.0%)" in result.output and "malformed: 1 (lines 2)" in result.output


@pytest.mark.parametrize("overrides, message", [
    ((), "input=FILE.jsonl"),
    (("input=/nonexistent/rows.jsonl",), "not found"),
])
def test_missing_input_is_a_user_error(tmp_path, overrides, message):
    result = run_verify(tmp_path, "task=countdown", *overrides)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "outputs").exists()
