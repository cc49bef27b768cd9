"""The summary of an evaluate run: accuracies with bootstrap CIs (first try, second try, each control,
and the leaderboard-format strict scores beside them), reflection statistics, and the printed table."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from rrr.stats import bootstrap_ci, distinct_ngram_ratio


def accuracy(values: pd.Series, n_boot: int, seed: int) -> dict[str, Any]:
    mean, lo, hi = bootstrap_ci(values.astype(float).to_numpy(), n_boot=n_boot, alpha=0.05, seed=seed)
    return {"acc": mean, "ci": [lo, hi]}


def reflection_stats(df: pd.DataFrame) -> dict[str, float | None]:
    """Over the examples that got a reflection (attempt 1 failed): length, truncation, repetition, and
    the share that already holds a parsable answer (rrr.leak)."""
    has = df[df.reflection_tokens.notna()]
    if has.empty:
        return {k: None for k in ("tokens_mean", "tokens_p50", "tokens_p95", "truncated_share",
                                  "distinct_3gram_ratio", "leak_share")}
    tokens = has.reflection_tokens.to_numpy(float)
    return {
        "tokens_mean": float(tokens.mean()),
        "tokens_p50": float(np.percentile(tokens, 50)),
        "tokens_p95": float(np.percentile(tokens, 95)),
        "truncated_share": float(has.reflection_truncated.astype(float).mean()),
        "distinct_3gram_ratio": float(np.mean([distinct_ngram_ratio(list(ids), 3)
                                               for ids in has.reflection_token_ids])),
        "leak_share": float(has.reflection_leak.astype(float).mean()) if "reflection_leak" in has else None,
    }


def summarize(df: pd.DataFrame, controls: Sequence[str], n_boot: int, seed: int) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "n": len(df),
        "first_try": accuracy(df.attempt1_correct, n_boot, seed),
        "second_try": accuracy(df.second_try_correct, n_boot, seed),
    }
    for c in controls:
        summary[c] = accuracy(df[f"{c}_correct"], n_boot, seed)
    # the leaderboard-format scores under their own keys, never in place of the lenient ones
    strict = {"first_try": "attempt1_strict_correct", "second_try": "second_try_strict_correct",
              **{c: f"{c}_strict_correct" for c in controls}}
    if "attempt1_strict_correct" in df:
        summary["strict"] = {k: accuracy(df[col], n_boot, seed) for k, col in strict.items()}
    summary["reflection"] = reflection_stats(df)
    return summary


def format_table(summary: dict[str, Any], controls: Sequence[str]) -> str:
    strict = summary.get("strict")
    lines = [f"{summary['task']} · {summary['model']} ({summary['label']}) · n={summary['n']}",
             f"{'':22s}{'acc':>7s}   95% CI" + ("           strict (leaderboard format)" if strict else "")]
    for key in ("first_try", "second_try", *controls):
        m = summary[key]
        line = f"{key.replace('_', ' '):22s}{m['acc']:7.3f}   [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]"
        if strict:
            s = strict[key]
            line += f"   {s['acc']:7.3f}   [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]"
        lines.append(line)
    r = summary["reflection"]
    if r["tokens_mean"] is not None:
        lines.append(f"reflections: {r['tokens_mean']:.1f} tokens mean (p50 {r['tokens_p50']:.0f}, "
                     f"p95 {r['tokens_p95']:.0f}), truncated {r['truncated_share']:.1%}, "
                     f"distinct 3-grams {r['distinct_3gram_ratio']:.3f}"
                     + (f", answer leaked in {r['leak_share']:.1%}" if r.get("leak_share") is not None else ""))
    return "\n".join(lines)
