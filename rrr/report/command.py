"""`rrr compare RUN_DIR... [--out DIR]`: the paper-style table from evaluate runs, with bootstrap CIs, and
the forgetting-check table from `rrr forgetting` runs (rrr/report/forgetting.py), in one report. A vanilla
and a trained `rrr failure-eval` run come first: the held-out failure comparison (rrr/report/failures.py).

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

import time
from pathlib import Path

import pandas as pd

from rrr.config import UserError
from rrr.report import failures, forgetting
from rrr.report.checks import check_comparable, name_runs
from rrr.report.load import EvalRun, load_run, training_curves
from rrr.report.markdown import delta_markdown, accuracy_markdown, overview_markdown, prereg_markdown, render_report
from rrr.report.plots import plot_accuracy, plot_training
from rrr.report.tables import accuracy_table, preregistered, reflection_gaps, trained_vs_vanilla, training_summary
from rrr.atomic import atomic_write_json, atomic_write_text
from rrr.provenance import git_sha
from rrr.run_dir import RunDir

def _default_out() -> Path:
    base = Path("outputs") / "compare" / time.strftime("%Y%m%d-%H%M%S")
    out, i = base, 1
    while out.exists():
        out, i = base.with_name(f"{base.name}-{i}"), i + 1
    return out


def run(run_dirs: list[Path], out: Path | None = None, n_boot: int = 2000, note: str = "") -> Path:
    """Compare evaluate runs and/or forgetting-check runs; write report.md, the CSVs and plots into `out`."""
    if not run_dirs:
        raise UserError("give at least one evaluate or forgetting run directory: rrr compare RUN_DIR [RUN_DIR...]")
    failure_dirs = [Path(d) for d in run_dirs if failures.is_failure_eval_run(Path(d))]
    forgetting_dirs = [Path(d) for d in run_dirs if forgetting.is_forgetting_run(Path(d))]
    eval_dirs = [Path(d) for d in run_dirs if not forgetting.is_forgetting_run(Path(d))
                 and not failures.is_failure_eval_run(Path(d))]
    if failure_dirs:
        failures.pair_runs(failure_dirs)            # refuse a bad set before the output directory exists
    # read and check everything before the output directory exists
    runs = load_evaluations(eval_dirs) if eval_dirs else {}
    forgetting_runs = forgetting.name_runs([forgetting.load_forgetting_run(p) for p in forgetting_dirs])
    out = Path(out) if out else _default_out()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    RunDir(out, "compare").claim()                  # created, locked (one writer), announced
    names = list(dict.fromkeys([*map(str, failure_dirs),
                                *(str(r.path) for r in [*(r for rs in runs.values() for r in rs), *forgetting_runs])]))
    sections = []
    if failure_dirs:                                # the held-out failure comparison comes first
        lines = failures.section(failure_dirs, out, n_boot)
        print("\n".join(lines))
        sections += ["# Held-out failures (rrr failure-eval)", "", "```", *lines, "```", ""]
    if runs:
        sections.append(compare_evaluations(runs, out, n_boot))
    if forgetting_runs:
        section, scores, deltas = forgetting.compare(forgetting_runs, out, n_boot)
        sections += ([] if runs else ["# Forgetting check", ""]) + [section]
        print()
        print(forgetting.scores_markdown(scores, forgetting_runs))
        if len(deltas):
            print()
            print(forgetting.deltas_markdown(deltas))
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
        runs = name_runs(runs)
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
    curves = training_curves([r for runs in by_set.values() for r in runs])
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
            print(delta_markdown(deltas, "model", ["first_try", "second_try"], ["Δ 1st try (pp)", "Δ 2nd try (pp)"]))
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

