"""The forgetting-check part of `rrr compare`: lm-eval results of `rrr forgetting` runs side by side, with
trained − vanilla deltas bootstrapped over the same documents (rrr.stats.paired_bootstrap_diff).

A row is one benchmark × metric × filter. Its score per run is the mean of lm-eval's per-document scores
(`samples.parquet`; for a group such as mmlu_pro, pooled over its subtasks, which is lm-eval's
size-weighted group mean), with a percentile-bootstrap CI over documents. Two runs are paired on a row
only when they scored the same documents with the same prompts (lm-eval's doc_hash and prompt_hash:
same limit, same few-shot examples); otherwise the delta is left out and the report says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from rrr.config import UserError
from rrr.forgetting import COMMAND, FORMER_COMMAND
from rrr.stats import bootstrap_ci, paired_bootstrap_diff

KEY = ["subtask", "doc_id"]


@dataclass
class BenchRun:
    path: Path
    model: str
    label: str
    table: pd.DataFrame          # benchmark.parquet
    samples: pd.DataFrame        # samples.parquet
    tag: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.model} {self.tag}"


def is_forgetting_run(path: Path) -> bool:
    """A run of `rrr forgetting` (or of `rrr benchmark`, its former name)."""
    manifest = Path(path) / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text()).get("command") in (COMMAND, FORMER_COMMAND)


def load_forgetting_run(path: Path) -> BenchRun:
    path = Path(path)
    for f in ("benchmark.parquet", "samples.parquet"):
        if not (path / f).exists():
            raise UserError(f"{path} is an unfinished forgetting-check run (no {f}); "
                            f"re-run `rrr forgetting run_dir={path}`")
    manifest = json.loads((path / "manifest.json").read_text())
    cfg = OmegaConf.load(path / "config.yaml") if (path / "config.yaml").exists() else OmegaConf.create()
    model = OmegaConf.select(cfg, "model.name", default=None) or (manifest.get("model") or {}).get("name")
    if not model:
        raise UserError(f"{path}: cannot tell the model (config.yaml lacks model.name)")
    return BenchRun(path=path, model=str(model), label=str(manifest.get("model_label", "vanilla")),
                    table=pd.read_parquet(path / "benchmark.parquet"), samples=pd.read_parquet(path / "samples.parquet"))


def name_runs(runs: list[BenchRun]) -> list[BenchRun]:
    """Model by model in the order given, vanilla before trained; tags unique (as rrr.report.checks.name_runs does)."""
    first = {m: i for i, m in reversed(list(enumerate(r.model for r in runs)))}
    runs = sorted(runs, key=lambda r: (first[r.model], {"vanilla": 0, "trained": 1}.get(r.label, 2)))
    counts = pd.Series([(r.model, r.label) for r in runs]).value_counts()
    for r in runs:
        r.tag = r.label + (f" ({r.path.name})" if counts[(r.model, r.label)] > 1 else "")
    return runs


def headline_rows(runs: list[BenchRun]) -> pd.DataFrame:
    """The rows to report, in the order the first run lists them: each requested task's own row (the
    group row for a group), or all of its rows when lm-eval reports none under the requested name (a tag)."""
    rows = pd.concat([r.table[["task", "name", "metric", "filter", "is_group"]] for r in runs]).drop_duplicates(
        ["task", "name", "metric", "filter"])
    keep = [g[g.name == task] if (g.name == task).any() else g for task, g in rows.groupby("task", sort=False)]
    return pd.concat(keep, ignore_index=True)


def _docs(run: BenchRun, row: Any) -> pd.DataFrame:
    """Per-document scores of one row: a group's headline row pools all its subtasks, any other row is
    its own (sub)task."""
    s = run.samples
    s = s[(s.task == row.task) & (s.metric == row.metric) & (s["filter"] == row.filter)]
    if not (row.is_group and row.name == row.task):
        s = s[s.subtask == row.name]
    return s.drop_duplicates(KEY).set_index(KEY).sort_index()


def _lm_eval_value(run: BenchRun, row: Any) -> tuple[float, float]:
    t = run.table
    hit = t[(t.task == row.task) & (t.name == row.name) & (t.metric == row.metric) & (t["filter"] == row.filter)]
    if hit.empty:
        return np.nan, np.nan
    return float(hit.value.iloc[0]) if pd.notna(hit.value.iloc[0]) else np.nan, \
        float(hit.stderr.iloc[0]) if pd.notna(hit.stderr.iloc[0]) else np.nan


def score_table(runs: list[BenchRun], n_boot: int) -> pd.DataFrame:
    """One row per (benchmark row, run): n, mean per-document score and its bootstrap CI, lm-eval's value."""
    out = []
    for row in headline_rows(runs).itertuples():
        for r in runs:
            docs = _docs(r, row)
            value, stderr = _lm_eval_value(r, row)
            mean, lo, hi = bootstrap_ci(docs.score, n_boot) if len(docs) else (np.nan,) * 3
            out.append({"benchmark": row.name, "task": row.task, "metric": row.metric, "filter": row.filter,
                        "run": r.name, "model": r.model, "label": r.label, "n": len(docs), "score": mean,
                        "lo": lo, "hi": hi, "lm_eval_value": value, "lm_eval_stderr": stderr})
    return pd.DataFrame(out)


def paired_deltas(runs: list[BenchRun], n_boot: int) -> pd.DataFrame:
    """Per model and benchmark row: trained − vanilla over the same documents, or why not."""
    out = []
    rows = headline_rows(runs)
    for t in (r for r in runs if r.label == "trained"):
        for v in (r for r in runs if r.label == "vanilla" and r.model == t.model):
            for row in rows.itertuples():
                a, b = _docs(t, row), _docs(v, row)
                base = {"benchmark": row.name, "task": row.task, "metric": row.metric, "filter": row.filter,
                        "model": t.model, "run_a": t.name, "run_b": v.name, "n": 0,
                        "delta": np.nan, "lo": np.nan, "hi": np.nan, "note": ""}
                if not len(a) or not len(b):
                    out.append({**base, "note": "no per-document scores in one run"})
                    continue
                if set(a.index) != set(b.index):
                    out.append({**base, "note": f"different documents ({len(a)} vs {len(b)}): same forgetting.limit?"})
                    continue
                b = b.loc[a.index]
                if (a.doc_hash != b.doc_hash).any():
                    out.append({**base, "note": "documents differ (doc_hash): same data set version?"})
                    continue
                if (a.prompt_hash != b.prompt_hash).any():
                    out.append({**base, "note": "prompts differ (prompt_hash): same few-shot settings?"})
                    continue
                d, lo, hi = paired_bootstrap_diff(a.score.to_numpy(), b.score.to_numpy(), n_boot)
                out.append({**base, "n": len(a), "delta": d, "lo": lo, "hi": hi})
    return pd.DataFrame(out)


def _fmt(x: float, lo: float, hi: float, scale: float = 100.0, sign: bool = False) -> str:
    if np.isnan(x):
        return "—"
    f = "+.1f" if sign else ".1f"
    return f"{scale * x:{f}} [{scale * lo:{f}}, {scale * hi:{f}}]"


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _row_label(r: Any) -> str:
    return f"{r.benchmark} · {r.metric}" + ("" if r.filter == "none" else f" ({r.filter})")


def scores_markdown(scores: pd.DataFrame, runs: list[BenchRun]) -> str:
    header = ["benchmark", "n"] + [r.name for r in runs]
    rows = []
    for _, g in scores.groupby(["benchmark", "metric", "filter"], sort=False):
        first = next(g.itertuples())
        cells = {r.run: _fmt(r.score, r.lo, r.hi) for r in g.itertuples()}
        rows.append([_row_label(first), "/".join(sorted({str(n) for n in g.n}))] + [cells.get(r.name, "—") for r in runs])
    return _md(header, rows)


def deltas_markdown(deltas: pd.DataFrame) -> str:
    rows = [[_row_label(r), r.model, str(r.n) if r.n else "—", _fmt(r.delta, r.lo, r.hi, sign=True), r.note or ""]
            for r in deltas.itertuples()]
    return _md(["benchmark", "model", "n (paired)", "trained − vanilla (pp)", "note"], rows)


def plot_scores(scores: pd.DataFrame, runs: list[BenchRun], path: Path) -> None:
    """Grouped bars: one group per benchmark row, one bar per run, 95% bootstrap CI whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(_row_label(r) for r in scores.itertuples()))
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(float(np.clip(2 + 1.4 * len(groups), 6, 16)), 4.5))
    for i, run in enumerate(runs):
        s = scores[scores.run == run.name]
        by = {_row_label(r): r for r in s.itertuples()}
        vals = np.array([100 * by[g].score if g in by else np.nan for g in groups])
        err = np.array([[100 * (by[g].score - by[g].lo), 100 * (by[g].hi - by[g].score)] if g in by else [0, 0]
                        for g in groups]).T
        ax.bar(np.arange(len(groups)) - 0.4 + width * (i + 0.5), vals, width, yerr=np.nan_to_num(err), capsize=2,
               label=run.name, color=f"C{i}", error_kw={"elinewidth": 0.8, "ecolor": "#333333"})
    ax.set_xticks(np.arange(len(groups)), [g.replace(" · ", "\n") for g in groups], fontsize=8)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.set_title("lm-eval benchmarks: per-document mean with 95% bootstrap CIs", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(4, len(runs)), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(runs: list[BenchRun], out: Path, n_boot: int) -> tuple[str, pd.DataFrame, pd.DataFrame]:
    """(markdown section, scores, deltas) for named benchmark runs; writes benchmarks.png and the CSVs."""
    scores, deltas = score_table(runs, n_boot), paired_deltas(runs, n_boot)
    plot_scores(scores, runs, out / "benchmarks.png")
    scores.to_csv(out / "benchmarks.csv", index=False)
    deltas.to_csv(out / "benchmark_deltas.csv", index=False)
    versions = sorted({str(json.loads((r.path / "manifest.json").read_text()).get("lm_eval_version")) for r in runs})
    parts = ["## Forgetting check: lm-eval benchmarks", "",
             f"Per-document mean score in %, 95% percentile-bootstrap CIs ({n_boot} resamples over documents); "
             f"lm-eval {', '.join(versions)}. A group (e.g. mmlu_pro) pools its subtasks' documents.", "",
             scores_markdown(scores, runs), ""]
    if len(deltas):
        parts += ["Trained − vanilla, paired over the same documents (percentage points):", "",
                  deltas_markdown(deltas), ""]
    parts += ["![benchmarks.png](benchmarks.png)", "", "Benchmark runs:", ""]
    parts += [f"- `{r.path}`: {r.name}" for r in runs] + [""]
    return "\n".join(parts), scores, deltas
