"""Countdown: reach `target` with each of `nums` exactly once, using + - * / and parentheses.

Sources (`task.source`):
- `generated` (default, offline): a procedural generator that only emits solvable problems. For each
  drawn number set an exact solver lists every reachable value; the target is drawn uniformly from the
  reachable integers in [target_min, target_max] and one witness expression is stored (data.md §3.4).
- `hub`: `Jiayi-Pan/Countdown-Tasks-3to4` through `datasets` (one `train` split; we split it by hash).
- `parquet`: a local parquet file with the same columns (`target`, `nums`), e.g. a downloaded copy.

Fields: nums (list[int]), target (int), witness (str, one solution; None for hub/parquet rows, which
nobody has checked to be solvable — `solve(nums, target)` finds one).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from math import gcd
from pathlib import Path
from typing import Any

from rrr.config import UserError
from rrr.tasks import Example
from rrr.tasks.splits import check_split, content_id, dedupe, key_hash, sample, select_split, split_of

TASK = "countdown"
Rational = tuple[int, int]   # (numerator, denominator), reduced, denominator > 0; ~8x faster than Fraction here
# Consecutive generator misses (unsolvable or duplicate draws) before the knobs are declared impossible.
MAX_MISSES = 2_000
MAX_SPLIT_MISSES = 1_000_000
MAX_NUMBERS = 5       # solving every draw exactly: 0.15 s for 5 numbers, 3.4 s for 6 (measured), exponential after
MAX_VALUE = 1_000_000


# ---- exact solver --------------------------------------------------------------------------------------

def _combine(a: Rational, b: Rational) -> list[tuple[int, int, str, bool]]:
    """Every `a op b` and `b op a` as unreduced (numerator, denominator > 0, operator, swapped); no
    division by zero."""
    (ap, aq), (bp, bq) = a, b
    q = aq * bq
    out = [(ap * bq + bp * aq, q, "+", False), (ap * bq - bp * aq, q, "-", False),
           (bp * aq - ap * bq, q, "-", True), (ap * bp, q, "*", False)]
    if bp:
        out.append((ap * bq, aq * bp, "/", False) if bp > 0 else (-ap * bq, -aq * bp, "/", False))
    if ap:
        out.append((bp * aq, bq * ap, "/", True) if ap > 0 else (-bp * aq, -bq * ap, "/", True))
    return out


def reachable(nums: list[int], integers_in: tuple[int, int] | None = None) -> dict[Rational, str]:
    """Every value reachable from `nums` (each used exactly once, + - * /, exact rational arithmetic),
    with one witness expression each. With `integers_in=(lo, hi)` only the integer values in [lo, hi]
    of the full set are kept (the generator's case; it skips most of the work at the last level).

    Dynamic programming over subsets (bitmasks): the values of a subset are all `x op y` with x from one
    part and y from the complement, over every unordered split into two non-empty parts.
    """
    n = len(nums)
    if n == 0:
        return {}
    full = (1 << n) - 1
    values: dict[int, dict[Rational, str]] = {1 << i: {(x, 1): str(x)} for i, x in enumerate(nums)}
    for mask in sorted(range(1, full + 1), key=lambda m: bin(m).count("1")):
        if mask in values:
            continue
        only_ints = integers_in if mask == full else None
        out: dict[Rational, str] = {}
        sub = (mask - 1) & mask
        while sub:
            other = mask ^ sub
            if sub > other:   # each unordered split once; the swapped operators cover the other order
                for a, ea in values[sub].items():
                    ea = ea if sub & (sub - 1) == 0 else f"({ea})"
                    for b, eb in values[other].items():
                        eb = eb if other & (other - 1) == 0 else f"({eb})"
                        for p, q, op, swapped in _combine(a, b):
                            if only_ints:
                                if p % q or not only_ints[0] <= p // q <= only_ints[1]:
                                    continue
                                v = (p // q, 1)
                            else:
                                g = gcd(p, q)
                                v = (p // g, q // g)
                            if v not in out:
                                out[v] = f"{eb} {op} {ea}" if swapped else f"{ea} {op} {eb}"
            sub = (sub - 1) & mask
        values[mask] = out
    return values[full]


def reachable_targets(nums: list[int], lo: int, hi: int) -> dict[int, str]:
    """Integer targets in [lo, hi] reachable from `nums`, each with a witness expression."""
    return {p: expr for (p, _), expr in reachable(nums, integers_in=(lo, hi)).items()}


def solve(nums: list[int], target: int) -> str | None:
    """One expression that uses every number once and equals `target`, or None if there is none."""
    return reachable_targets(nums, target, target).get(target)


# ---- procedural generator ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Knobs:
    num_numbers: tuple[int, ...]
    value_min: int
    value_max: int
    target_min: int
    target_max: int
    allow_duplicates: bool

    @classmethod
    def from_cfg(cls, g: Any) -> "Knobs":
        counts = [g.num_numbers] if isinstance(g.num_numbers, int) else g.num_numbers
        knobs = cls(num_numbers=tuple(int(k) for k in counts),
                    value_min=int(g.value_min), value_max=int(g.value_max), target_min=int(g.target_min),
                    target_max=int(g.target_max), allow_duplicates=bool(g.allow_duplicates))
        knobs.check()
        return knobs

    def check(self) -> None:
        if not self.num_numbers or min(self.num_numbers) < 1:
            raise UserError(f"task.generated.num_numbers={list(self.num_numbers)}: give counts >= 1, e.g. [3, 4]")
        if max(self.num_numbers) > MAX_NUMBERS:
            raise UserError(f"task.generated.num_numbers={list(self.num_numbers)}: at most {MAX_NUMBERS} numbers "
                            f"(the exact solver that proves each problem solvable takes seconds per problem at 6 "
                            f"and far longer beyond); use a hub or parquet source for larger problems")
        if min(self.value_min, self.target_min) < 0 or max(self.value_max, self.target_max) > MAX_VALUE:
            raise UserError(f"task.generated: values and targets must lie in [0, {MAX_VALUE}]")
        if self.value_max < 1:
            raise UserError("task.generated.value_max must be >= 1")
        if self.value_min > self.value_max or self.target_min > self.target_max:
            raise UserError("task.generated: value_min must be <= value_max and target_min <= target_max")
        pool = self.value_max - self.value_min + 1
        if not self.allow_duplicates and max(self.num_numbers) > pool:
            raise UserError(f"task.generated: {max(self.num_numbers)} distinct numbers cannot come from "
                            f"[{self.value_min}, {self.value_max}]; widen the range or set allow_duplicates=true")


def draw_nums(rng: random.Random, knobs: Knobs) -> list[int]:
    k = rng.choice(knobs.num_numbers)
    if knobs.allow_duplicates:
        return [rng.randint(knobs.value_min, knobs.value_max) for _ in range(k)]
    return rng.sample(range(knobs.value_min, knobs.value_max + 1), k)


def generate(knobs: Knobs, split: str, n: int, split_seed: int, test_fraction: float,
             stream_seed: int | str) -> Iterator[Example]:
    """Yield `n` distinct solvable problems of one split, lazily.

    Candidate c draws from its own RNG seeded by hash(stream_seed, c), so an item does not depend on the
    generator's history. The split is decided by the sorted number set, before the solver runs (a
    rejected draw costs a hash, not a solve) and no number set is shared between train and test."""
    seen: set[tuple[tuple[int, ...], int]] = set()
    made = misses = split_misses = 0
    c = 0
    while made < n:
        rng = random.Random(key_hash(f"item:{stream_seed}", c))
        c += 1
        nums = draw_nums(rng, knobs)
        key = tuple(sorted(nums))
        if split_of(list(key), split_seed, test_fraction) != split:
            split_misses += 1
            if split_misses > MAX_SPLIT_MISSES:
                raise UserError(f"task.test_fraction={test_fraction} leaves (almost) no number sets for the {split} split")
            continue
        split_misses = 0
        targets = reachable_targets(nums, knobs.target_min, knobs.target_max)
        target = rng.choice(sorted(targets)) if targets else None
        if target is None or (key, target) in seen:
            misses += 1
            if misses > MAX_MISSES:
                raise UserError(f"cannot find {n} distinct solvable {split} problems with task.generated={knobs}; "
                                "widen the value or target range or allow more numbers")
            continue
        misses = 0
        seen.add((key, target))
        made += 1
        yield _example(nums, target, targets[target], "generated")


def _example(nums: list[int], target: int, witness: str | None, source: str) -> Example:
    return Example(id=content_id("cd", [sorted(nums), target]), task=TASK, source=source,
                   fields={"nums": list(nums), "target": int(target), "witness": witness})


# ---- hub and parquet -----------------------------------------------------------------------------------

def _hub_rows(hub_id: str) -> list[tuple[list[int], int]]:
    try:
        import datasets

        ds = datasets.load_dataset(hub_id, split="train")
    except Exception as e:   # offline, DNS, 404, auth: all mean "get the file another way"
        raise UserError(f"cannot load {hub_id} from the Hugging Face Hub ({type(e).__name__}); the hub is "
                        "unreachable or offline. Download data/train-00000-of-00001.parquet from it and use "
                        "task.source=parquet task.path=/path/to/file.parquet, or task.source=generated") from None
    return [(list(ns), int(t)) for ns, t in zip(ds["nums"], ds["target"])]


def _parquet_rows(path: str | None) -> list[tuple[list[int], int]]:
    import pandas as pd

    if not path or not Path(path).is_file():
        raise UserError(f"task.path={path!r} is not a file; point it at a parquet file with columns target, nums")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 — pyarrow raises several types for a file that is not parquet
        raise UserError(f"task.path={path!r} is not a readable parquet file ({type(e).__name__}); convert it, e.g. "
                        "pandas.read_csv(f).to_parquet(out), or use task.source=generated") from None
    missing = {"target", "nums"} - set(df.columns)
    if missing:
        raise UserError(f"{path} lacks column(s) {sorted(missing)}; it needs target (int) and nums (list of int)")
    try:
        return [([int(x) for x in ns], int(t)) for ns, t in zip(df["nums"], df["target"])]
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: nums must be lists of integers and target an integer ({e})") from None


def _load_rows(task_cfg: Any, split: str, limit: int | None, seed: int) -> list[Example]:
    source = str(task_cfg.source)
    rows = _hub_rows(str(task_cfg.hub.id)) if source == "hub" else _parquet_rows(task_cfg.path)
    key = lambda r: [sorted(r[0]), r[1]]  # noqa: E731
    rows = dedupe(rows, key=lambda r: (tuple(sorted(r[0])), r[1]))
    chosen = select_split(rows, key, split, int(task_cfg.split_seed), float(task_cfg.test_fraction),
                          int(task_cfg.test_size))
    return [_example(ns, t, None, source) for ns, t in sample(chosen, key, limit, seed)]


# ---- task interface ------------------------------------------------------------------------------------

def load(task_cfg: Any, split: str, limit: int | None, seed: int) -> list[Example]:
    """`limit` examples of `split` (all of it when None). Generated problems come from a stream seeded by
    (split_seed, seed, split), so only `limit` problems are ever solved; files and hub data are split by
    hash and the first `limit` taken after a shuffle seeded by `seed`."""
    check_split(split)
    source = str(task_cfg.source)
    if source in ("hub", "parquet"):
        return _load_rows(task_cfg, split, limit, seed)
    if source != "generated":
        raise UserError(f"unknown task.source={source!r} for countdown; valid: generated, hub, parquet")
    g = task_cfg.generated
    size = int(task_cfg.test_size) if split == "test" else int(g.train_size)
    n = size if limit is None else min(limit, size)
    split_seed = int(task_cfg.split_seed)
    return list(generate(Knobs.from_cfg(g), split, n, split_seed, float(task_cfg.test_fraction),
                         stream_seed=f"{split_seed}:{seed}:{split}"))


def messages(example: Example, prompts_cfg: Any) -> list[dict]:
    f = example.fields
    system = str(prompts_cfg.system)
    if prompts_cfg.use_worked_example:
        system = f"{system}\n\n{prompts_cfg.worked_example}"
    return [{"role": "system", "content": system},
            {"role": "user", "content": str(prompts_cfg.user).format(nums=list(f["nums"]), target=f["target"])}]


def verify(example: Example, completion: str):
    from rrr.verifiers.countdown import verify as verify_countdown

    return verify_countdown(completion, list(example.fields["nums"]), int(example.fields["target"]))


def answer_in(example: Example, text: str) -> bool:
    """Does `text` hold an answer the verifier can parse (an `<answer>` expression, right or wrong)?"""
    from rrr.verifiers.countdown import answer_is_parsable

    return answer_is_parsable(text, list(example.fields["nums"]))
