"""How often a model follows the answer format, from a collect-failures run (e.g. Countdown prompts with
and without the worked example). Run collect-failures with collect.keep_attempts >= samples_per_query so
every failed sample's verdict reason is stored.

    python scripts/format_rate.py outputs/collect-failures/<run> [<run> ...]
"""

from __future__ import annotations

import sys
from collections import Counter

import pandas as pd

FORMAT_ERRORS = ("no_answer", "empty_answer", "too_long", "syntax")   # the answer could not be read at all


def summarize(run: str) -> dict:
    df = pd.read_parquet(f"{run}/all_queries.parquet")                  # every query: n_samples, n_correct
    failures = pd.read_parquet(f"{run}/failures.parquet")               # queries with a failure: their reasons
    reasons = Counter(str(r).split(":")[0] for rs in failures.failed_reasons for r in rs)
    failed, correct, samples = sum(reasons.values()), int(df.n_correct.sum()), int(df.n_samples.sum())
    if failed + correct != samples:
        raise SystemExit(f"{run}: {failed} failed reasons stored for {samples - correct} failed samples; "
                         "re-run collect-failures with collect.keep_attempts >= collect.samples_per_query")
    unreadable = sum(n for r, n in reasons.items() if r in FORMAT_ERRORS)
    return {"run": run, "samples": samples, "pass@1": correct / samples,
            "format_followed": 1 - unreadable / samples, "reasons": dict(reasons.most_common())}


if __name__ == "__main__":
    for run in sys.argv[1:]:
        print(summarize(run))
