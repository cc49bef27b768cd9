"""Reading tool calls from a completion, leniently (rrr's reward) or strictly (BFCL's leaderboard format).

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
"""

from __future__ import annotations

import json
import re
from typing import Any


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
