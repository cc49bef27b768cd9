"""Function-calling task: BFCL from the bfcl-eval wheel, xLAM-format files, hub errors, prompts, verify."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from rrr.config import UserError
from rrr.tasks import Example
from rrr.tasks import function_calling as fc

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "xlam_sample.json"   # 20 rows, hub format
BFCL_COUNTS = {"simple_python": 400, "multiple": 200, "parallel": 200, "parallel_multiple": 200,
               "live_simple": 258, "live_multiple": 1053, "live_parallel": 16, "live_parallel_multiple": 24}


def task_cfg(**overrides):
    cfg = OmegaConf.load(ROOT / "conf" / "task" / "function_calling.yaml")
    OmegaConf.set_struct(cfg, True)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    return cfg


def prompts_cfg():
    return OmegaConf.load(ROOT / "conf" / "prompts" / "function_calling.yaml")


def first_alternative(value: Any) -> Any:
    """A value BFCL accepts: the first listed alternative (dict alternatives recursively)."""
    if isinstance(value, dict):
        return {k: first_alternative(v[0]) for k, v in value.items() if v[0] != ""}
    return value


def bfcl_gold_completion(ground_truth: list[dict]) -> str:
    calls = [{"name": name, "arguments": {p: first_alternative(alts[0]) for p, alts in args.items() if alts[0] != ""}}
             for call in ground_truth for name, args in call.items()]
    return json.dumps(calls)


# ---- BFCL ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("category,count", BFCL_COUNTS.items())
def test_bfcl_category_counts_and_fields(category: str, count: int) -> None:
    xs = fc.load_bfcl_category(category)
    assert len(xs) == count and len({x.id for x in xs}) == count
    for x in xs:
        f = x.fields
        assert x.source == f"bfcl:{category}" and f["grader"] == "bfcl" and f["category"] == category
        assert isinstance(f["query"], str) and f["query"]
        assert isinstance(f["tools"], list) and all("name" in t for t in f["tools"])
        assert isinstance(f["ground_truth"], list) and f["ground_truth"]
        assert "answers" not in f
        json.dumps(x.to_row())   # rows must be serialisable for parquet outputs


def test_bfcl_system_messages_are_kept() -> None:
    with_system = [x for x in fc.load_bfcl_category("live_simple") if "system" in x.fields]
    assert len(with_system) == 11
    system, _ = fc.messages(with_system[0], prompts_cfg())
    assert system["content"].startswith(with_system[0].fields["system"])


# Entries whose gold answer contradicts their own function doc (no output can pass them).
GOLD_FAILS = {"live_simple": ["live_simple_106-63-0", "live_simple_112-68-0"],
              "live_multiple": ["live_multiple_507-149-4", "live_multiple_862-181-3", "live_multiple_964-207-0"]}


def test_bfcl_splits_are_the_configured_categories() -> None:
    train = fc.load(task_cfg(), "train", None, seed=0)
    test = fc.load(task_cfg(), "test", None, seed=0)
    kept = {c: n - len(GOLD_FAILS.get(c, [])) for c, n in BFCL_COUNTS.items()}
    assert Counter(x.fields["category"] for x in train) == {c: n for c, n in kept.items() if c.startswith("live_")}
    assert Counter(x.fields["category"] for x in test) == {c: n for c, n in kept.items() if not c.startswith("live_")}
    assert {x.id for x in train}.isdisjoint({x.id for x in test})


@pytest.mark.parametrize("category", fc.BFCL_CATEGORIES)
def test_gold_answers_that_fail_the_verifier_are_found(category: str) -> None:
    assert list(fc.gold_failures(category)) == GOLD_FAILS.get(category, [])


def test_gold_failures_are_excluded_reported_and_listed(capsys) -> None:
    fc._REPORTED.clear()
    train = fc.load(task_cfg(), "train", None, seed=0)
    bad = sorted(i for ids in GOLD_FAILS.values() for i in ids)
    assert not {x.id for x in train} & set(bad)
    err = capsys.readouterr().err
    assert "excluded 5 examples" in err and all(i in err for i in bad)
    fc.load(task_cfg(), "train", 10, seed=0)
    assert "excluded" not in capsys.readouterr().err            # reported once per process
    assert fc.excluded(task_cfg(), "train") == bad
    assert fc.excluded(task_cfg(), "test") == []
    assert fc.excluded(xlam_cfg(FIXTURE), "train") == []


def test_gold_completion_is_leaderboard_format_and_fails_where_the_doc_disagrees() -> None:
    ok = fc.load_bfcl_category("live_simple")[0]
    text = fc.gold_completion(ok)
    assert text.startswith("<tool_call>\n{") and text.endswith("}\n</tool_call>\n")
    assert fc.verify_strict(ok, text).correct and fc.gold_passes(ok)
    bad = next(x for x in fc.load_bfcl_category("live_simple") if x.id == "live_simple_106-63-0")
    assert not fc.gold_passes(bad)
    assert fc.verify(bad, fc.gold_completion(bad)).reason.startswith("missing_required")


def test_strict_verify_is_the_leaderboard_reading() -> None:
    x = fc.load_bfcl_category("simple_python")[0]
    fenced = "```json\n" + bfcl_gold_completion(x.fields["ground_truth"]) + "\n```"
    assert fc.verify(x, fenced).correct and not fc.verify_strict(x, fenced).correct
    assert fc.verify_strict(x, fc.gold_completion(x)).correct


def test_limit_is_a_seeded_mixed_sample() -> None:
    a = fc.load(task_cfg(), "test", 40, seed=0)
    assert len(a) == 40 and len({x.fields["category"] for x in a}) >= 3
    assert a == fc.load(task_cfg(), "test", 40, seed=0)
    assert fc.load(task_cfg(), "test", 10, seed=0) == a[:10]
    assert fc.load(task_cfg(), "test", 40, seed=1) != a


def test_bfcl_category_errors() -> None:
    with pytest.raises(UserError, match="both"):
        fc.load(task_cfg(bfcl__test_categories=["live_simple"]), "test", 5, seed=0)
    with pytest.raises(UserError, match="valid: simple_python"):
        fc.load(task_cfg(bfcl__test_categories=["simple_java"]), "test", 5, seed=0)


def test_bfcl_gold_calls_pass_through_verify() -> None:
    xs = fc.load(task_cfg(), "test", 30, seed=0) + fc.load(task_cfg(), "train", 30, seed=0)
    for x in xs:
        verdict = fc.verify(x, bfcl_gold_completion(x.fields["ground_truth"]))
        assert verdict.correct, (x.id, verdict.reason)
        assert not fc.verify(x, "[]").correct


# ---- xLAM format ---------------------------------------------------------------------------------------

def xlam_cfg(path: Path, **overrides):
    return task_cfg(source="jsonl", path=str(path), **overrides)


def test_xlam_file_loader_splits_48k_12k_style() -> None:
    test = fc.load(xlam_cfg(FIXTURE), "test", None, seed=0)
    train = fc.load(xlam_cfg(FIXTURE), "train", None, seed=0)
    assert len(test) == 4 and len(train) == 16                     # test_fraction 0.2 of 20 rows
    assert {x.id for x in test}.isdisjoint({x.id for x in train})
    assert {x.fields["query"] for x in test}.isdisjoint({x.fields["query"] for x in train})
    by_id = {x.id: x for x in test + train}
    first = by_id["xlam-0"]
    assert first.source == "jsonl" and first.fields["grader"] == "xlam"
    assert first.fields["tools"][0]["name"] == "live_giveaways_by_type"      # JSON strings were decoded
    assert first.fields["answers"] == [{"name": "live_giveaways_by_type", "arguments": {"type": "beta"}},
                                       {"name": "live_giveaways_by_type", "arguments": {"type": "game"}}]
    assert fc.load(xlam_cfg(FIXTURE), "train", 5, seed=0) == train[:5]


def test_xlam_json_lines_and_decoded_fields_load_the_same(tmp_path: Path) -> None:
    rows = json.loads(FIXTURE.read_text())
    jsonl = tmp_path / "xlam.jsonl"
    jsonl.write_text("\n".join(json.dumps({**r, "tools": json.loads(r["tools"]), "answers": json.loads(r["answers"])})
                               for r in rows) + "\n")
    assert fc.load(xlam_cfg(jsonl), "test", None, seed=0) == fc.load(xlam_cfg(FIXTURE), "test", None, seed=0)


def test_xlam_gold_answers_verify_and_wrong_ones_do_not() -> None:
    for x in fc.load(xlam_cfg(FIXTURE), "train", None, seed=0):
        assert fc.verify(x, json.dumps(x.fields["answers"])).correct, x.id
        wrong = [{**call, "name": call["name"] + "_x"} for call in x.fields["answers"]]
        assert not fc.verify(x, json.dumps(wrong)).correct


def test_xlam_file_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "query": "q", "tools": "[]", "answers": "[]"}\n{not json\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        fc.load(xlam_cfg(bad), "test", None, seed=0)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"id": 1, "query": "q", "tools": "[]"}\n')
    with pytest.raises(UserError, match="answers"):
        fc.load(xlam_cfg(missing), "test", None, seed=0)
    with pytest.raises(UserError, match="task.path"):
        fc.load(xlam_cfg(tmp_path / "absent.json"), "test", None, seed=0)


def test_offline_xlam_error_says_gated_and_how_to_use_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        fc.load(task_cfg(source="xlam"), "test", 5, seed=0)
    msg = str(err.value)
    assert "Salesforce/xlam-function-calling-60k" in msg and "gated" in msg and "task.source=jsonl" in msg


def test_unknown_source_is_a_user_error() -> None:
    with pytest.raises(UserError, match="bfcl, xlam, jsonl"):
        fc.load(task_cfg(source="csv"), "test", 5, seed=0)


# ---- prompts -------------------------------------------------------------------------------------------

def test_messages_carry_tools_query_and_format() -> None:
    x = Example(id="t", task="function_calling", source="jsonl",
                fields={"query": "Weather in {Paris}?", "grader": "xlam", "answers": [],
                        "tools": [{"name": "get_weather", "parameters": {"city": {"type": "str"}}}]})
    system, user = fc.messages(x, prompts_cfg())
    assert [system["role"], user["role"]] == ["system", "user"]
    assert user["content"] == "Weather in {Paris}?"
    assert json.dumps(x.fields["tools"][0]) in system["content"]
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in system["content"]
    assert "system" not in x.fields and not system["content"].startswith("None")


def test_prompt_templates_have_the_shared_keys() -> None:
    p = prompts_cfg()
    for key in ("system", "user", "feedback", "feedback_reason", "retry", "retry_no_reflection", "generic_reflection"):
        assert isinstance(p[key], str) and p[key].strip(), key
    assert p.feedback_with_reason is False and "{reason}" in p.feedback_reason
