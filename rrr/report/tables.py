"""The numbers of `rrr compare`: accuracies with bootstrap CIs and paired deltas (rrr.stats), as DataFrames."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from rrr.report.load import METRICS, CONTROLS, EvalRun, training_curves
from rrr.stats import paired_bootstrap_diff, bootstrap_ci

def accuracy_table(runs: list[EvalRun], n_boot: int) -> pd.DataFrame:
    """One row per run: n and, per metric, acc/lo/hi (NaN where the run lacks that control)."""
    rows = []
    for r in runs:
        row: dict[str, Any] = {"run": r.name, "model": r.model, "label": r.label, "tag": r.tag,
                               "n": len(r.outcomes)}
        for key in METRICS:
            acc, lo, hi = bootstrap_ci(r.outcomes[key], n_boot) if key in r.outcomes else (np.nan,) * 3
            row.update({key: acc, f"{key}_lo": lo, f"{key}_hi": hi})
        row["fixed_by_reflection"] = _fixed_share(r.outcomes)
        rows.append(row)
    return pd.DataFrame(rows)


def _fixed_share(outcomes: pd.DataFrame) -> float:
    """Share of attempt-1 failures solved by the retry after a reflection."""
    failed = ~outcomes["first_try"] if "first_try" in outcomes else pd.Series(dtype=bool)
    if "second_try" not in outcomes or not failed.any():
        return float("nan")
    return float(outcomes.loc[failed, "second_try"].mean())


def _paired_diffs(a: pd.DataFrame, b: pd.DataFrame, pairs: dict[str, tuple[str, str]],
                  n_boot: int) -> dict[str, float]:
    """For each named pair (metric in a, metric in b): the paired difference and its CI."""
    row: dict[str, float] = {}
    for col, (ka, kb) in pairs.items():
        have = ka in a and kb in b
        d, lo, hi = paired_bootstrap_diff(a[ka].to_numpy(), b[kb].to_numpy(), n_boot) if have else (np.nan,) * 3
        row.update({col: d, f"{col}_lo": lo, f"{col}_hi": hi})
    return row


def trained_vs_vanilla(runs: list[EvalRun], n_boot: int) -> pd.DataFrame:
    """Per model, trained − vanilla for every metric, paired over the same examples."""
    rows = []
    for t in (r for r in runs if r.label == "trained"):
        for v in (r for r in runs if r.label == "vanilla" and r.model == t.model):
            rows.append({"comparison": "trained - vanilla", "model": t.model, "run_a": t.name, "run_b": v.name,
                         **_paired_diffs(t.outcomes, v.outcomes, {k: (k, k) for k in METRICS}, n_boot)})
    return pd.DataFrame(rows)


# The comparisons that decide the result, fixed before the run (docs/results.md): (title, trained metric,
# baseline run, baseline metric). Each is paired over the same examples.
PREREGISTERED = (
    ("trained 2nd try − vanilla best-of-2", "second_try", "vanilla", "best_of_2"),
    ("trained 2nd try − trained retry, no reflection", "second_try", "trained", "retry_no_reflection"),
    ("trained 1st try − vanilla 1st try", "first_try", "vanilla", "first_try"),
)


def preregistered(runs: list[EvalRun], n_boot: int) -> pd.DataFrame:
    """Per (trained, vanilla) pair of one model, the three pre-registered paired deltas and their CIs."""
    rows = []
    for t in (r for r in runs if r.label == "trained"):
        for v in (r for r in runs if r.label == "vanilla" and r.model == t.model):
            for title, kt, base, kb in PREREGISTERED:
                other = v if base == "vanilla" else t
                have = kt in t.outcomes and kb in other.outcomes
                d, lo, hi = paired_bootstrap_diff(t.outcomes[kt].to_numpy(), other.outcomes[kb].to_numpy(),
                                                  n_boot) if have else (np.nan,) * 3
                rows.append({"comparison": title, "model": t.model, "run_a": t.name, "run_b": other.name,
                             "delta": d, "delta_lo": lo, "delta_hi": hi})
    return pd.DataFrame(rows)


def training_summary(runs: list[EvalRun]) -> list[str]:
    """One line per distinct train run: how many updates carried gradient, and the mixed groups (reward
    variance: the only groups with a GRPO advantage) when the run logged them. With `mixed_groups` logged,
    an update counts only if it had a mixed group and a non-zero gradient: a KL-only gradient (zero-variance
    groups kept with `train.zero_std=keep`) is not a learning signal from the reward."""
    lines = []
    for name, df in training_curves(runs).items():
        if "grad_norm" not in df:
            continue
        mixed = "mixed_groups" in df and "groups" in df
        carried = (df["grad_norm"] > 0) & ((df["mixed_groups"] > 0) if mixed else True)
        line = (f"training of {name}: {int(carried.sum())} of {len(df)} updates carried gradient "
                + ("(a mixed-reward group, grad norm > 0)" if mixed else "(grad norm > 0)"))
        if mixed:
            line += f"; mixed-reward groups {int(df['mixed_groups'].sum())} of {int(df['groups'].sum())}"
        lines.append(line)
    return lines


def reflection_gaps(runs: list[EvalRun], n_boot: int) -> pd.DataFrame:
    """Per run, 2nd try − each control: does a reflection beat a second sample / a bare retry?"""
    pairs = {c: ("second_try", c) for c in CONTROLS}
    return pd.DataFrame([{"comparison": "2nd try - control", "model": r.model, "run_a": r.name, "run_b": r.name,
                          **_paired_diffs(r.outcomes, r.outcomes, pairs, n_boot)} for r in runs])

