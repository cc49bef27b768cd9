"""`rrr compare RUN_DIR... [--out DIR]`: the paper-style table from evaluate runs, with bootstrap CIs, and
the forgetting-check table from benchmark runs (rrr/bench_report.py), in one report.

Every number is recomputed from each run's `results.parquet` (one row per example), so all runs get the
same CI method and seed. Runs must cover the same task, split and examples: that makes every
difference *paired* (trained − vanilla on the same examples; 2nd try − a control within one run), and a
paired bootstrap gives a much tighter CI than comparing two independent intervals.

Writes `report.md`, `table.csv`, `deltas.csv`, `preregistered.csv` (the three comparisons that decide
the result, `PREREGISTERED`, per test set), `accuracy.png` and, when the evaluate runs point to train
runs with `metrics.jsonl`, `train_reward.png`, `reflection_length.png` and how many updates carried
gradient.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from rrr.config import UserError
from rrr.runs import atomic_write_json, atomic_write_text, claim_run_dir, git_sha, read_metrics
from rrr.stats import bootstrap_ci, paired_bootstrap_diff

# metric key -> (column in results.parquet, column title in the report)
METRICS: dict[str, tuple[str, str]] = {
    "first_try": ("attempt1_correct", "1st try"),
    "second_try": ("second_try_correct", "2nd try"),
    "best_of_2": ("best_of_2_correct", "best-of-2"),
    "retry_no_reflection": ("retry_no_reflection_correct", "retry, no reflection"),
    "generic_reflection": ("generic_reflection_correct", "generic reflection"),
}
CONTROLS = ("best_of_2", "retry_no_reflection", "generic_reflection")
REFLECTION_STATS = {"tokens_mean": "tokens mean", "tokens_p50": "p50", "tokens_p95": "p95",
                    "truncated_share": "truncated", "distinct_3gram_ratio": "distinct 3-grams",
                    "leak_share": "answer leaked"}   # reflections holding a parsable answer (rrr.leak)
LABEL_ORDER = {"vanilla": 0, "trained": 1}


@dataclass
class EvalRun:
    path: Path
    model: str
    label: str                       # "vanilla" | "trained"
    task: str
    split: str
    examples_sha256: str | None
    outcomes: pd.DataFrame           # index example_id; one bool column per metric key the run has
    reflection: dict[str, Any]       # summary.json["reflection"]
    train_run: Path | None           # where metrics.jsonl lives (None if vanilla or not found)
    train_note: str = ""             # why there are no training curves, if the manifest named a run
    tag: str = ""                    # label, plus the run directory's name when that label repeats
    test_set: str = ""               # the test set these outcomes are from (one EvalRun per run × set)
    relation: str = ""               # trained runs: how the set relates to the training data (rrr.testsets)
    trained_on: str = ""             # trained runs: the sources the model trained on

    @property
    def name(self) -> str:
        """Row label in tables and plots, unique across the comparison."""
        return f"{self.model} {self.tag}"


# ---------------------------------------------------------------- reading runs

def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt ({type(e).__name__}); re-run `rrr evaluate` with run_dir={path.parent}"
                        " to rewrite it") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a JSON object; re-run `rrr evaluate` with run_dir={path.parent}")
    return value


def _read_outcomes(path: Path, default_set: str) -> dict[str, pd.DataFrame]:
    """Outcomes per test set (a run written before test sets existed is one set, `default_set`)."""
    import pyarrow.parquet as pq

    try:
        present = set(pq.read_schema(path).names)
    except Exception as e:  # noqa: BLE001 — pyarrow raises several types for a damaged file
        raise UserError(f"{path} is unreadable ({type(e).__name__}); re-run `rrr evaluate` with "
                        f"run_dir={path.parent} to rewrite it") from None
    if "example_id" not in present:
        raise UserError(f"{path} has no example_id column; re-run `rrr evaluate` to rewrite it")
    keep = {key: col for key, (col, _) in METRICS.items() if col in present}
    cols = ["example_id", *keep.values()] + (["test_set"] if "test_set" in present else [])
    df = pd.read_parquet(path, columns=cols)
    if "test_set" not in df:
        df["test_set"] = default_set
    out = {}
    for name, g in df.groupby("test_set", sort=False):
        if g["example_id"].duplicated().any():
            raise UserError(f"{path} lists some example_id twice in test set {name!r}; re-run `rrr evaluate`")
        g = g.set_index(g["example_id"].astype(str)).drop(columns=["example_id", "test_set"])
        g = g.rename(columns={col: key for key, col in keep.items()})
        # a control that was not run is an all-missing column; otherwise missing means "not solved"
        g = g.loc[:, g.notna().any()]
        out[str(name)] = g.fillna(False).astype(bool)
    return out


def _train_task(recorded: str | None, run: Path):
    """The task config the model was trained on (the train run's config.yaml), or None."""
    if not recorded:
        return None
    for candidate in (Path(recorded), run / recorded):
        if (candidate / "config.yaml").exists():
            return OmegaConf.select(OmegaConf.load(candidate / "config.yaml"), "task", default=None)
    return None


def _find_train_run(run: Path, recorded: str | None) -> tuple[Path | None, str]:
    if not recorded:
        return None, ""
    for candidate in (Path(recorded), run / recorded):
        if (candidate / "metrics.jsonl").exists():
            return candidate, ""
    return None, f"train run {recorded} (named by {run}) has no metrics.jsonl here; no training curves"


def load_run(path: Path) -> list[EvalRun]:
    """Read one evaluate run directory (config.yaml, manifest.json, results.parquet, summary.json): one
    EvalRun per test set, each flagged with how it relates to what a trained model was trained on."""
    from rrr.testsets import source_name, trained_on, training_relation

    path = Path(path)
    if not (path / "results.parquet").exists():
        raise UserError(f"{path} is not an evaluate run (no results.parquet); "
                        "pass directories written by `rrr evaluate`")
    manifest = _read_json(path / "manifest.json")
    if manifest.get("command", "evaluate") != "evaluate":
        raise UserError(f"{path} is a `{manifest['command']}` run; `rrr compare` takes evaluate runs")
    cfg = OmegaConf.load(path / "config.yaml") if (path / "config.yaml").exists() else OmegaConf.create()
    summary = _read_json(path / "summary.json")

    def pick(key: str, summary_key: str) -> str:
        value = OmegaConf.select(cfg, key, default=None) or summary.get(summary_key)
        if value is None:
            raise UserError(f"{path}: cannot tell the {key} (config.yaml lacks it); re-run `rrr evaluate`")
        return str(value)

    recorded_train = manifest.get("train_run")
    label = manifest.get("model_label") or summary.get("label") or ("trained" if recorded_train else "vanilla")
    train_run, note = _find_train_run(path, recorded_train)
    train_task = _train_task(recorded_train, path) if label == "trained" else None
    sets = {s["name"]: s for s in manifest.get("test_sets") or []}
    task_node = OmegaConf.select(cfg, "task", default=None)
    default_set = next(iter(sets)) if len(sets) == 1 else (source_name(task_node) if task_node is not None
                                                           and "source" in task_node else pick("task.name", "task"))
    runs = []
    for name, outcomes in _read_outcomes(path / "results.parquet", default_set).items():
        meta = sets.get(name, {})
        set_task = OmegaConf.create(meta["task_config"]) if meta.get("task_config") else task_node
        per_set = (summary.get("test_sets") or {}).get(name) or summary
        runs.append(EvalRun(
            path=path, model=pick("model.name", "model"), label=str(label),
            task=str(meta.get("task") or pick("task.name", "task")), split=pick("eval.split", "split"),
            examples_sha256=meta.get("examples_sha256") or (manifest.get("examples_sha256") if not sets or
                                                               len(sets) == 1 else None),
            outcomes=outcomes, reflection=per_set.get("reflection") or {}, train_run=train_run, train_note=note,
            test_set=name,
            relation=training_relation(set_task, train_task) if label == "trained" and set_task is not None else "",
            trained_on=trained_on(train_task) if train_task is not None else ""))
    return runs


# ---------------------------------------------------------------- comparability

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


def _name_runs(runs: list[EvalRun]) -> list[EvalRun]:
    """Order rows model by model (in the order given), vanilla before trained; make names unique."""
    first_seen = {m: i for i, m in reversed(list(enumerate(r.model for r in runs)))}
    runs = sorted(runs, key=lambda r: (first_seen[r.model], LABEL_ORDER.get(r.label, 2)))
    counts = pd.Series([(r.model, r.label) for r in runs]).value_counts()
    for r in runs:
        r.tag = r.label + (f" ({r.path.name})" if counts[(r.model, r.label)] > 1 else "")
    return runs


# ---------------------------------------------------------------- statistics

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
    for name, df in _training_curves(runs).items():
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


# ---------------------------------------------------------------- formatting

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


def _delta_markdown(df: pd.DataFrame, first_col: str, keys: list[str], titles: list[str]) -> str:
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


# ---------------------------------------------------------------- plots

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


def _training_curves(runs: list[EvalRun]) -> dict[str, pd.DataFrame]:
    """metrics.jsonl of each distinct train run, keyed by the name of the first run trained there."""
    curves: dict[str, pd.DataFrame] = {}
    seen: set[Path] = set()
    for r in runs:
        if r.train_run is None or r.train_run.resolve() in seen:
            continue
        seen.add(r.train_run.resolve())
        df = read_metrics(r.train_run)
        if "step" in df:
            curves[r.name] = df[df["step"].notna()].sort_values("step")
    return curves


# ---------------------------------------------------------------- report

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
                  _delta_markdown(deltas, "model", keys, [t for _, t in METRICS.values()]), ""]
    parts += [f"{h}# Does the reflection help? 2nd try − control, per run (pp, paired)", "",
              "Positive: the model's own reflection beats the control's second chance.", "",
              _delta_markdown(gaps, "run_a", list(CONTROLS), [f"2nd try − {METRICS[c][1]}" for c in CONTROLS])
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


def _default_out() -> Path:
    base = Path("outputs") / "compare" / time.strftime("%Y%m%d-%H%M%S")
    out, i = base, 1
    while out.exists():
        out, i = base.with_name(f"{base.name}-{i}"), i + 1
    return out


def run(run_dirs: list[Path], out: Path | None = None, n_boot: int = 2000, note: str = "") -> Path:
    """Compare evaluate runs and/or benchmark runs; write report.md, the CSVs and plots into `out`."""
    from rrr import bench_report

    if not run_dirs:
        raise UserError("give at least one evaluate or benchmark run directory: rrr compare RUN_DIR [RUN_DIR...]")
    bench_dirs = [Path(d) for d in run_dirs if bench_report.is_bench_run(Path(d))]
    eval_dirs = [Path(d) for d in run_dirs if not bench_report.is_bench_run(Path(d))]
    # read and check everything before the output directory exists
    runs = load_evaluations(eval_dirs) if eval_dirs else {}
    bench_runs = bench_report.name_runs([bench_report.load_bench_run(p) for p in bench_dirs])
    out = Path(out) if out else _default_out()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    claim_run_dir(out)                              # created, locked (one writer), announced
    names = list(dict.fromkeys(str(r.path) for r in [*(r for rs in runs.values() for r in rs), *bench_runs]))
    sections = []
    if runs:
        sections.append(compare_evaluations(runs, out, n_boot))
    if bench_runs:
        section, scores, deltas = bench_report.compare(bench_runs, out, n_boot)
        sections += ([] if runs else ["# Forgetting check", ""]) + [section]
        print()
        print(bench_report.scores_markdown(scores, bench_runs))
        if len(deltas):
            print()
            print(bench_report.deltas_markdown(deltas))
    atomic_write_text(out / "report.md", "\n".join(([note, ""] if note else []) + sections))
    atomic_write_json(out / "manifest.json", {"command": "compare", "runs": names, "git_sha": git_sha(),
                                              "n_boot": n_boot})
    if note:
        print(f"\n{note}")
    print(f"\nreport: {out / 'report.md'}")
    return out


def load_evaluations(run_dirs: list[Path]) -> dict[str, list[EvalRun]]:
    """Read evaluate runs; per test set (in the order the runs list them): refuse incomparable runs,
    order and name them, and align their examples."""
    loaded = [load_run(Path(d)) for d in run_dirs]
    by_set: dict[str, list[EvalRun]] = {}
    if all(len(sets) == 1 for sets in loaded):
        # one set per run (as before test sets): all runs are compared, and must be comparable
        by_set[loaded[0][0].test_set] = [sets[0] for sets in loaded]
    else:
        for sets in loaded:
            for r in sets:
                by_set.setdefault(r.test_set, []).append(r)
        if len(loaded) > 1 and all(len(runs) == 1 for runs in by_set.values()):
            raise UserError(f"runs are not comparable: {', '.join(str(d) for d in run_dirs)} share no test set; "
                            "evaluate them on the same eval.test_sets")
    for name, runs in by_set.items():
        check_comparable(runs)
        runs = _name_runs(runs)
        ids = sorted(runs[0].outcomes.index)
        for r in runs:  # align rows so that index i is the same example in every run
            r.outcomes = r.outcomes.loc[ids]
        by_set[name] = runs
    return by_set


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def compare_evaluations(by_set: dict[str, list[EvalRun]], out: Path, n_boot: int) -> str:
    """The evaluate part: per test set, accuracy table, paired deltas and a plot; returns the markdown."""
    single = len(by_set) == 1
    sections, tables, all_deltas, all_pre = [], [], [], []
    curves = _training_curves([r for runs in by_set.values() for r in runs])
    train_plots = []
    if plot_training(curves, "reward_mean", "retry success rate (reward mean)", out / "train_reward.png"):
        train_plots.append("train_reward.png")
    if plot_training(curves, "reflection_len_mean", "reflection length (tokens)", out / "reflection_length.png"):
        train_plots.append("reflection_length.png")
    for name, runs in by_set.items():
        ref = runs[0]
        acc = accuracy_table(runs, n_boot)
        deltas = trained_vs_vanilla(runs, n_boot)
        gaps = reflection_gaps(runs, n_boot)
        pre = preregistered(runs, n_boot)
        plot = "accuracy.png" if single else f"accuracy_{_slug(name)}.png"
        what = ref.task if single else f"{name} ({ref.task})"
        plot_accuracy(acc, f"{what}, {ref.split} split, n={len(ref.outcomes)}: accuracy with 95% bootstrap CIs",
                      out / plot)
        sections.append(render_report(runs, acc, deltas, gaps, [plot] + (train_plots if single else []), n_boot,
                                      level=1 if single else 2, pre=pre))
        for df in (acc, deltas, gaps, pre):
            df.insert(0, "test_set", name)
            if len(df):
                df.insert(1, "relation", df["run_a" if "run_a" in df else "run"].map(
                    {r.name: r.relation for r in runs}).fillna(""))
        tables.append(acc)
        all_deltas += [deltas, gaps]
        all_pre.append(pre)
        print(f"\n[{name}]" if not single else "")
        print(accuracy_markdown(acc))
        if len(deltas):
            print()
            print(_delta_markdown(deltas, "model", ["first_try", "second_try"], ["Δ 1st try (pp)", "Δ 2nd try (pp)"]))
        if len(pre):
            print()
            print(prereg_markdown(pre))
    atomic_write_text(out / "table.csv", pd.concat(tables, ignore_index=True).to_csv(index=False))
    atomic_write_text(out / "deltas.csv", pd.concat(all_deltas, ignore_index=True).to_csv(index=False))
    atomic_write_text(out / "preregistered.csv", pd.concat(all_pre, ignore_index=True).to_csv(index=False))
    training = training_summary([r for runs in by_set.values() for r in runs])
    if training:
        print()
        print("\n".join(training))
    training_md = ["## Training", ""] + [f"- {line}" for line in training] + [""] if training else []
    if single:
        return "\n".join([sections[0]] + training_md)
    head = [f"# R3 comparison: {len(by_set)} test sets", "",
            "Each test set is scored and bootstrapped apart (its own examples, CIs and paired deltas). "
            "2nd-try accuracy in % per run and set; the last column says, for the trained model, whether "
            "the set was in its training data.", "", overview_markdown(by_set, n_boot), ""]
    tail = ["## Training curves", ""] + [f"![{p}]({p})" for p in train_plots] + [""] if train_plots else []
    return "\n".join(head + training_md + sections + tail)


def overview_markdown(by_set: dict[str, list[EvalRun]], n_boot: int) -> str:
    names = list(dict.fromkeys(r.name for runs in by_set.values() for r in runs))
    rows = []
    for name, runs in by_set.items():
        cells = {r.name: _pct(*bootstrap_ci(r.outcomes["second_try"], n_boot)) if "second_try" in r.outcomes
                 else "—" for r in runs}
        relation = "; ".join(sorted({r.relation for r in runs if r.relation})) or "—"
        rows.append([name, str(len(runs[0].outcomes))] + [cells.get(n, "—") for n in names] + [relation])
    return _md_table(["test set", "n"] + names + ["trained model vs this set"], rows)
