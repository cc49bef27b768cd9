"""Countdown verifier: does the last `<answer>…</answer>` use each given number exactly once and equal the target?

Grammar of the answer (nothing else is accepted):

    answer := expr [ "=" N ]          N must equal the target
    expr   := term (("+" | "-") term)*
    term   := atom (("*" | "/") atom)*
    atom   := LITERAL | "(" expr ")"   LITERAL: unsigned decimal integer, no leading zeros

The literals must equal the given numbers as a multiset. Arithmetic is exact (`Fraction`), so
fractional intermediates are fine and division by zero is incorrect. Rejected on purpose: `**`, `//`,
`%`, unary minus, decimals, names and calls (data.md §3.5 lists how other scorers let these slip
through). Model text is never eval'ed; the parser is iterative (shunting-yard) so deep nesting cannot
hit the recursion limit, and answer length and literal size are capped so hostile input stays fast.
"""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction

from rrr.verifiers import Verdict

OPEN, CLOSE = "<answer>", "</answer>"
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
# One regex alternative per token kind; anything matched by the catch-all `.` is a syntax error.
_TOKEN = re.compile(r"\s+|[0-9]*\.[0-9]+|[0-9]+|\*\*|//|[-+*/()]|%|[A-Za-z_]\w*|.", re.S)
_FORBIDDEN = {"**": "'**' not allowed", "//": "'//' not allowed", "%": "'%' not allowed"}
_WHITESPACE = re.compile(r"\s+")
_RHS = re.compile(r"\s*(-?[0-9]+)\s*")


class LiteralTooLong(ValueError):
    """A literal with more digits than any given number: it cannot be one of them (e.g. concatenation)."""


def extract_answer(completion: str) -> str | None:
    """The text between the last `</answer>` and the nearest `<answer>` before it (None if absent)."""
    end = completion.rfind(CLOSE)
    if end < 0:
        return None
    start = completion.rfind(OPEN, 0, end)
    return None if start < 0 else completion[start + len(OPEN):end]


def answer_is_parsable(completion: str, nums: list[int]) -> bool:
    """The last `<answer>` block parses as an expression of this grammar (right or wrong, any numbers)."""
    answer = extract_answer(completion)
    if answer is None or len(answer) > answer_cap(nums):
        return False
    expr = answer.partition("=")[0]
    try:
        to_rpn(tokenize(expr, max(len(str(n)) for n in nums) if nums else 1))
    except ValueError:
        return False
    return True


def answer_cap(nums: list[int]) -> int:
    """Most characters a sane answer needs: generous room for spaces and redundant parentheses."""
    return 4096 + 64 * len(nums)


def tokenize(expr: str, max_literal_len: int) -> list[str | int]:
    """Integer literals become ints, operators and parentheses stay strings; raise ValueError on bad syntax."""
    tokens: list[str | int] = []
    for m in _TOKEN.finditer(expr):
        tok = m.group()
        if tok.isspace():
            continue
        if tok in _FORBIDDEN:
            raise ValueError(_FORBIDDEN[tok])
        if tok[0] in "0123456789" and tok.isdigit():
            if len(tok) > 1 and tok[0] == "0":
                raise ValueError(f"leading zero in {tok[:20]!r}")
            if len(tok) > max_literal_len:  # cannot equal any given number; also keeps int() cheap
                raise LiteralTooLong(f"literal {tok[:20]} is not a given number")
            tokens.append(int(tok))
        elif tok in PRECEDENCE or tok in "()":
            tokens.append(tok)
        elif "." in tok and tok != ".":
            raise ValueError(f"decimal {tok[:20]!r} not allowed")
        elif tok[0].isalpha() or tok[0] == "_":
            raise ValueError(f"name {tok[:20]!r} not allowed")
        else:
            raise ValueError(f"unexpected {tok!r}")
    if not tokens:
        raise ValueError("empty expression")
    return tokens


def to_rpn(tokens: list[str | int]) -> list[str | int]:
    """Shunting-yard with a two-state check (operand expected / operator expected); ValueError on bad syntax."""
    out: list[str | int] = []
    ops: list[str] = []
    want_operand = True
    for tok in tokens:
        if want_operand:
            if isinstance(tok, int):
                out.append(tok)
                want_operand = False
            elif tok == "(":
                ops.append(tok)
            elif tok == "-":
                raise ValueError("unary minus not allowed")
            else:
                raise ValueError(f"expected a number or '(' before {tok!r}")
        elif tok == ")":
            while ops and ops[-1] != "(":
                out.append(ops.pop())
            if not ops:
                raise ValueError("unbalanced ')'")
            ops.pop()
        elif isinstance(tok, str) and tok in PRECEDENCE:
            while ops and ops[-1] != "(" and PRECEDENCE[ops[-1]] >= PRECEDENCE[tok]:
                out.append(ops.pop())
            ops.append(tok)
            want_operand = True
        else:
            raise ValueError(f"expected an operator before {tok!r}")  # e.g. `2 3` or `2(3)`
    if want_operand:
        raise ValueError("expression ends with an operator")
    while ops:
        op = ops.pop()
        if op == "(":
            raise ValueError("unbalanced '('")
        out.append(op)
    return out


def evaluate_rpn(rpn: list[str | int]) -> Fraction:
    """Exact value; ZeroDivisionError on division by zero."""
    stack: list[Fraction] = []
    for tok in rpn:
        if isinstance(tok, int):
            stack.append(Fraction(tok))
            continue
        b, a = stack.pop(), stack.pop()
        if tok == "+":
            stack.append(a + b)
        elif tok == "-":
            stack.append(a - b)
        elif tok == "*":
            stack.append(a * b)
        else:
            stack.append(a / b)
    return stack[0]


def _split_rhs(answer: str, target: int) -> tuple[str, str | None]:
    """Drop a trailing `= N`; return (expression, error reason or None)."""
    if "=" not in answer:
        return answer, None
    lhs, _, rhs = answer.partition("=")
    m = _RHS.fullmatch(rhs)
    if m is None or len(m.group(1)) > 40:
        return lhs, "syntax: only a trailing '= <target>' is allowed"
    if int(m.group(1)) != target:
        return lhs, f"wrong_rhs: '= {m.group(1)}', want {target}"
    return lhs, None


def _fmt(value: Fraction) -> str:
    """str(value), or its size when huge (str() of a > 4300-digit int raises ValueError)."""
    bits = max(value.numerator.bit_length(), value.denominator.bit_length())
    return str(value) if bits <= 256 else f"a number of ~{int(bits * 0.30103)} digits"


def _short(xs: list[int], limit: int = 8) -> str:
    xs = sorted(xs)
    return str(xs) if len(xs) <= limit else f"{xs[:limit]}... ({len(xs)} numbers)"


def verify(completion: str, nums: list[int], target: int) -> Verdict:
    """Binary Countdown verdict; never raises on model text."""
    answer = extract_answer(completion)
    if answer is None:
        return Verdict(False, "no_answer")
    answer = _WHITESPACE.sub(" ", answer).strip()   # whitespace is free: only the rest counts to the cap
    if len(answer) > answer_cap(nums):
        return Verdict(False, f"too_long: {len(answer)} chars", None)
    if not answer:
        return Verdict(False, "empty_answer", answer)
    expr, rhs_error = _split_rhs(answer, target)
    if rhs_error:
        return Verdict(False, rhs_error, answer)
    max_literal_len = max((len(str(n)) for n in nums), default=1)
    try:
        rpn = to_rpn(tokenize(expr, max_literal_len))
    except LiteralTooLong as e:
        return Verdict(False, f"numbers_mismatch: {e}", answer)
    except ValueError as e:
        return Verdict(False, f"syntax: {e}", answer)
    used = [t for t in rpn if isinstance(t, int)]
    if Counter(used) != Counter(nums):
        return Verdict(False, f"numbers_mismatch: used {_short(used)}, given {_short(list(nums))}", answer)
    try:
        value = evaluate_rpn(rpn)
    except ZeroDivisionError:
        return Verdict(False, "div_by_zero", answer)
    if value != target:
        return Verdict(False, f"wrong_value: got {_fmt(value)}, want {target}", answer)
    return Verdict(True, "ok", answer)
