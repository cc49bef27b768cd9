"""Function-calling verifiers: strict xLAM matching (`verify`) and BFCL AST-checker rules (`verify_bfcl`).

Reading calls from a completion (`parse_calls`, lenient; `parse_calls_strict`, BFCL's leaderboard
format) lives in rrr/verifiers/tool_calls.py; both verifiers take `strict=`.

`verify` (xLAM, data.md §1.4): predicted and gold calls match as multisets. Two calls are equal when the
names are identical and the argument keys and values are equal: int/float numerically, bool only to bool,
strings exact (case-sensitive), lists in order, dicts recursively in any key order. With `tools`, an
argument equal to the parameter's declared `default` may be present or absent on either side. Equality is
an equivalence relation, so each call maps to a canonical hashable key, and comparing the two multisets of
keys is exactly a perfect bipartite matching, in linear time.

`verify_bfcl` (data.md §2.4): a port of BFCL's `simple_function_checker` for Python (Apache-2.0,
bfcl_eval/eval_checker/ast_eval/ast_checker.py): any listed alternative, `""` among the alternatives =
may be omitted, `standardize_string` for strings, int accepted for float, lists ordered, dicts one
level, required params from the doc's `parameters.required`, unexpected params rejected. Parallel calls
are matched by maximum bipartite matching instead of BFCL's greedy first-fit, which rejects some correct
outputs.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

from rrr.verifiers import Verdict
from rrr.verifiers.tool_calls import (MAX_BRACKETS, MAX_CALLS, MAX_CANDIDATES, _normalize_call, call_cap,  # noqa: F401
                                      parse_calls, parse_calls_strict)


def _parse(completion: str, n_gold: int, strict: bool) -> list[dict] | None:
    return (parse_calls_strict if strict else parse_calls)(completion, call_cap(n_gold))


def _unparsable(strict: bool) -> Verdict:
    return Verdict(False, "unparsable: strict format wants <tool_call>\\n{call}\\n</tool_call> blocks"
                   if strict else "unparsable")


def _as_list(x: Any) -> list:
    """Gold answers and tools may come as JSON strings (as in the xLAM file)."""
    return json.loads(x) if isinstance(x, str) else list(x or [])


def _gold_calls(answers: list[dict] | str) -> list[dict]:
    gold = [_normalize_call(a) for a in _as_list(answers)]
    if any(g is None for g in gold):
        raise ValueError("gold answers must be a list of {name: str, arguments: object}")
    return gold


def _call_str(call: dict) -> str:
    args = ", ".join(f"{k}={json.dumps(v)[:30]}" for k, v in call["arguments"].items())
    return f"{call['name']}({args})"[:120]


# ---------------------------------------------------------------- xLAM: strict multiset matching

def canonical(value: Any) -> Any:
    """A hashable key; two JSON values get the same key iff they are equal under the xLAM rules.

    int/float share a tag (Python hashes 5 and 5.0 alike); bool has its own, so True != 1."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, float)):
        return ("n", value)
    if isinstance(value, str):
        return ("s", value)
    if value is None:
        return ("z",)
    if isinstance(value, list):
        return ("l", tuple(canonical(v) for v in value))
    if isinstance(value, dict):
        return ("d", frozenset((k, canonical(v)) for k, v in value.items()))
    return ("o", repr(value))


def tool_defaults(tools: list[dict] | None) -> dict[str, dict[str, Any]]:
    """{tool name: {param: canonical default}} for params whose spec has the key `default`."""
    defaults: dict[str, dict[str, Any]] = {}
    for tool in tools or []:
        params = (tool.get("parameters") or {}) if isinstance(tool, dict) else None
        if not isinstance(params, dict):
            raise ValueError("xLAM tools must be a list of {name, description, parameters: {...}}")
        if isinstance(params.get("properties"), dict) and params.get("type") in ("object", "dict"):
            params = params["properties"]          # a JSON-schema tool spec
        defaults[tool.get("name")] = {p: canonical(spec["default"]) for p, spec in params.items()
                                      if isinstance(spec, dict) and "default" in spec}
    return defaults


_MISSING = object()


def call_key(call: dict, defaults: dict[str, dict[str, Any]]) -> tuple:
    """Canonical call: arguments equal to their declared default are dropped, so either side may omit them."""
    dropped = defaults.get(call["name"], {})
    args = frozenset((k, ck) for k, v in call["arguments"].items()
                     if (ck := canonical(v)) != dropped.get(k, _MISSING))
    return call["name"], args


def verify(completion: str, answers: list[dict] | str, tools: list[dict] | str | None = None, *,
           strict: bool = False) -> Verdict:
    """xLAM verdict: the predicted calls equal the gold calls as a multiset; never raises on model text.
    `strict`: read the calls as BFCL's leaderboard pipeline does (`parse_calls_strict`)."""
    gold = _gold_calls(answers)
    pred = _parse(completion, len(gold), strict)
    if pred is None:
        return _unparsable(strict)
    if len(pred) != len(gold):
        return Verdict(False, f"wrong_count: got {len(pred)} calls, want {len(gold)}", pred)
    defaults = tool_defaults(_as_list(tools) if tools is not None else None)
    try:
        pred_keys = [call_key(c, defaults) for c in pred]
        gold_keys = [call_key(c, defaults) for c in gold]
    except RecursionError:
        return Verdict(False, "unparsable: arguments nested too deeply", pred)
    if Counter(pred_keys) == Counter(gold_keys):
        return Verdict(True, "ok", pred)
    if Counter(c["name"] for c in pred) != Counter(c["name"] for c in gold):
        got, want = sorted(c["name"] for c in pred), sorted(c["name"] for c in gold)
        return Verdict(False, f"wrong_name: got {got[:8]}, want {want[:8]}", pred)
    unmatched = Counter(gold_keys) - Counter(pred_keys)
    first = next(c for c, k in zip(gold, gold_keys) if k in unmatched)
    return Verdict(False, f"wrong_arguments: no match for {_call_str(first)}", pred)


# ---------------------------------------------------------------- BFCL: AST-checker rules, bipartite matching

PYTHON_TYPES = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list,
                "tuple": list, "dict": dict, "any": str}
_STANDARDIZE = re.compile(r"[ ,./\-_*^]")


def standardize_string(s: str) -> str:
    """BFCL: drop spaces and `,./-_*^`, lowercase, `'` -> `"` ("New York, NY" == "newyorkny")."""
    return _STANDARDIZE.sub("", s).lower().replace("'", '"')


def _std(x: Any) -> Any:
    return standardize_string(x) if isinstance(x, str) else x


def _alternatives(x: Any) -> list:
    return x if isinstance(x, list) else [x]


def _type_check(value: Any, alts: list, expected: type, nested: type | None) -> tuple[bool, bool]:
    """BFCL `type_checker` -> (valid, is_variable). A value of the gold alternatives' type is accepted
    even when the doc declares another type (BFCL's "variable" escape hatch)."""
    alt_type = next((type(a) for a in alts if a != ""), None)
    is_variable = alt_type is not None and alt_type is not expected
    if type(value) is expected:
        if nested is None:
            return True, is_variable
        for alt in alts:  # one level of element types, against any list alternative
            if not isinstance(alt, list) or all(_type_check(v, alt, nested, None)[0] for v in value):
                return True, is_variable
        return False, False
    if alt_type is not None and type(value) is alt_type:
        return True, True
    return False, False


def _dict_ok(value: dict, alts: list) -> bool:
    """BFCL `dict_checker`: keys a subset of some alternative's, values among its (standardised) options,
    and every key left out has "" among its options. One level deep."""
    for alt in alts:
        if not isinstance(alt, dict):
            continue
        if all(k in alt and _std(v) in [_std(a) for a in _alternatives(alt[k])] for k, v in value.items()) \
                and all(k in value or "" in _alternatives(options) for k, options in alt.items()):
            return True
    return False


def _empty_list_optional(value: list, alts: list) -> bool:
    """One rule for every list type: the optional marker "" also accepts an empty list, as in BFCL
    (its list_checker compares [] with "" element-wise, its list_dict_checker compares len("") == 0)."""
    return value == [] and "" in alts


def _list_ok(value: list, alts: list) -> bool:
    """BFCL `list_checker`: ordered, string elements standardised, others compared with ==."""
    std_value = [_std(v) for v in value]
    return _empty_list_optional(value, alts) or any(
        std_value == [_std(a) for a in alt] for alt in alts if isinstance(alt, list))


def _list_of_dicts_ok(value: list, alts: list) -> bool:
    """BFCL `list_dict_checker`: same length as an alternative, each dict checked against its position."""
    return _empty_list_optional(value, alts) or any(
        isinstance(alt, list) and len(alt) == len(value)
        and all(isinstance(v, dict) and _dict_ok(v, [a]) for v, a in zip(value, alt)) for alt in alts)


def _value_ok(value: Any, alts: list, expected: type | None, nested: type | None) -> bool:
    if expected is dict or (expected is None and isinstance(value, dict)):
        return _dict_ok(value, alts)
    if expected is list and nested is dict:
        return _list_of_dicts_ok(value, alts)
    if expected is str or (expected is None and isinstance(value, str)):
        return _std(value) in [_std(a) for a in alts if isinstance(a, str)]
    if expected is list or (expected is None and isinstance(value, list)):
        return _list_ok(value, alts)
    return value in alts


def check_bfcl_call(call: dict, gold: dict, doc: dict | None) -> str | None:
    """BFCL `simple_function_checker` for one predicted call against one gold call; None when it passes.

    Without a doc for the gold function, params are those of the gold entry and types are not checked."""
    (gold_name, gold_params), = gold.items()
    if call["name"] != gold_name:
        return f"wrong_func_name: got {call['name']!r}, want {gold_name!r}"
    params = (doc or {}).get("parameters") or {}
    props = (params.get("properties") or {}) if doc else {k: {} for k in gold_params}
    args = call["arguments"]
    for p in params.get("required") or []:
        if p not in args:
            return f"missing_required: {p}"
    for p, value in args.items():
        if p not in props or p not in gold_params:
            return f"unexpected_param: {p}"
        alts = _alternatives(gold_params[p])
        spec = props[p] if isinstance(props[p], dict) else {}
        type_name = spec.get("type")
        expected = PYTHON_TYPES.get(type_name)
        items = spec.get("items")
        nested = PYTHON_TYPES.get(items.get("type")) if type_name in ("array", "tuple") and isinstance(items, dict) else None
        if type_name == "float" and type(value) is int:  # BFCL: int accepted for float
            value = float(value)
        is_variable = False
        if expected is not None:
            valid, is_variable = _type_check(value, alts, expected, nested)
            if not valid:
                return f"type_error: {p} expects {type_name}, got {type(value).__name__}"
        ok = value in alts if is_variable else _value_ok(value, alts, expected, nested)
        if not ok:
            return f"value_error: {p}={json.dumps(value)[:40]}"
    for p, options in gold_params.items():
        if p not in args and "" not in _alternatives(options):
            return f"missing_optional: {p}"
    return None


def _perfect_matching(edges: list[list[bool]]) -> bool:
    """Kuhn's augmenting paths: can every gold call (row) get its own predicted call (column)?"""
    owner = [-1] * len(edges)

    def augment(g: int, seen: list[bool]) -> bool:
        for p, ok in enumerate(edges[g]):
            if ok and not seen[p]:
                seen[p] = True
                if owner[p] < 0 or augment(owner[p], seen):
                    owner[p] = g
                    return True
        return False

    return all(augment(g, [False] * len(edges)) for g in range(len(edges)))


def _bfcl_gold(ground_truth: list[dict] | str) -> list[dict]:
    gold = _as_list(ground_truth)
    if not all(isinstance(g, dict) and len(g) == 1 and isinstance(next(iter(g.values())), dict) for g in gold):
        raise ValueError("BFCL ground_truth must be a list of {func_name: {param: [alternatives]}}")
    return gold


def _bfcl_docs(tools: list[dict] | str) -> dict[str, dict]:
    docs = _as_list(tools)
    if not all(isinstance(t, dict) and isinstance(t.get("parameters", {}), dict) for t in docs):
        raise ValueError("BFCL tools must be a list of function docs {name, description, parameters}")
    return {t.get("name"): t for t in docs}


def verify_bfcl(completion: str, ground_truth: list[dict] | str, tools: list[dict] | str, *,
                strict: bool = False) -> Verdict:
    """BFCL verdict for gold `[{func_name: {param: [alternatives...]}}]` and BFCL function docs.
    `strict`: read the calls as BFCL's leaderboard pipeline does (`parse_calls_strict`)."""
    gold, docs = _bfcl_gold(ground_truth), _bfcl_docs(tools)
    pred = _parse(completion, len(gold), strict)
    if pred is None:
        return _unparsable(strict)
    if len(pred) != len(gold):
        return Verdict(False, f"wrong_count: got {len(pred)} calls, want {len(gold)}", pred)
    try:
        errors = [[check_bfcl_call(c, g, docs.get(next(iter(g)))) for c in pred] for g in gold]
    except RecursionError:
        return Verdict(False, "unparsable: arguments nested too deeply", pred)
    edges = [[e is None for e in row] for row in errors]
    if _perfect_matching(edges):
        return Verdict(True, "ok", pred)
    for g, row in zip(gold, errors):
        if all(e is not None for e in row):
            same_name = [e for e in row if not e.startswith("wrong_func_name")]
            return Verdict(False, same_name[0] if same_name else f"wrong_func_name: no call to {next(iter(g))}", pred)
    return Verdict(False, "no_matching: calls overlap but cannot all be paired", pred)
