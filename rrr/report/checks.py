"""Comparability for `rrr compare`: runs must share task, split and examples, so that every difference is
paired over the same examples; then rows are ordered and named."""

from __future__ import annotations

import pandas as pd

from rrr.config import UserError
from rrr.report.load import EvalRun

LABEL_ORDER = {"vanilla": 0, "trained": 1}


def _example_difference(ref: EvalRun, other: EvalRun) -> str | None:
    a, b = set(ref.outcomes.index), set(other.outcomes.index)
    same_hash = ref.examples_sha256 is None or other.examples_sha256 is None \
        or ref.examples_sha256 == other.examples_sha256
    if a == b and same_hash:
        return None
    only_a, only_b = sorted(a - b), sorted(b - a)
    detail = (f"{len(a)} vs {len(b)} examples, {len(only_a)} only in the first "
              f"(e.g. {', '.join(only_a[:3]) or '-'}), {len(only_b)} only in the second "
              f"(e.g. {', '.join(only_b[:3]) or '-'})")
    if a == b:
        detail = f"examples_sha256 {ref.examples_sha256[:12]}… vs {other.examples_sha256[:12]}…"
    return f"different example sets ({detail})"


def check_comparable(runs: list[EvalRun]) -> None:
    """Refuse runs that do not share task, split and examples; the message names both runs."""
    ref = runs[0]
    for other in runs[1:]:
        for field in ("task", "split"):
            if getattr(ref, field) != getattr(other, field):
                raise UserError(f"runs are not comparable: {ref.path} has {field} {getattr(ref, field)!r} but "
                                f"{other.path} has {getattr(other, field)!r}; compare runs of one {field}")
        diff = _example_difference(ref, other)
        if diff:
            raise UserError(f"runs are not comparable: {ref.path} and {other.path} have {diff}; "
                            "evaluate both with the same task, split, eval.limit and seed")


def name_runs(runs: list[EvalRun]) -> list[EvalRun]:
    """Order rows model by model (in the order given), vanilla before trained; make names unique."""
    first_seen = {m: i for i, m in reversed(list(enumerate(r.model for r in runs)))}
    runs = sorted(runs, key=lambda r: (first_seen[r.model], LABEL_ORDER.get(r.label, 2)))
    counts = pd.Series([(r.model, r.label) for r in runs]).value_counts()
    for r in runs:
        r.tag = r.label + (f" ({r.path.name})" if counts[(r.model, r.label)] > 1 else "")
    return runs

