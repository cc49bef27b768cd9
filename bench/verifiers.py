"""Verifier throughput (verdicts/s) on generated completions, a mix of correct and incorrect ones.

    python -m bench.verifiers [--n 20000] [--seed 0]

Countdown: 3-4 numbers in 1..99, a random expression as witness, completions with a think block and one
of: the right answer, a wrong value, wrong numbers, forbidden syntax, no answer block.
Function calling (xLAM `verify`): 1-3 gold calls over random tools with defaults, completions as
tool_call blocks / fenced JSON / bare JSON after prose, correct or with a wrong value, name or count, or
unparsable. BFCL (`verify_bfcl`): real BFCL entries from the bfcl-eval wheel with random alternatives.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from fractions import Fraction
from typing import Callable

from rrr.verifiers import countdown, function_calling

THINK = "<think>" + "Let me try a few combinations of the numbers. " * 5 + "</think>\n"


def countdown_case(rng: random.Random) -> tuple[str, list[int], int]:
    nums = [rng.randint(1, 99) for _ in range(rng.choice((3, 4)))]
    expr, value = str(nums[0]), Fraction(nums[0])
    for n in nums[1:]:
        op = rng.choice("+-*")
        expr, value = f"({expr} {op} {n})", {"+": value + n, "-": value - n, "*": value * n}[op]
    target = int(value)
    kind = rng.random()
    if kind < 0.4:
        answer = expr
    elif kind < 0.55:
        answer, target = expr, target + 1
    elif kind < 0.7:
        answer = expr.replace(str(nums[-1]), str(nums[-1] + 1), 1)
    elif kind < 0.85:
        answer = "-" + expr + "**1"
    else:
        return THINK + f"The answer is {expr}.", nums, target
    return THINK + f"<answer>{answer}</answer>", nums, target


def xlam_case(rng: random.Random) -> tuple[str, list[dict], list[dict]]:
    tools = [{"name": f"tool_{i}", "description": "",
              "parameters": {"query": {"type": "str", "description": ""},
                             "limit": {"type": "int", "description": "", "default": 10}}}
             for i in range(rng.randint(1, 4))]
    gold = [{"name": rng.choice(tools)["name"],
             "arguments": {"query": rng.choice(["paris", "berlin", "tokyo"]), "limit": rng.choice([5, 10])}}
            for _ in range(rng.randint(1, 3))]
    pred = json.loads(json.dumps(gold))
    rng.shuffle(pred)
    kind = rng.random()
    if kind < 0.15:
        pred[0]["arguments"]["query"] = "rome"
    elif kind < 0.25:
        pred[0]["name"] = "other"
    elif kind < 0.35:
        pred.append(pred[0])
    form = rng.random()
    if kind > 0.9:
        text = "I would call " + json.dumps(pred)[:-3]
    elif form < 0.5:
        text = "\n".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in pred)
    elif form < 0.75:
        text = f"```json\n{json.dumps(pred, indent=2)}\n```"
    else:
        text = "Here are the calls: " + json.dumps(pred)
    return text, gold, tools


def bfcl_cases(rng: random.Random, n: int) -> list[tuple[str, list[dict], list[dict]]]:
    from importlib.resources import files

    data = files("bfcl_eval") / "data"
    entries = []
    for cat in ("simple_python", "multiple", "parallel", "parallel_multiple", "live_simple", "live_multiple"):
        answers = {a["id"]: a["ground_truth"] for a in
                   map(json.loads, (data / "possible_answer" / f"BFCL_v4_{cat}.json").read_text().splitlines())}
        entries += [(answers[q["id"]], q["function"]) for q in
                    map(json.loads, (data / f"BFCL_v4_{cat}.json").read_text().splitlines())]
    cases = []
    for _ in range(n):
        gt, docs = rng.choice(entries)
        calls = [{"name": name, "arguments": {p: rng.choice([a for a in alts if a != ""])
                                              for p, alts in params.items() if any(a != "" for a in alts)}}
                 for g in gt for name, params in g.items()]
        if rng.random() < 0.4 and calls[0]["arguments"]:
            key = next(iter(calls[0]["arguments"]))
            calls[0]["arguments"][key] = "wrong"
        rng.shuffle(calls)
        cases.append((json.dumps(calls), gt, docs))
    return cases


def bench(name: str, cases: list, verify: Callable) -> float:
    t0 = time.perf_counter()
    correct = sum(verify(*case).correct for case in cases)
    dt = time.perf_counter() - t0
    print(f"{name:28s} {len(cases) / dt:10,.0f} verdicts/s  ({len(cases)} cases, {correct / len(cases):.0%} correct)")
    return len(cases) / dt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rates = {"countdown": bench("countdown", [countdown_case(rng) for _ in range(args.n)], countdown.verify),
             "function_calling (xLAM)": bench("function_calling (xLAM)", [xlam_case(rng) for _ in range(args.n)],
                                              function_calling.verify)}
    try:
        rates["function_calling (BFCL)"] = bench("function_calling (BFCL)", bfcl_cases(rng, args.n),
                                                 function_calling.verify_bfcl)
    except ModuleNotFoundError:
        print("function_calling (BFCL): skipped, bfcl-eval is not installed")
    print("BENCH_JSON " + json.dumps({"bench": "verifiers", "n": args.n, "verdicts_per_s": rates}))


if __name__ == "__main__":
    main()
