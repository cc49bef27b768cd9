"""Issue #12, item 6 and the small pieces: the verifier's call cap follows the gold, run files are 0644,
refused resumes name the changed key."""

from __future__ import annotations

import json
import os
import time

import pandas as pd

from rrr.atomic import atomic_write_json, atomic_write_parquet, atomic_write_text
from rrr.run_dir import changed_keys
from rrr.verifiers import function_calling as fc


def calls(n: int) -> list[dict]:
    return [{"name": f"f{i}", "arguments": {"x": i}} for i in range(n)]


def test_a_correct_answer_with_more_calls_than_the_old_cap_is_correct():
    gold = calls(fc.MAX_CALLS + 44)                                   # 300 calls
    text = "".join(f"<tool_call>{json.dumps(c)}</tool_call>" for c in gold)
    assert fc.verify(text, gold).correct
    bfcl_gold = [{c["name"]: {"x": [c["arguments"]["x"]]}} for c in gold]
    docs = [{"name": c["name"], "parameters": {"properties": {"x": {"type": "integer"}}, "required": ["x"]}}
            for c in gold]
    assert fc.verify_bfcl(json.dumps(gold), bfcl_gold, docs).correct
    assert fc.call_cap(1) == fc.MAX_CALLS and fc.call_cap(300) == 600


def test_a_flood_of_calls_stays_bounded_and_cheap():
    flood = "<tool_call>" + json.dumps(calls(1)[0]) + "</tool_call>"
    text = flood * 50_000
    t0 = time.perf_counter()
    verdict = fc.verify(text, calls(1))
    assert verdict.reason == "unparsable" and time.perf_counter() - t0 < 1.0


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
