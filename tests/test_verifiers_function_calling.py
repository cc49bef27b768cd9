"""Function-calling verifiers: parsing forms and precedence, xLAM multiset matching, BFCL rules (with a
parity check against BFCL's own checker on real BFCL data), and timing bounds on hostile input."""

from __future__ import annotations

import json
import random
import sys
import time
import types
from collections import defaultdict

import pytest

from rrr.verifiers import Verdict
from rrr.verifiers import function_calling as fc
from rrr.verifiers.function_calling import (MAX_CALLS, parse_calls, parse_calls_strict, standardize_string,
                                            verify, verify_bfcl)

F1 = {"name": "f", "arguments": {"a": 1}}
G2 = {"name": "g", "arguments": {"b": "x"}}


def calls_json(*calls) -> str:
    return json.dumps(list(calls))


def tool_call(call) -> str:
    return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"


# ---------------------------------------------------------------- parsing: the accepted forms

@pytest.mark.parametrize("completion", [
    tool_call(F1),
    f"Let me call it.\n{tool_call(F1)}\n",
    f"<tool_call>{json.dumps([F1])}</tool_call>",                       # an array inside one block
    f"```json\n{calls_json(F1)}\n```",
    f"```\n{json.dumps(F1)}\n```",
    f"```JSON\n{calls_json(F1)}\n```",
    calls_json(F1),
    json.dumps(F1),                                                     # a single object
    f"Here is the call: {calls_json(F1)}",                             # array after prose
    f"Here is the call: {calls_json(F1)} Hope that helps {{:)}}.",     # ... and before prose
    f"I'll use f: {json.dumps(F1)}",                                    # object after prose
    f"Note [see below]\n{calls_json(F1)}",                              # balanced prose brackets first
    f"Note [unclosed prose\n{calls_json(F1)}",                          # unbalanced prose bracket
    f'A 5" screen: {calls_json(F1)}',                                   # a stray quote in prose
    json.dumps([{"name": "f", "arguments": json.dumps({"a": 1})}]),     # arguments as a JSON string
    json.dumps([{"id": 7, "type": "function", "name": "f", "arguments": {"a": 1}}]),  # other keys ignored
])
def test_parse_forms(completion):
    assert parse_calls(completion) == [F1]


def test_parse_several_tool_call_blocks_in_order():
    assert parse_calls(tool_call(F1) + "\n" + tool_call(G2)) == [F1, G2]
    assert parse_calls(tool_call(G2) + tool_call(F1)) == [G2, F1]


def test_parse_empty_array_is_no_calls():
    assert parse_calls("[]") == [] == parse_calls("<tool_call>[]</tool_call>") == parse_calls("```json\n[]\n```")
    assert verify("[]", []).correct
    assert not verify("[]", [F1]).correct


def test_strings_with_brackets_inside_arguments():
    call = {"name": "f", "arguments": {"q": "a]b}c[d{\"e"}}
    assert parse_calls(f"Call: {json.dumps([call])} done") == [call]


# ---------------------------------------------------------------- parsing: precedence

def test_tool_call_blocks_win_over_fences_and_bare_json():
    text = f"```json\n{calls_json(G2)}\n```\n{tool_call(F1)}\n{calls_json(G2)}"
    assert parse_calls(text) == [F1]


def test_fenced_block_wins_over_bare_json():
    assert parse_calls(f"{calls_json(G2)}\n```json\n{calls_json(F1)}\n```\n{calls_json(G2)}") == [F1]


def test_last_fenced_block_wins():
    assert parse_calls(f"```json\n{calls_json(G2)}\n```\n```json\n{calls_json(F1)}\n```") == [F1]


def test_fences_of_other_languages_are_not_json():
    assert parse_calls(f"```python\nf(a=1)\n```\n{calls_json(F1)}") == [F1]


def test_last_bare_json_wins_and_non_call_json_is_skipped():
    assert parse_calls(f"first {calls_json(G2)} then {calls_json(F1)}") == [F1]
    assert parse_calls(f"{calls_json(F1)} see [1] and {{\"k\": 2}}") == [F1]
    assert parse_calls(f"{calls_json(F1)} and an empty list [] in prose") == [F1]


# ---------------------------------------------------------------- parsing: unparsable

@pytest.mark.parametrize("completion", [
    "",
    "I cannot help with that.",
    '[{"name": "f", "arguments": {"a": 1}]',                   # invalid JSON
    '[{"name": 3, "arguments": {}}]',                          # name not a string
    '[{"arguments": {"a": 1}}]',                               # no name
    '[{"name": "f"}]',                                         # no arguments
    '[{"name": "f", "arguments": [1]}]',                       # arguments not an object
    '[{"name": "f", "arguments": "not json"}]',                # a string that is not JSON
    '[{"name": "f", "arguments": "[1, 2]"}]',                  # a JSON string that is not an object
    '[{"name": "f", "arguments": {}}, 5]',                     # one bad item
    '[{"name": "f", "arguments": {"a": NaN}}]',                # not JSON
    '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>oops</tool_call>',  # one bad block
    '```json\n{"name": "f", "arguments": \n```',               # a broken fenced block
    '"f(a=1)"',
])
def test_unparsable_is_incorrect(completion):
    assert parse_calls(completion) is None
    v = verify(completion, [F1])
    assert not v.correct and v.reason.startswith("unparsable")
    assert not verify_bfcl(completion, [{"f": {"a": [1]}}], [DOC_F]).correct


def test_too_many_calls_is_unparsable():
    assert parse_calls(calls_json(*[F1] * MAX_CALLS)) is not None
    assert parse_calls(calls_json(*[F1] * (MAX_CALLS + 1))) is None


# ---------------------------------------------------------------- xLAM matching

def c(name: str, **arguments) -> dict:
    return {"name": name, "arguments": arguments}


@pytest.mark.parametrize("pred, gold", [
    ([c("f", a=1)], [c("f", a=1)]),
    ([c("g", b="x"), c("f", a=1)], [c("f", a=1), c("g", b="x")]),          # order-insensitive
    ([c("f", a=1), c("f", a=2)], [c("f", a=2), c("f", a=1)]),
    ([c("f", a=1), c("f", a=1)], [c("f", a=1), c("f", a=1)]),              # repeated calls
    ([c("f", a=5)], [c("f", a=5.0)]),                                       # int/float numerically
    ([c("f", a=2.50)], [c("f", a=2.5)]),
    ([c("f", a=[1, 2.0])], [c("f", a=[1.0, 2])]),
    ([c("f", a={"x": 1, "y": {"p": [1, {"q": 2}]}})], [c("f", a={"y": {"p": [1, {"q": 2.0}]}, "x": 1})]),
    ([c("f", a=None)], [c("f", a=None)]),
    ([c("f")], [c("f")]),
    ([c("f", a=True)], [c("f", a=True)]),
])
def test_xlam_equal(pred, gold):
    assert verify(calls_json(*pred), gold) == Verdict(True, "ok", pred)


@pytest.mark.parametrize("pred, gold, code", [
    ([c("f", a=1)], [c("f", a=1), c("f", a=1)], "wrong_count"),             # multiplicity
    ([c("f", a=1), c("f", a=1)], [c("f", a=1)], "wrong_count"),
    ([c("f", a=1), c("f", a=1)], [c("f", a=1), c("f", a=2)], "wrong_arguments"),
    ([c("F", a=1)], [c("f", a=1)], "wrong_name"),                            # names exact
    ([c("f ", a=1)], [c("f", a=1)], "wrong_name"),
    ([c("f", a=1, b=2)], [c("f", a=1)], "wrong_arguments"),                  # extra key
    ([c("f")], [c("f", a=1)], "wrong_arguments"),                            # missing key
    ([c("f", a="5")], [c("f", a=5)], "wrong_arguments"),                     # no string/number coercion
    ([c("f", a=True)], [c("f", a=1)], "wrong_arguments"),                    # bool strict
    ([c("f", a=1)], [c("f", a=True)], "wrong_arguments"),
    ([c("f", a=False)], [c("f", a=0)], "wrong_arguments"),
    ([c("f", a=0.0)], [c("f", a=False)], "wrong_arguments"),
    ([c("f", a="Paris")], [c("f", a="paris")], "wrong_arguments"),           # strings case-sensitive
    ([c("f", a="Paris ")], [c("f", a="Paris")], "wrong_arguments"),          # ... and exact
    ([c("f", a=[2, 1])], [c("f", a=[1, 2])], "wrong_arguments"),             # lists in order
    ([c("f", a=[1])], [c("f", a=[1, 1])], "wrong_arguments"),
    ([c("f", a={"x": 1})], [c("f", a={"x": 1, "y": 2})], "wrong_arguments"),  # dict keys
    ([c("f", a={"x": True})], [c("f", a={"x": 1})], "wrong_arguments"),
    ([c("f", a=None)], [c("f", a="None")], "wrong_arguments"),
    ([c("f", a=[1, 2])], [c("f", a={"0": 1, "1": 2})], "wrong_arguments"),
])
def test_xlam_not_equal(pred, gold, code):
    v = verify(calls_json(*pred), gold)
    assert not v.correct and v.reason.split(":")[0] == code, v.reason


def test_xlam_gold_and_tools_may_be_json_strings():
    tools = [{"name": "f", "description": "", "parameters": {"a": {"type": "int", "description": ""},
                                                             "k": {"type": "str", "default": "x"}}}]
    assert verify(calls_json(c("f", a=1)), json.dumps([c("f", a=1)]), json.dumps(tools)).correct


# ---------------------------------------------------------------- xLAM declared defaults

TOOLS = [
    {"name": "f", "description": "", "parameters": {
        "a": {"type": "int", "description": ""},
        "unit": {"type": "str, optional", "description": "", "default": "km"},
        "n": {"type": "int", "description": "", "default": 10},
        "flag": {"type": "bool", "description": "", "default": True},
        "opt": {"type": "str, optional", "description": ""},          # optional, but no declared default
    }},
]


@pytest.mark.parametrize("pred, gold", [
    (c("f", a=1), c("f", a=1, unit="km")),                # absent in the prediction
    (c("f", a=1, unit="km"), c("f", a=1)),                # absent in the gold
    (c("f", a=1, n=10.0), c("f", a=1)),                   # equal to the default numerically
    (c("f", a=1, flag=True, unit="km"), c("f", a=1, n=10)),
])
def test_declared_default_may_be_present_or_absent(pred, gold):
    assert verify(calls_json(pred), [gold], TOOLS).correct
    assert not verify(calls_json(pred), [gold]).correct   # only with tools


@pytest.mark.parametrize("pred, gold", [
    (c("f", a=1), c("f", a=1, unit="mi")),                # a non-default value must be there
    (c("f", a=1, unit="mi"), c("f", a=1)),
    (c("f", a=1, unit="KM"), c("f", a=1)),
    (c("f", a=1, flag=1), c("f", a=1)),                   # 1 is not the bool default
    (c("f", a=1), c("f", a=1, opt="")),                   # no `default` key: not droppable
    (c("f"), c("f", a=1)),
])
def test_non_default_values_still_count(pred, gold):
    assert not verify(calls_json(pred), [gold], TOOLS).correct


def test_defaults_are_per_tool():
    tools = TOOLS + [{"name": "g", "description": "", "parameters": {"unit": {"type": "str", "description": ""}}}]
    assert not verify(calls_json(c("g")), [c("g", unit="km")], tools).correct


def test_json_schema_tool_specs_also_give_defaults():
    tools = [{"name": "f", "parameters": {"type": "object", "properties": {"unit": {"type": "string", "default": "km"}}}}]
    assert verify(calls_json(c("f")), [c("f", unit="km")], tools).correct


# ---------------------------------------------------------------- BFCL rules

DOC_F = {"name": "f", "description": "", "parameters": {"type": "dict", "properties": {
    "a": {"type": "integer"}}, "required": ["a"]}}

DOC = {"name": "book", "description": "", "parameters": {"type": "dict", "properties": {
    "city": {"type": "string"},
    "nights": {"type": "integer"},
    "price": {"type": "float"},
    "pets": {"type": "boolean"},
    "dates": {"type": "array", "items": {"type": "string"}},
    "scores": {"type": "array", "items": {"type": "integer"}},
    "prefs": {"type": "dict", "properties": {"bed": {"type": "string"}, "floor": {"type": "integer"}}},
    "rooms": {"type": "array", "items": {"type": "dict"}},
    "note": {"type": "string"},
}, "required": ["city", "nights"]}}
GT = [{"book": {"city": ["New York, NY", "NYC"], "nights": [2], "price": [99.0, ""], "pets": [False, ""],
                "dates": [["2024-01-01", "2024-01-03"], ""], "scores": [[1, 2], ""],
                "prefs": [{"bed": ["king"], "floor": [3, ""]}, ""],
                "rooms": [[{"bed": ["king"]}, {"bed": ["twin"]}], ""],
                "note": ["", "quiet"]}}]


def b(**args) -> str:
    return calls_json({"name": "book", "arguments": {"city": "NYC", "nights": 2, **args}})


@pytest.mark.parametrize("completion", [
    b(),
    calls_json({"name": "book", "arguments": {"city": "new york ny", "nights": 2}}),     # standardize_string
    calls_json({"name": "book", "arguments": {"city": "NewYork,NY.", "nights": 2}}),
    calls_json({"name": "book", "arguments": {"city": "New York, NY", "nights": 2}}),    # another alternative
    b(price=99),                          # int accepted for float
    b(price=99.0),
    b(pets=False),
    b(dates=["2024-01-01", "2024 01 03"]),  # list elements standardised
    b(dates=[]),                          # BFCL: "" also accepts an empty list
    b(scores=[1, 2]),
    b(prefs={"bed": "King"}),             # dict: a subset of keys when the rest may be omitted
    b(prefs={"bed": "king", "floor": 3}),
    b(rooms=[{"bed": "king"}, {"bed": "Twin"}]),
    b(rooms=[]),                          # ... and so does a list of dicts: one rule for every list
    b(note=""),                           # BFCL quirk: the literal "" matches the optional marker
    b(note="Quiet"),
])
def test_bfcl_accepts(completion):
    v = verify_bfcl(completion, GT, [DOC])
    assert v.correct, v.reason


@pytest.mark.parametrize("completion, code", [
    (calls_json({"name": "book", "arguments": {"nights": 2}}), "missing_required"),
    (calls_json({"name": "book", "arguments": {"city": "NYC"}}), "missing_required"),
    (b(extra=1), "unexpected_param"),                 # not in the doc
    (calls_json({"name": "Book", "arguments": {"city": "NYC", "nights": 2}}), "wrong_func_name"),
    (calls_json({"name": "book", "arguments": {"city": "Boston", "nights": 2}}), "value_error"),
    (calls_json({"name": "book", "arguments": {"city": "NYC", "nights": 2.0}}), "type_error"),  # float for integer
    (calls_json({"name": "book", "arguments": {"city": "NYC", "nights": True}}), "type_error"),  # bool for integer
    (calls_json({"name": "book", "arguments": {"city": "NYC", "nights": "2"}}), "type_error"),
    (b(price="99.0"), "type_error"),                 # numeric string for float
    (b(price=98.5), "value_error"),
    (b(pets=0), "type_error"),
    (b(dates=["2024-01-03", "2024-01-01"]), "value_error"),   # lists ordered
    (b(prefs={"bed": "queen"}), "value_error"),
    (b(prefs={"bed": "king", "view": "sea"}), "value_error"),  # dict key not in the gold
    (b(prefs={"floor": 3}), "value_error"),          # dict key that may not be omitted
    (b(rooms=[{"bed": "twin"}, {"bed": "king"}]), "value_error"),
    (b(rooms=[{"bed": "king"}]), "value_error"),      # one dict short
    (b(note="loud"), "value_error"),
])
def test_bfcl_rejects(completion, code):
    v = verify_bfcl(completion, GT, [DOC])
    assert not v.correct and v.reason.split(":")[0] == code, v.reason


def test_bfcl_missing_optional():
    gt = [{"book": {"city": ["NYC"], "nights": [2], "note": ["quiet"]}}]   # no "": must be given
    assert verify_bfcl(b(), gt, [DOC]).reason == "missing_optional: note"
    assert verify_bfcl(b(note="quiet"), gt, [DOC]).correct


def test_bfcl_array_element_types():
    gt = [{"book": {"city": ["NYC"], "nights": [2], "scores": [[1, 2]]}}]
    assert verify_bfcl(b(scores=[1, 2]), gt, [DOC]).correct
    assert verify_bfcl(b(scores=[1.0, 2]), gt, [DOC]).reason.startswith("type_error")
    assert verify_bfcl(b(scores=[True, 2]), gt, [DOC]).reason.startswith("type_error")
    # BFCL: with "" among the alternatives the element check passes, and the values compare with ==
    gt[0]["book"]["scores"].append("")
    assert verify_bfcl(b(scores=[1.0, 2]), gt, [DOC]).correct


def test_bfcl_param_in_doc_but_not_in_gold_is_unexpected():
    gt = [{"book": {"city": ["NYC"], "nights": [2]}}]
    assert verify_bfcl(b(note="quiet"), gt, [DOC]).reason == "unexpected_param: note"


def test_bfcl_required_wins_over_optional_marker():
    gt = [{"book": {"city": ["NYC", ""], "nights": [2]}}]
    assert verify_bfcl(calls_json({"name": "book", "arguments": {"nights": 2}}), gt, [DOC]).reason == \
        "missing_required: city"


def test_standardize_string():
    assert standardize_string("New York, NY") == standardize_string("new york ny") == "newyorkny"
    assert standardize_string("It's 5/6 - a_b*c^d.") == 'it"s56abcd'


def test_bfcl_parallel_matching_is_bipartite():
    # data.md §2.4: BFCL's greedy first-fit rejects the first order; a perfect matching exists in both
    doc = {"name": "g", "parameters": {"type": "dict", "properties": {"a": {"type": "integer"},
                                                                      "b": {"type": "integer"}}, "required": ["a"]}}
    gt = [{"g": {"a": [1], "b": [2, ""]}}, {"g": {"a": [1]}}]
    for calls in ([c("g", a=1), c("g", a=1, b=2)], [c("g", a=1, b=2), c("g", a=1)]):
        assert verify_bfcl(calls_json(*calls), gt, [doc]).correct
    assert not verify_bfcl(calls_json(c("g", a=1, b=2), c("g", a=1, b=2)), gt, [doc]).correct
    assert verify_bfcl(calls_json(c("g", a=1)), gt, [doc]).reason == "wrong_count: got 1 calls, want 2"


def test_bfcl_parallel_multiple_any_order():
    docs = [DOC_F, {"name": "h", "parameters": {"type": "dict", "properties": {"s": {"type": "string"}},
                                                "required": []}}]
    gt = [{"f": {"a": [1]}}, {"h": {"s": ["x"]}}, {"f": {"a": [2]}}]
    assert verify_bfcl(tool_call(c("f", a=2)) + tool_call(c("h", s="X")) + tool_call(c("f", a=1)), gt, docs).correct
    assert not verify_bfcl(calls_json(c("f", a=2), c("h", s="X"), c("f", a=2)), gt, docs).correct


def test_bfcl_gold_and_tools_may_be_json_strings():
    assert verify_bfcl(calls_json(c("f", a=1)), json.dumps([{"f": {"a": [1]}}]), json.dumps([DOC_F])).correct


def test_bad_gold_raises_value_error():
    with pytest.raises(ValueError):
        verify_bfcl(calls_json(c("f", a=1)), [{"f": [1]}], [DOC_F])
    with pytest.raises(ValueError):
        verify(calls_json(c("f", a=1)), [{"name": "f"}])


@pytest.fixture(scope="module")
def bfcl_checker():
    """BFCL's own ast_checker, importable without its model-handler dependencies (data.md §2.1)."""
    pytest.importorskip("bfcl_eval")
    stub = types.ModuleType("bfcl_eval.constants.model_config")
    stub.MODEL_CONFIG_MAPPING = defaultdict(lambda: types.SimpleNamespace(underscore_to_dot=False))
    saved = sys.modules.get("bfcl_eval.constants.model_config")
    sys.modules["bfcl_eval.constants.model_config"] = stub
    try:
        from bfcl_eval.constants.enums import Language
        from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
    except ImportError as e:
        pytest.skip(f"BFCL checker not importable: {e}")
    finally:
        if saved is None:
            sys.modules.pop("bfcl_eval.constants.model_config", None)
        else:
            sys.modules["bfcl_eval.constants.model_config"] = saved
    return lambda docs, calls, gt, cat: ast_checker(docs, calls, gt, Language.PYTHON, cat, "m")["valid"]


def _concrete(v, rng: random.Random):
    """A model-style value from a gold alternative: dicts of alternatives become plain dicts."""
    if isinstance(v, dict):
        return {k: rng.choice([o for o in opts if o != ""]) for k, opts in v.items()
                if any(o != "" for o in opts) and not ("" in opts and rng.random() < 0.3)}
    return [_concrete(x, rng) for x in v] if isinstance(v, list) else v


def _perturb(v, rng: random.Random):
    if isinstance(v, bool):
        return rng.choice([not v, int(v)])
    if isinstance(v, int):
        return rng.choice([v + 1, float(v), str(v)])
    if isinstance(v, float):
        return rng.choice([v * 2, int(v) if v == int(v) else v, str(v)])
    if isinstance(v, str):
        return rng.choice([v.upper(), v + " x", v.replace(" ", "")])
    if isinstance(v, list):
        return rng.choice([list(reversed(v)), v[:-1], [float(x) if type(x) is int else x for x in v],
                           [str(x) for x in v]])
    if isinstance(v, dict):
        return rng.choice([dict(list(v.items())[1:]), {**v, "zz": ["q"]}])
    return v


def test_bfcl_parity_with_the_reference_checker(bfcl_checker):
    """Same verdict as BFCL's ast_checker on real entries with random alternatives and perturbations."""
    from importlib.resources import files

    data = files("bfcl_eval") / "data"
    rng = random.Random(0)
    checked = 0
    for cat in ("simple_python", "multiple", "live_simple", "parallel", "parallel_multiple"):
        questions = [json.loads(x) for x in (data / f"BFCL_v4_{cat}.json").read_text().splitlines()[:60]]
        answers = {a["id"]: a["ground_truth"] for a in
                   map(json.loads, (data / "possible_answer" / f"BFCL_v4_{cat}.json").read_text().splitlines())}
        for q in questions:
            gt = answers[q["id"]]
            for trial in range(3):
                calls = []
                for g in gt:
                    (name, params), = g.items()
                    args = {}
                    for p, alts in params.items():
                        options = [a for a in alts if a != ""]
                        if not options or ("" in alts and rng.random() < 0.3):
                            continue
                        value = _concrete(rng.choice(options), rng)
                        args[p] = _perturb(value, rng) if trial and rng.random() < 0.3 else value
                    if trial == 2 and rng.random() < 0.2:
                        args["unexpected"] = 1
                    calls.append({"name": name, "arguments": args})
                rng.shuffle(calls)
                ours = verify_bfcl(calls_json(*calls), gt, q["function"]).correct
                theirs = bfcl_checker(q["function"], [{x["name"]: x["arguments"]} for x in calls], gt, cat)
                # bipartite matching may accept what greedy first-fit rejects, never the other way round
                assert ours == theirs or (ours and "parallel" in cat), (q["id"], calls)
                checked += 1
    assert checked == 900


# ---------------------------------------------------------------- hostile input: bounded time, never raises

MB = 1_000_000
DEEP = "[" * 1000 + "]" * 1000
HOSTILE = {  # name: (completion, expected xLAM verdict against [F1])
    "200 kB nested brackets": ("[" * 200_000, False),
    "200 kB nested braces, balanced": ("{" * 100_000 + "}" * 100_000, False),
    "1 MB nested brackets": ("[" * MB, False),
    "1 MB nested in a tool_call": ("<tool_call>" + "[" * MB + "</tool_call>", False),
    "1 MB nested in a fence": ("```json\n" + "[" * MB + "\n```", False),
    "1 MB of open tool_call tags": ("<tool_call>" * (MB // 11), False),
    "1 MB of fences": ("```" * (MB // 3), False),
    "1 MB of quotes and brackets": ('["' * (MB // 2), False),
    "unterminated strings after brackets": (('[\\"' + "a" * 96) * (MB // 100), False),
    "1 MB of empty objects in prose": ("x {} " * (MB // 5), False),
    "thousands of calls": (calls_json(*[F1] * 20_000), False),
    "thousands of tool_call blocks": (tool_call(F1) * 20_000, False),
    "1000-deep arguments": ('[{"name": "f", "arguments": {"a": ' + DEEP + "}}]", False),
    "1000-deep arguments string": (json.dumps([{"name": "f", "arguments": '{"a": ' + DEEP + "}"}]), False),
    "900-deep arguments": ('[{"name": "f", "arguments": {"a": ' + "[" * 900 + "]" * 900 + "}}]", False),
    "1 MB integer": ('[{"name": "f", "arguments": {"a": ' + "9" * MB + "}}]", False),
    "1 MB string argument": (json.dumps([{"name": "f", "arguments": {"a": "y" * MB}}]), False),
    "1 MB prose, then the call": ("word " * (MB // 5) + calls_json(F1), True),
    "15k prose brackets, then the call": ("[x] " * 5000 + calls_json(F1), True),
    "1 MB of prose brackets, then the call": ("[x] " * (MB // 4) + calls_json(F1), False),
}


def _best_time(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_is_fast_and_safe(name):
    completion, expected = HOSTILE[name]
    out: list[Verdict] = []
    t_xlam = _best_time(lambda: out.append(verify(completion, [F1])))
    t_bfcl = _best_time(lambda: out.append(verify_bfcl(completion, [{"f": {"a": [1]}}], [DOC_F])))
    assert out[0].correct is expected and out[-1].correct is expected, (out[0].reason, out[-1].reason)
    assert t_xlam < 0.1 and t_bfcl < 0.1, f"{name}: {t_xlam * 1000:.1f} / {t_bfcl * 1000:.1f} ms"


def test_random_garbage_always_gives_a_verdict():
    rng = random.Random(2)
    alphabet = '[]{}",:0123 name arguments\\<tool_call></tool_call>```json\n'
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        for v in (verify(text, [F1]), verify_bfcl(text, [{"f": {"a": [1]}}], [DOC_F])):
            assert isinstance(v, Verdict) and isinstance(v.correct, bool) and v.reason


# ---------------------------------------------------------------- one empty-list rule, as BFCL's checkers

GT_REQ = [{"book": {"city": ["NYC"], "nights": [2], "rooms": [[{"bed": ["king"]}]], "dates": [["2024-01-01"]]}}]


@pytest.mark.parametrize("param", ["rooms", "dates"])
def test_empty_list_needs_the_optional_marker_for_every_list_type(param):
    assert verify_bfcl(b(**{param: []}), GT, [DOC]).correct                  # "" among the alternatives
    v = verify_bfcl(b(**{param: []}), GT_REQ, [DOC])                         # no "" : [] is a wrong value
    assert not v.correct and v.reason.startswith("value_error"), v.reason


@pytest.mark.parametrize("gt", [GT, GT_REQ], ids=["optional", "required"])
@pytest.mark.parametrize("param", ["rooms", "dates"])
def test_empty_list_verdict_matches_the_reference_checker(bfcl_checker, gt, param):
    call = {"name": "book", "arguments": {"city": "NYC", "nights": 2, param: []}}
    ours = verify_bfcl(calls_json(call), gt, [DOC]).correct
    assert ours == bfcl_checker([DOC], [{"book": call["arguments"]}], gt, "simple_python")


# ---------------------------------------------------------------- strict (leaderboard) format

@pytest.mark.parametrize("completion, calls", [
    (tool_call(F1), [F1]),
    (f"Sure.\n{tool_call(F1)}\n{tool_call(G2)} done", [F1, G2]),           # text around blocks is ignored
    (f"{tool_call(F1)}\n<tool_call>\n{{not json}}\n</tool_call>", [F1]),   # BFCL drops a block it cannot decode
    (f"<tool_call>{json.dumps(F1)}</tool_call>", []),                        # no newlines: BFCL's regex misses it
    (f"```json\n{calls_json(F1)}\n```", []),                                # fenced JSON is not a tool call
    (calls_json(F1), []),                                                    # nor is bare JSON
])
def test_strict_parse_reads_what_bfcls_qwen_handler_reads(completion, calls):
    assert parse_calls_strict(completion) == calls


@pytest.mark.parametrize("completion", [
    f"<tool_call>\n{calls_json(F1)}\n</tool_call>",                       # an array in one block
    f"<tool_call>\n{json.dumps({'name': 'f', 'arguments': json.dumps({'a': 1})})}\n</tool_call>",  # string args
    f"<tool_call>\n{json.dumps({'arguments': {'a': 1}})}\n</tool_call>",   # no name
])
def test_strict_parse_refuses_what_bfcl_cannot_decode(completion):
    assert parse_calls_strict(completion) is None


def test_strict_parse_caps_the_number_of_calls():
    assert parse_calls_strict(tool_call(F1) * 3, max_calls=2) is None
    assert parse_calls_strict(tool_call(F1) * 2, max_calls=2) == [F1, F1]


@pytest.mark.parametrize("check", [
    lambda text, strict: verify(text, [F1], strict=strict),
    lambda text, strict: verify_bfcl(text, [{"f": {"a": [1]}}], [DOC_F], strict=strict),
], ids=["xlam", "bfcl"])
def test_strict_verdict_beside_the_lenient_one(check):
    for text in (tool_call(F1), f"Calling f.\n{tool_call(F1)}"):
        assert check(text, False).correct and check(text, True).correct
    for text in (f"```json\n{calls_json(F1)}\n```", calls_json(F1), f"<tool_call>{json.dumps(F1)}</tool_call>"):
        lenient, strict = check(text, False), check(text, True)
        assert lenient.correct and not strict.correct, (text, strict.reason)
    unparsable = check(f"<tool_call>\n{calls_json(F1)}\n</tool_call>", True)
    assert not unparsable.correct and unparsable.reason.startswith("unparsable: strict")


# ----------------------------------------------------------------------------- call cap (from test_harden_misc)

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
