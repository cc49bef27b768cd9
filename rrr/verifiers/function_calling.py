"""Function-calling verifiers: strict xLAM matching (`verify`) and BFCL AST-checker rules (`verify_bfcl`).

Reading calls from a completion (`parse_calls`). The first form present wins, in this order:
  1. `<tool_call>…</tool_call>` blocks: all of them, in order; each holds one call object or an array.
  2. fenced code blocks (```json or a bare ```): the last one; it holds an array or one call object.
  3. otherwise the last JSON value in the text that looks like calls (an object with "name", or a
     non-empty array of such objects), with or without prose around it.
`[]` (alone, in a block or in a fence) parses to no calls. This lenient reading is rrr's reward; the
strict one (`parse_calls_strict`, `strict=True`) is what BFCL's leaderboard pipeline accepts from a Qwen
model and is reported beside it in evaluations. Each call needs a string `name` and an object
`arguments` (or a JSON string encoding one); other keys are ignored. Anything else, or a form that does not hold valid calls, is
unparsable (None), which both verifiers grade as incorrect.

Hostile input stays cheap: tags and fences are found with str.find (linear), bare JSON by one
string-aware bracket scan capped at MAX_BRACKETS, json.loads errors (RecursionError on deep nesting
included) mean unparsable, and at most `call_cap(gold)` calls are read: MAX_CALLS, or twice the gold's
call count when the gold has more (the bracket budget scales with it), so a correct answer with many
calls is never "unparsable" while a flood of calls stays cheap.

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

MAX_CALLS = 256          # floor of the call cap (xLAM ≤ 8 tools per query, BFCL ≤ 8 parallel calls)
MAX_BRACKETS = 20_000    # bare-JSON scan budget; more brackets than this is not a tool call
MAX_CANDIDATES = 16      # bare JSON values tried, last first

TOOL_OPEN, TOOL_CLOSE, FENCE = "<tool_call>", "</tool_call>", "```"
_OPENER = re.compile(r"[\[{]")
_SCAN = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"|[\[\]{}]|"', re.S)   # a JSON string, a bracket, or a lone quote
_PAIRS = {"[": "]", "{": "}"}


# ---------------------------------------------------------------- parsing

def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(text: str) -> tuple[bool, Any]:
    """(ok, value); NaN/Infinity, huge ints and deep nesting are failures, never exceptions."""
    try:
        return True, json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return False, None


def _normalize_call(item: Any) -> dict | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    args = item.get("arguments")
    if isinstance(args, str):
        ok, args = _loads(args)
        if not ok:
            return None
    if not isinstance(args, dict):
        return None
    return {"name": item["name"], "arguments": args}


def call_cap(n_gold: int) -> int:
    """Most calls read from one completion: MAX_CALLS, or twice the gold's call count if that is more."""
    return max(MAX_CALLS, 2 * int(n_gold))


def _to_calls(value: Any, max_calls: int = MAX_CALLS) -> list[dict] | None:
    items = value if isinstance(value, list) else [value]
    if len(items) > max_calls:
        return None
    calls = [_normalize_call(x) for x in items]
    return None if any(c is None for c in calls) else calls


def _tool_call_blocks(text: str, max_calls: int = MAX_CALLS) -> list[str]:
    blocks, pos = [], 0
    while len(blocks) <= max_calls:
        start = text.find(TOOL_OPEN, pos)
        end = text.find(TOOL_CLOSE, start) if start >= 0 else -1
        if end < 0:
            break
        inner_start = text.rfind(TOOL_OPEN, start, end) + len(TOOL_OPEN)  # a stray re-opening: keep the last
        blocks.append(text[inner_start:end])
        pos = end + len(TOOL_CLOSE)
    return blocks


def _last_fenced_block(text: str) -> str | None:
    """Content of the last complete ```json / ``` block (other languages are not JSON forms)."""
    parts = text.split(FENCE)              # fences pair up left to right: bodies sit at odd indices
    last_body = len(parts) - 2 if len(parts) % 2 else len(parts) - 3
    for i in range(last_body, max(last_body - 2 * MAX_CANDIDATES, 0), -2):
        first_line, nl, rest = parts[i].partition("\n")
        lang = first_line.strip().lower()
        if lang in ("", "json"):
            return rest if nl else ""
        if not nl and lang[:1] in "[{":    # ```[{...}]``` on one line
            return parts[i]
    return None


def _balanced_spans(text: str) -> list[tuple[int, int]]:
    """Every balanced [..]/{..} span (string-aware inside brackets), in closing order; one linear pass."""
    spans: list[tuple[int, int]] = []
    stack: list[tuple[str, int]] = []
    pos = 0
    while True:
        m = (_SCAN.search(text, pos) if stack else _OPENER.search(text, pos))
        if m is None:
            return spans
        tok, pos = m.group(), m.end()
        if tok in _PAIRS:
            stack.append((tok, m.start()))
        elif tok in "]}":
            if _PAIRS[stack[-1][0]] != tok:
                stack.clear()      # mismatched: nothing open so far can be JSON
                continue
            spans.append((stack.pop()[1], pos))
        elif tok == '"':           # an unterminated string: no JSON can start after it, and
            return spans           # stopping here keeps the scan linear


def _looks_like_calls(value: Any) -> bool:
    """In prose, an object with "name" or a non-empty array of such objects (`[]` counts only alone)."""
    if isinstance(value, dict):
        return "name" in value
    return isinstance(value, list) and bool(value) and all(isinstance(x, dict) and "name" in x for x in value)


def _last_json_calls(text: str, max_calls: int = MAX_CALLS) -> list[dict] | None:
    stripped = text.strip()
    if stripped[:1] in ("[", "{"):           # fast path: the whole completion is JSON
        ok, value = _loads(stripped)
        if ok:
            return _to_calls(value, max_calls)
    if sum(text.count(c) for c in "[]{}") > MAX_BRACKETS * max(1, max_calls // MAX_CALLS):
        return None
    # Latest end first; for one end, the outermost span first.
    spans = sorted(_balanced_spans(text), key=lambda s: (-s[1], s[0]))
    budget = len(text) + 1024              # total characters handed to json.loads
    for start, end in spans[:MAX_CANDIDATES]:
        span = text[start:end]
        if span == stripped:               # already tried by the fast path
            continue
        budget -= end - start
        if budget < 0:
            break
        ok, value = _loads(span)
        if ok and _looks_like_calls(value):
            return _to_calls(value, max_calls)
    return None


def parse_calls(completion: str, max_calls: int = MAX_CALLS) -> list[dict] | None:
    """Calls `[{"name": str, "arguments": dict}]` read from a completion, or None if unparsable
    (more than `max_calls` calls included)."""
    blocks = _tool_call_blocks(completion, max_calls)
    if blocks:
        calls: list[dict] = []
        for block in blocks:
            ok, value = _loads(block)
            more = _to_calls(value, max_calls) if ok else None
            if more is None:
                return None
            calls.extend(more)
        return calls if len(calls) <= max_calls else None
    fenced = _last_fenced_block(completion)
    if fenced is not None:
        ok, value = _loads(fenced)
        return _to_calls(value, max_calls) if ok else None
    return _last_json_calls(completion, max_calls)


# BFCL's handler for Qwen-family FC models (bfcl_eval/model_handler/local_inference/qwen_fc.py,
# `_extract_tool_calls`): only `<tool_call>\n…\n</tool_call>` blocks count, a block that is not JSON is
# dropped, and each decoded block must be one {"name", "arguments": object} call.
_STRICT_BLOCK = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.S)


def parse_calls_strict(completion: str, max_calls: int = MAX_CALLS) -> list[dict] | None:
    """Calls read as BFCL's leaderboard pipeline reads a Qwen model's output, or None where it would
    fail to decode (a block that is not one call object; more than `max_calls` blocks)."""
    calls = []
    for block in _STRICT_BLOCK.findall(completion):
        ok, value = _loads(block)
        if not ok:
            continue                       # BFCL: `except Exception: pass`
        if len(calls) == max_calls or not isinstance(value, dict) or not isinstance(value.get("name"), str) \
                or not isinstance(value.get("arguments"), dict):
            return None
        calls.append({"name": value["name"], "arguments": value["arguments"]})
    return calls


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
