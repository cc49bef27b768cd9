"""Function calling: answer a user query with the right tool calls (names, arguments and values).

Sources (`task.source`):
- `xlam`: `Salesforce/xlam-function-calling-60k` from the Hugging Face Hub. Gated: it needs an HF token
  whose account accepted the data set's conditions. Split 48,000 / 12,000 by hash (the paper's split
  method is unknown; `task.split_seed` fixes ours).
- `jsonl`: a local file in the same format (`task.path`): a JSON array, like the hub's
  `xlam_function_calling_60k.json`, or JSON Lines; `tools` and `answers` may be JSON strings or lists.
- `bfcl`: BFCL v4 single-turn categories read offline from the installed `bfcl-eval` wheel. They are
  benchmark data: the `train` split is `task.bfcl.train_categories` (live_* by default) and the `test`
  split `task.bfcl.test_categories` (the non-live ones), disjoint sources, so no hash split is needed.
  Entries whose gold answer fails the verifier itself are left out, with their ids printed (`excluded`).

Fields: query (str), tools (list of tool specs, as the source gives them), grader ("xlam" | "bfcl"),
then answers (xLAM gold: list of {name, arguments}) or ground_truth (BFCL: list of
{name: {param: [acceptable values]}}), and for BFCL category and, when the entry has one, system.
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from rrr.config import UserError
from rrr.tasks import Example
from rrr.tasks.splits import check_split, content_id, dedupe, sample, select_split

TASK = "function_calling"
BFCL_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple",
                   "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")


# ---- xLAM (hub or local file) --------------------------------------------------------------------------

def _json_field(value: Any, name: str, where: str) -> list:
    """xLAM stores tools and answers as JSON strings; local copies may hold the lists directly."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(f"{where}: field {name!r} is not valid JSON") from None
    if not isinstance(value, list):
        raise UserError(f"{where}: field {name!r} must be a list (or a JSON string of one)")
    return value


def xlam_example(row: dict, where: str, source: str) -> Example:
    missing = {"query", "tools", "answers"} - set(row)
    if missing:
        raise UserError(f"{where}: missing field(s) {sorted(missing)}; an xLAM row has id, query, tools, answers")
    fields = {"query": str(row["query"]), "tools": _json_field(row["tools"], "tools", where),
              "answers": _json_field(row["answers"], "answers", where), "grader": "xlam"}
    ex_id = f"xlam-{row['id']}" if row.get("id") is not None else content_id("xlam", fields)
    return Example(id=ex_id, task=TASK, source=source, fields=fields)


def _read_rows(path: str | None) -> list[tuple[dict, str]]:
    """(row, where) pairs from a JSON array or JSON Lines file; `where` names the line for errors."""
    if not path or not Path(path).is_file():
        raise UserError(f"task.path={path!r} is not a file; point it at an xLAM-format JSON or JSONL file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"task.path={path!r} is not UTF-8 text (byte {e.start}: {e.reason}); "
                        "re-encode it as UTF-8 JSON or JSON Lines") from None
    if text.lstrip().startswith("["):
        try:
            return [(row, f"{path} item {i}") for i, row in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append((json.loads(line), f"{path}:{n}"))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


def _hub_rows(hub_id: str) -> list[tuple[dict, str]]:
    try:
        import datasets

        ds = datasets.load_dataset(hub_id, split="train")
    except Exception as e:   # offline, no token, terms not accepted: all mean "get the file another way"
        raise UserError(f"cannot load {hub_id} from the Hugging Face Hub ({type(e).__name__}). It is gated: "
                        "accept its conditions on the hub and log in (`hf auth login` or HF_TOKEN), or "
                        "download xlam_function_calling_60k.json and use task.source=jsonl task.path=FILE") from None
    return [(row, f"{hub_id} row {i}") for i, row in enumerate(ds)]


def _load_xlam(task_cfg: Any, split: str, limit: int | None, seed: int) -> list[Example]:
    source = str(task_cfg.source)
    rows = _hub_rows(str(task_cfg.xlam.hub_id)) if source == "xlam" else _read_rows(task_cfg.path)
    examples = dedupe((xlam_example(row, where, source) for row, where in rows),
                      key=lambda ex: json.dumps(ex.fields, sort_keys=True))
    # Split by the query text: copies of one query (with other tools or answers) all land on one side.
    query = lambda ex: ex.fields["query"]  # noqa: E731
    chosen = select_split(examples, query, split, int(task_cfg.split_seed), float(task_cfg.test_fraction),
                          int(task_cfg.test_size))
    return sample(chosen, lambda ex: ex.id, limit, seed)


# ---- BFCL (offline, from the bfcl-eval wheel) ----------------------------------------------------------

def _bfcl_lines(relpath: str) -> list[dict]:
    """BFCL's .json files are JSON Lines."""
    try:
        root = resources.files("bfcl_eval") / "data"
    except ModuleNotFoundError:
        raise UserError("BFCL data needs the bfcl-eval package: pip install --no-deps bfcl-eval==2026.3.23 "
                        "(or run `make venv`)") from None
    text = (root / relpath).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def bfcl_example(question: dict, answer: dict, category: str) -> Example:
    turns = question["question"]
    if len(turns) != 1:
        raise ValueError(f"{question['id']}: expected one turn, got {len(turns)}")
    system = [m["content"] for m in turns[0] if m["role"] == "system"]
    user = [m["content"] for m in turns[0] if m["role"] == "user"]
    if len(user) != 1 or len(system) + len(user) != len(turns[0]):
        raise ValueError(f"{question['id']}: expected optional system messages and one user message")
    fields: dict[str, Any] = {"query": user[0], "tools": question["function"],
                              "ground_truth": answer["ground_truth"], "grader": "bfcl", "category": category}
    if system:
        fields["system"] = "\n\n".join(system)
    return Example(id=question["id"], task=TASK, source=f"bfcl:{category}", fields=fields)


def load_bfcl_category(category: str) -> list[Example]:
    if category not in BFCL_CATEGORIES:
        raise UserError(f"unknown BFCL category {category!r}; valid: {', '.join(BFCL_CATEGORIES)}")
    questions = _bfcl_lines(f"BFCL_v4_{category}.json")
    answers = {a["id"]: a for a in _bfcl_lines(f"possible_answer/BFCL_v4_{category}.json")}
    return [bfcl_example(q, answers[q["id"]], category) for q in questions]


def _bfcl_categories(task_cfg: Any, split: str) -> list[str]:
    train, test = list(task_cfg.bfcl.train_categories), list(task_cfg.bfcl.test_categories)
    shared = sorted(set(train) & set(test))
    if shared:
        raise UserError(f"BFCL categories {shared} are in both task.bfcl.train_categories and test_categories; "
                        "keep the two lists disjoint")
    return test if split == "test" else train


def _load_bfcl(task_cfg: Any, split: str, limit: int | None, seed: int) -> list[Example]:
    cats = _bfcl_categories(task_cfg, split)
    bad = {i for cat in cats for i in gold_failures(cat)}
    examples = [ex for cat in cats for ex in load_bfcl_category(cat) if ex.id not in bad]
    if bad:
        _report_once(f"BFCL {split} ({', '.join(cats)}): excluded {len(bad)} examples whose gold answer fails "
                     f"the verifier itself: {', '.join(sorted(bad))}")
    return sample(examples, lambda ex: ex.id, limit, seed)


# ---- gold answers the verifier rejects -----------------------------------------------------------------
# A few BFCL entries contradict their own function docs (e.g. a param the doc requires is optional in the
# gold): no output can pass them, so their reward is always 0. They are excluded from both splits and
# listed in the run manifest (`excluded`).

def _pick(options: Any, omit_optional: bool) -> tuple[bool, Any]:
    """(present, value): the first non-"" alternative, or absent where "" allows it (and we omit)."""
    options = options if isinstance(options, list) else [options]
    values = [o for o in options if o != ""]
    if not values or ("" in options and omit_optional):
        return False, None
    return True, values[0]


def _concrete(value: Any, omit_optional: bool) -> Any:
    """A model-style value of one gold alternative: BFCL dicts (one level) hold alternatives per key."""
    def one(d: dict) -> dict:
        return {k: v for k, (present, v) in ((k, _pick(o, omit_optional)) for k, o in d.items()) if present}
    if isinstance(value, dict):
        return one(value)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [one(v) for v in value]
    return value


def gold_completion(example: Example, omit_optional: bool = True) -> str:
    """The gold answer as a leaderboard-format completion: one `<tool_call>` block per call, each
    parameter its first alternative, optional ones left out (`omit_optional`) or filled in."""
    f = example.fields
    if f["grader"] == "bfcl":
        calls = [{"name": name, "arguments": {p: _concrete(v, omit_optional) for p, (present, v) in
                                              ((p, _pick(alts, omit_optional)) for p, alts in args.items()) if present}}
                 for call in f["ground_truth"] for name, args in call.items()]
    else:
        calls = f["answers"]
    return "".join(f"<tool_call>\n{json.dumps(c, ensure_ascii=False)}\n</tool_call>\n" for c in calls)


def gold_passes(example: Example) -> bool:
    """Does some gold completion (optional params left out, or all filled in) pass the strict verifier?"""
    return any(verify_strict(example, gold_completion(example, omit)).correct for omit in (True, False))


@lru_cache(maxsize=None)
def gold_failures(category: str) -> tuple[str, ...]:
    """Ids of the BFCL examples of `category` whose gold answer fails the verifier."""
    return tuple(ex.id for ex in load_bfcl_category(category) if not gold_passes(ex))


def excluded(task_cfg: Any, split: str) -> list[str]:
    """The example ids of `split` left out because their gold fails the verifier (for the manifest)."""
    if str(task_cfg.source) != "bfcl":
        return []
    return sorted(i for cat in _bfcl_categories(task_cfg, split) for i in gold_failures(cat))


_REPORTED: set[str] = set()


def _report_once(message: str) -> None:
    if message not in _REPORTED:
        _REPORTED.add(message)
        print(message, file=sys.stderr)


# ---- task interface ------------------------------------------------------------------------------------

def load(task_cfg: Any, split: str, limit: int | None, seed: int) -> list[Example]:
    """`limit` examples of `split` (all of it when None): the first after a shuffle seeded by `seed`, so
    a small limit mixes categories. The split itself depends only on the task config."""
    check_split(split)
    source = str(task_cfg.source)
    if source == "bfcl":
        return _load_bfcl(task_cfg, split, limit, seed)
    if source in ("xlam", "jsonl"):
        return _load_xlam(task_cfg, split, limit, seed)
    raise UserError(f"unknown task.source={source!r} for function_calling; valid: bfcl, xlam, jsonl")


def render_tools(tools: list[dict]) -> str:
    """One JSON object per line, wrapped as Qwen2.5's chat template lists tools."""
    return "\n".join(json.dumps({"type": "function", "function": t}, ensure_ascii=False) for t in tools)


def messages(example: Example, prompts_cfg: Any) -> list[dict]:
    f = example.fields
    system = str(prompts_cfg.system).format(tools=render_tools(f["tools"]))
    if f.get("system"):   # BFCL's own system message comes first; ours adds the tools and the format
        system = f"{f['system']}\n\n{system}"
    return [{"role": "system", "content": system},
            {"role": "user", "content": str(prompts_cfg.user).format(query=f["query"])}]


def verify(example: Example, completion: str, *, strict: bool = False):
    from rrr.verifiers import function_calling as fc

    f = example.fields
    if f["grader"] == "bfcl":
        return fc.verify_bfcl(completion, f["ground_truth"], f["tools"], strict=strict)
    return fc.verify(completion, f["answers"], f["tools"], strict=strict)


def verify_strict(example: Example, completion: str):
    """The leaderboard-format verdict (BFCL's Qwen pipeline reads `<tool_call>\\n…\\n</tool_call>` only);
    evaluations report it beside `verify`, the lenient reward."""
    return verify(example, completion, strict=True)


def answer_in(example: Example, text: str) -> bool:
    """Does `text` hold at least one tool call the verifier can parse (right or wrong)?"""
    from rrr.verifiers.function_calling import call_cap, parse_calls

    f = example.fields
    gold = f["ground_truth"] if f["grader"] == "bfcl" else f["answers"]
    return bool(parse_calls(text, call_cap(len(json.loads(gold) if isinstance(gold, str) else gold))))
