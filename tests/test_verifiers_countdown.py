"""Countdown verifier: one test per rule of the answer grammar, a property test against an independent
evaluator, and timing bounds on hostile input."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest

from rrr.verifiers import Verdict
from rrr.verifiers.countdown import extract_answer, verify


def ans(expr: str) -> str:
    return f"<think>some work</think>\n<answer>{expr}</answer>"


def reason_code(v: Verdict) -> str:
    return v.reason.split(":")[0]


# ---------------------------------------------------------------- extraction

@pytest.mark.parametrize("completion, expected", [
    ("<answer>1+2</answer>", "1+2"),
    ("<answer>9</answer> then <answer>1+2</answer> trailing", "1+2"),       # the last block
    ("<answer>x <answer>1+2</answer>", "1+2"),                              # the nearest opening tag
    ("<answer>1+2</answer> and </answer>", "1+2</answer> and "),            # the last closing tag
    ("no tags", None),
    ("<answer>1+2", None),
    ("1+2</answer>", None),
    ("</answer><answer>1+2", None),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_last_answer_block_is_graded():
    assert verify("<answer>1+2+3</answer> no wait <answer>(1+2)*3</answer>", [1, 2, 3], 9).correct
    assert not verify("<answer>(1+2)*3</answer> no wait <answer>1+2+3</answer>", [1, 2, 3], 9).correct


def test_no_answer_and_empty_answer():
    assert reason_code(verify("the answer is (1+2)*3", [1, 2, 3], 9)) == "no_answer"
    assert verify("the answer is (1+2)*3", [1, 2, 3], 9).parsed is None
    assert reason_code(verify("<answer></answer>", [1, 2, 3], 9)) == "empty_answer"
    assert reason_code(verify("<answer> \n\t </answer>", [1, 2, 3], 9)) == "empty_answer"
    assert reason_code(verify("<answer>(1+2)*3", [1, 2, 3], 9)) == "no_answer"


# ---------------------------------------------------------------- allowed syntax

@pytest.mark.parametrize("expr, nums, target", [
    ("(1+2)*3", [1, 2, 3], 9),
    ("1 + 2 + 3", [1, 2, 3], 6),
    ("\n  ( 7 -\t2 ) * 3 \n", [7, 2, 3], 15),
    ("((((1))))", [1], 1),
    ("8 - 3 - 2", [8, 3, 2], 3),            # left associative
    ("8 / 4 / 2", [8, 4, 2], 1),            # left associative
    ("2 + 3 * 4", [2, 3, 4], 14),           # precedence
    ("(2 + 3) * 4", [2, 3, 4], 20),
    ("10 - 2 * 3 + 4 / 2", [10, 2, 3, 4, 2], 6),
    ("0 * 5 + 7", [0, 5, 7], 7),            # 0 is a literal without a leading zero
    ("100 - 1", [100, 1], 99),
    ("5 - 9", [5, 9], -4),                  # binary minus may give a negative value
])
def test_allowed_expressions(expr, nums, target):
    v = verify(ans(expr), nums, target)
    assert v == Verdict(True, "ok", " ".join(expr.split()))   # parsed: the answer, whitespace collapsed


def test_any_count_of_numbers():
    assert verify(ans("7"), [7], 7).correct
    assert verify(ans("1+2+3+4+5+6"), [6, 5, 4, 3, 2, 1], 21).correct
    nums = list(range(1, 51))
    assert verify(ans("+".join(map(str, nums))), nums, sum(nums)).correct
    assert not verify(ans("+".join(map(str, nums[:-1]))), nums, sum(nums[:-1])).correct


# ---------------------------------------------------------------- numbers: multiset equality

@pytest.mark.parametrize("expr, nums, target", [
    ("3 + 3 + 4", [3, 4, 5], 10),          # reuse + missing
    ("3 + 4", [3, 4, 5], 7),               # missing
    ("3 + 4 + 5 + 1", [3, 4, 5], 13),      # extra literal
    ("7 + 2", [2, 2, 7], 9),               # a duplicate given number used once
    ("7 + 2 + 2 + 2", [2, 2, 7], 13),      # ... or three times
    ("12 + 3", [1, 2, 3], 15),             # concatenation
    ("1 + 23", [1, 2, 3], 24),
])
def test_numbers_must_match_as_multiset(expr, nums, target):
    assert reason_code(verify(ans(expr), nums, target)) == "numbers_mismatch"


def test_duplicates_used_as_often_as_given():
    assert verify(ans("7 * 2 / 2"), [2, 2, 7], 7).correct
    assert verify(ans("7/2*2"), [2, 2, 7], 7).correct


# ---------------------------------------------------------------- exact arithmetic

def test_fractional_intermediates_are_exact():
    assert verify(ans("(1/3 + 1/3 + 1/3) * 6"), [1, 3, 1, 3, 1, 3, 6], 6).correct
    assert verify(ans("6 / (1 - 3/4)"), [6, 1, 3, 4], 24).correct


def test_close_is_not_equal():
    # float scorers with a 1e-5 tolerance accept this; exact arithmetic does not
    v = verify(ans("1000000 / 1000001"), [1000000, 1000001], 1)
    assert reason_code(v) == "wrong_value" and "1000000/1000001" in v.reason


def test_wrong_value_reason():
    assert verify(ans("1+2+3"), [1, 2, 3], 9).reason == "wrong_value: got 6, want 9"
    assert verify(ans("7/2"), [7, 2], 3).reason == "wrong_value: got 7/2, want 3"


@pytest.mark.parametrize("expr, nums", [
    ("8 / (3 - 3)", [8, 3, 3]),
    ("(1 / (2 - 2)) * 0", [1, 2, 2, 0]),     # even when the final result would not need it
    ("0 / 0", [0, 0]),
])
def test_division_by_zero_is_incorrect(expr, nums):
    assert verify(ans(expr), nums, 0).reason == "div_by_zero"


# ---------------------------------------------------------------- trailing "= N"

def test_trailing_equals_target_is_accepted():
    assert verify(ans("(1+2)*3 = 9"), [1, 2, 3], 9).correct
    assert verify(ans("(1+2)*3=9"), [1, 2, 3], 9).correct
    assert verify(ans("5 - 9 = -4"), [5, 9], -4).correct


@pytest.mark.parametrize("expr", [
    "(1+2)*3 = 8",          # N is not the target
    "1+2+3 = 9",            # N is the target but the expression is not
    "(1+2)*3 = 9 = 9",
    "9 = (1+2)*3",
    "(1+2)*3 =",
    "(1+2)*3 = nine",
    "(1+2)*3 = 9.0",
    "(1+2)*3 == 9",
    "= 9",
])
def test_bad_equals_forms_are_rejected(expr):
    assert not verify(ans(expr), [1, 2, 3], 9).correct


# ---------------------------------------------------------------- rejected syntax

@pytest.mark.parametrize("expr, nums, target", [
    ("2**3+1", [1, 2, 3], 9),              # power
    ("2 * * 3 + 1", [1, 2, 3], 9),
    ("7//2+1", [1, 2, 7], 4),              # floor division
    ("7 % 5 + 1", [7, 5, 1], 3),           # modulo
    ("-3+5+10", [3, 5, 10], 12),           # unary minus, leading
    ("5 * -3 + 27", [5, 3, 27], 12),       # unary minus after an operator
    ("(-3) + 15", [3, 15], 12),            # unary minus after "("
    ("+3 + 9", [3, 9], 12),                # unary plus
    ("3.0*2", [0, 2, 3], 6),               # decimals
    ("3.*2", [3, 2], 6),
    (".5*12", [5, 12], 6),
    ("6e0", [6], 6),                       # exponent notation
    ("x", [1], 1),                         # names
    ("abs(3)", [3], 3),                    # calls
    ("int(3)", [3], 3),
    ("03 + 3", [3, 3], 6),                 # leading zero
    ("00 + 6", [0, 6], 6),
    ("3!+1", [1, 3], 7),                   # factorial
    ("2^3+1", [1, 2, 3], 9),
    ("[1+2]*3", [1, 2, 3], 9),             # other brackets
    ("{1+2}*3", [1, 2, 3], 9),
    ("1+2,3", [1, 2, 3], 6),
    ("(1+2)*3;", [1, 2, 3], 9),
    ("3 × 3", [3, 3], 9),                  # non-ASCII operators
    ("6 ÷ 2", [6, 2], 3),
    ("٣ + 6", [3, 6], 9),                  # non-ASCII digits
    ("1 2", [1, 2], 3),                    # juxtaposition
    ("2(3)", [2, 3], 6),
    ("(1)(2)", [1, 2], 2),
    ("()", [], 0),
    ("(1+2", [1, 2], 3),                   # unbalanced
    ("1+2)", [1, 2], 3),
    ("1+", [1], 1),                        # dangling operator
    ("*1", [1], 1),
    ("1 + 2 # comment", [1, 2], 3),
    ("0x3 + 6", [0, 3, 6], 9),
    ("3_0", [30], 30),
])
def test_rejected_syntax(expr, nums, target):
    v = verify(ans(expr), nums, target)
    assert not v.correct
    assert reason_code(v) in {"syntax", "numbers_mismatch"}, v.reason


def test_forbidden_operators_have_clear_reasons():
    assert "'**'" in verify(ans("2**3+1"), [1, 2, 3], 9).reason
    assert "'//'" in verify(ans("7//2+1"), [1, 2, 7], 4).reason
    assert "unary minus" in verify(ans("-3+5+10"), [3, 5, 10], 12).reason
    assert "decimal" in verify(ans("3.0*2"), [0, 2, 3], 6).reason


# ---------------------------------------------------------------- property: agrees with an independent evaluator

def _random_tree(rng: random.Random, nums: list[int]):
    if len(nums) == 1:
        return nums[0]
    k = rng.randrange(1, len(nums))
    return (rng.choice("+-*/"), _random_tree(rng, nums[:k]), _random_tree(rng, nums[k:]))


def _render(tree, rng: random.Random) -> str:
    """Fully parenthesised, with random spaces and redundant parentheses."""
    if isinstance(tree, int):
        text = str(tree)
    else:
        op, a, b = tree
        text = f"({_render(a, rng)}{' ' * rng.randrange(2)}{op}{' ' * rng.randrange(2)}{_render(b, rng)})"
    extra = rng.randrange(2)
    return "(" * extra + text + ")" * extra


def _value(tree) -> Fraction | None:
    """Exact value, None on division by zero anywhere in the tree."""
    if isinstance(tree, int):
        return Fraction(tree)
    op, a, b = tree
    x, y = _value(a), _value(b)
    if x is None or y is None or (op == "/" and y == 0):
        return None
    return {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else None}[op]


def test_random_fully_parenthesised_expressions_match_exact_evaluation():
    rng = random.Random(0)
    for _ in range(500):
        nums = [rng.randrange(0, 30) for _ in range(rng.randrange(1, 7))]
        tree = _random_tree(rng, nums)
        expr, value = _render(tree, rng), _value(tree)
        shuffled = rng.sample(nums, len(nums))
        if value is None:
            assert verify(ans(expr), shuffled, 0).reason == "div_by_zero"
        elif value.denominator == 1:
            assert verify(ans(expr), shuffled, int(value)).correct, expr
            assert not verify(ans(expr), shuffled, int(value) + 1).correct
        else:
            assert not verify(ans(expr), shuffled, int(value)).correct


def test_random_garbage_always_gives_a_verdict():
    rng = random.Random(1)
    alphabet = "0123456789+-*/()=. xa<>%^"
    for _ in range(2000):
        body = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        v = verify(f"<answer>{body}</answer>", [1, 2, 3], 6)
        assert isinstance(v, Verdict) and isinstance(v.correct, bool) and v.reason


# ---------------------------------------------------------------- hostile input: bounded time, never raises

MB = 1_000_000


def _best_time(fn, repeats: int = 3) -> float:
    """Best of a few runs: the box is shared, and a bound on the best run is what the code controls."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


HOSTILE = {  # name: (completion, nums, target, expected verdict)
    "huge exponent": ("<answer>99**98**97</answer>", [97, 98, 99], 1, False),
    "huge exponent, spaced": ("<answer>99 * * 98 * * 97</answer>", [97, 98, 99], 1, False),
    "huge literal": ("<answer>" + "9" * MB + "</answer>", [9], 9, False),
    "huge literal, small answer cap": ("<answer>" + "9" * 4000 + "+1</answer>", [9, 1], 10, False),
    "1 MB without tags": ("x" * MB, [1, 2], 3, False),
    "1 MB of open tags": ("<answer>" * (MB // 8), [1, 2], 3, False),
    "1 MB of close tags": ("</answer>" * (MB // 9), [1, 2], 3, False),
    "1 MB of answer blocks": ("<answer>1+2</answer>" * (MB // 20), [1, 2], 3, True),
    "deep nesting 1 MB": ("<answer>" + "(" * (MB // 2) + "1" + ")" * (MB // 2) + "</answer>", [1], 1, False),
    "deep nesting unclosed": ("<answer>" + "(" * MB + "</answer>", [1], 1, False),
    "long sum": ("<answer>" + "1+" * (MB // 2) + "1</answer>", [1, 1], 2, False),
    "long product": ("<answer>" + "99*" * 3000 + "99</answer>", [99] * 3001, 1, False),   # > 4300 digits
    "1 MB whitespace": ("<answer>" + " \n" * (MB // 2) + "1 +" + " " * MB + "2</answer>", [1, 2], 3, True),
    "1 MB of equals": ("<answer>1+2" + "=" * MB + "</answer>", [1, 2], 3, False),
    "1 MB of rhs digits": ("<answer>1+2=" + "3" * MB + "</answer>", [1, 2], 3, False),
    "many decimals": ("<answer>" + "1.5+" * 2000 + "1</answer>", [1], 1, False),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_is_fast_and_safe(name):
    completion, nums, target, expected = HOSTILE[name]
    result: list[Verdict] = []
    elapsed = _best_time(lambda: result.append(verify(completion, nums, target)))
    assert isinstance(result[0], Verdict) and result[0].correct is expected
    assert elapsed < 0.1, f"{name}: {elapsed * 1000:.1f} ms"


def test_deep_but_sane_nesting_is_correct():
    depth = 1000
    assert verify(ans("(" * depth + "1+2" + ")" * depth), [1, 2], 3).correct


def test_large_but_legal_numbers():
    big = 10 ** 30 + 7
    assert verify(ans(f"{big} * {big} / {big}"), [big, big, big], big).correct


# ---------------------------------------------------------------- hygiene

def test_no_eval_exec_or_sympy_in_verifiers():
    src_dir = Path(__file__).resolve().parent.parent / "rrr" / "verifiers"
    for path in src_dir.glob("*.py"):
        src = path.read_text()
        assert not re.search(r"(?<![.\w])(eval|exec|compile)\s*\(", src), path.name  # re.compile is fine
        assert "sympy" not in src and "ast.parse" not in src, path.name


def test_importing_verifiers_does_not_import_torch():
    code = ("import sys, rrr.verifiers, rrr.verifiers.countdown, rrr.verifiers.function_calling; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
