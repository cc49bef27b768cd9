"""Markdown of `rrr compare`: the tables of rrr.report.tables and the report of one test set."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from rrr.report.load import CONTROLS, METRICS, EvalRun
from rrr.stats import bootstrap_ci

REFLECTION_STATS = {"tokens_mean": "tokens mean", "tokens_p50": "p50", "tokens_p95": "p95",
                    "truncated_share": "truncated", "distinct_3gram_ratio": "distinct 3-grams",
                    "leak_share": "answer leaked"}   # reflections holding a parsable answer (rrr.leak)


def _pct(acc: float, lo: float, hi: float) -> str:
    return "—" if np.isnan(acc) else f"{100 * acc:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _pp(d: float, lo: float, hi: float) -> str:
    return "—" if np.isnan(d) else f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def accuracy_markdown(acc: pd.DataFrame) -> str:
    header = ["model", "label", "n"] + [title for _, title in METRICS.values()] + ["failures fixed (%)"]
    rows = [[row.model, row.tag, str(row.n)]
            + [_pct(row[k], row[f"{k}_lo"], row[f"{k}_hi"]) for k in METRICS]
            + ["—" if np.isnan(row.fixed_by_reflection) else f"{100 * row.fixed_by_reflection:.1f}"]
            for _, row in acc.iterrows()]
    return _md_table(header, rows)


def delta_markdown(df: pd.DataFrame, first_col: str, keys: list[str], titles: list[str]) -> str:
    rows = [[row[first_col]] + [_pp(row[k], row[f"{k}_lo"], row[f"{k}_hi"]) for k in keys]
            for _, row in df.iterrows()]
    return _md_table([first_col] + titles, rows)


def reflection_markdown(runs: list[EvalRun]) -> str:
    def fmt(key: str, v: Any) -> str:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "—"
        return f"{100 * v:.1f}%" if key in ("truncated_share", "leak_share") else f"{v:.2f}" if isinstance(v, float) else str(v)

    rows = [[r.name] + [fmt(k, r.reflection.get(k)) for k in REFLECTION_STATS] for r in runs]
    return _md_table(["run", *REFLECTION_STATS.values()], rows)



def prereg_markdown(pre: pd.DataFrame) -> str:
    rows = [[row.model, row.comparison, _pp(row.delta, row.delta_lo, row.delta_hi)] for _, row in pre.iterrows()]
    return _md_table(["model", "pre-registered comparison", "Δ pp [95% CI]"], rows)


def render_report(runs: list[EvalRun], acc: pd.DataFrame, deltas: pd.DataFrame, gaps: pd.DataFrame,
                  plots: list[str], n_boot: int, level: int = 1, pre: pd.DataFrame | None = None) -> str:
    """The report of one test set; `level` 2 nests it as a section of a several-set report."""
    ref = runs[0]
    h = "#" * level
    title = (f"R3 comparison: {ref.task} ({ref.split} split, {len(ref.outcomes)} examples)" if level == 1
             else f"Test set {ref.test_set} ({ref.task}, {ref.split} split, {len(ref.outcomes)} examples)")
    parts = [f"{h} {title}", ""] + relation_lines(runs) + [
        f"Accuracy in %, with 95% percentile-bootstrap CIs ({n_boot} resamples over examples). "
        "2nd try = solved at attempt 1, or at attempt 2 after a self-reflection. Controls give the same "
        "failures a second chance without the model's reflection: best-of-2 = a second independent "
        "attempt; retry, no reflection = the retry prompt alone; generic reflection = a fixed, "
        "task-agnostic reflection. Failures fixed = share of attempt-1 failures solved at attempt 2.",
        "",
        accuracy_markdown(acc),
        "",
    ]
    if pre is not None and len(pre):
        parts += [f"{h}# Pre-registered comparisons (pp, paired bootstrap over the same examples)", "",
                  prereg_markdown(pre), ""]
    if len(deltas):
        keys = list(METRICS)
        parts += [f"{h}# Trained − vanilla (percentage points, paired bootstrap over the same examples)", "",
                  delta_markdown(deltas, "model", keys, [t for _, t in METRICS.values()]), ""]
    parts += [f"{h}# Does the reflection help? 2nd try − control, per run (pp, paired)", "",
              "Positive: the model's own reflection beats the control's second chance.", "",
              delta_markdown(gaps, "run_a", list(CONTROLS), [f"2nd try − {METRICS[c][1]}" for c in CONTROLS])
              .replace("| run_a |", "| run |", 1), "",
              f"{h}# Reflections (tokens; from each run's summary.json)", "", reflection_markdown(runs), ""]
    if plots:
        parts += [f"{h}# Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    notes = [r.train_note for r in runs if r.train_note]
    parts += [f"{h}# Runs", ""] + [f"- `{r.path}`: {r.name}" + (f", trained in `{r.train_run}`" if r.train_run else "")
                                for r in runs] + [f"- note: {n}" for n in notes] + [""]
    return "\n".join(parts)


def relation_lines(runs: list[EvalRun]) -> list[str]:
    """One line per trained run: was this test set in its training data (rrr.testsets.training_relation)?"""
    lines = [f"- **{r.name}**: {r.relation}" + (f" (trained on {r.trained_on})" if r.trained_on else "")
             for r in runs if r.label == "trained" and r.relation]
    return ["Training data of the trained model(s) vs this test set:", ""] + lines + [""] if lines else []



def overview_markdown(by_set: dict[str, list[EvalRun]], n_boot: int) -> str:
    names = list(dict.fromkeys(r.name for runs in by_set.values() for r in runs))
    rows = []
    for name, runs in by_set.items():
        cells = {r.name: _pct(*bootstrap_ci(r.outcomes["second_try"], n_boot)) if "second_try" in r.outcomes
                 else "—" for r in runs}
        relation = "; ".join(sorted({r.relation for r in runs if r.relation})) or "—"
        rows.append([name, str(len(runs[0].outcomes))] + [cells.get(n, "—") for n in names] + [relation])
    return _md_table(["test set", "n"] + names + ["trained model vs this set"], rows)
