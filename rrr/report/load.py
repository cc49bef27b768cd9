"""Reading runs for `rrr compare`: an evaluate run directory becomes one `EvalRun` per test set, with
its outcomes (one bool column per metric, indexed by example id), its reflection stats and the train run
whose `metrics.jsonl` gives the training curves."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from rrr.config import UserError
from rrr.metrics_file import read_metrics

# metric key -> (column in results.parquet, column title in the report)
METRICS: dict[str, tuple[str, str]] = {
    "first_try": ("attempt1_correct", "1st try"),
    "second_try": ("second_try_correct", "2nd try"),
    "best_of_2": ("best_of_2_correct", "best-of-2"),
    "retry_no_reflection": ("retry_no_reflection_correct", "retry, no reflection"),
    "generic_reflection": ("generic_reflection_correct", "generic reflection"),
}
CONTROLS = ("best_of_2", "retry_no_reflection", "generic_reflection")


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



def training_curves(runs: list[EvalRun]) -> dict[str, pd.DataFrame]:
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

