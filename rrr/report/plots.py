"""Plots of `rrr compare`: accuracy bars with CI whiskers, training curves (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rrr.report.load import METRICS

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLORS = {"first_try": "#9aa5b1", "second_try": "#1f5fa8", "best_of_2": "#e08a2c",
          "retry_no_reflection": "#c4a35a", "generic_reflection": "#6aa86a"}


def plot_accuracy(acc: pd.DataFrame, title: str, path: Path) -> None:
    """Grouped bars: one group per run, one bar per metric, 95% CI whiskers."""
    plt = _pyplot()
    keys = [k for k in METRICS if acc[k].notna().any()]
    width = 0.8 / len(keys)
    x = np.arange(len(acc))
    fig, ax = plt.subplots(figsize=(float(np.clip(2 + 1.1 * len(acc), 6, 16)), 4.5))
    for i, key in enumerate(keys):
        vals = 100 * acc[key].to_numpy()
        err = 100 * np.vstack([acc[key] - acc[f"{key}_lo"], acc[f"{key}_hi"] - acc[key]])
        ax.bar(x - 0.4 + width * (i + 0.5), vals, width, yerr=err, capsize=2, color=COLORS[key],
               label=METRICS[key][1], error_kw={"elinewidth": 0.8, "ecolor": "#333333"})
    ax.set_xticks(x, [f"{m}\n{tag}" for m, tag in zip(acc.model, acc.tag)], fontsize=9)
    ax.set_xlim(-0.6, len(acc) - 0.4)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, min(100.0, 100 * float(np.nanmax(acc[[f"{k}_hi" for k in keys]].to_numpy())) * 1.15 + 2))
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, ncol=len(keys), loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _smooth(y: pd.Series) -> pd.Series:
    return y.rolling(max(1, len(y) // 20), min_periods=1).mean()


def plot_training(curves: dict[str, pd.DataFrame], column: str, ylabel: str, path: Path) -> bool:
    """One line per train run (raw, faint, and a rolling mean); False and no file if no run logged it."""
    curves = {name: df for name, df in curves.items() if column in df and df[column].notna().any()}
    if not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, df) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(df["step"], df[column], color=color, alpha=0.25, linewidth=0.8)
        ax.plot(df["step"], _smooth(df[column]), color=color, linewidth=1.8, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel}: per step (faint) and rolling mean", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

