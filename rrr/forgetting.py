"""`rrr forgetting`: the forgetting check (paper.md §6.5) through lm-eval-harness, not a re-implementation.

The paper reports MMLU-Pro, GSM8K, HellaSwag and MATH before and after R3 training (< 1% drop). We hand
the model rrr loads (the embedded GGUF conversion, a hub model, or a `rrr train` checkpoint with its
LoRA adapter applied) to lm-eval's own HF wrapper (`HFLM(pretrained=<model object>)`) and run
`lm_eval.simple_evaluate` once per task, with `log_samples=True`, so every document's score is kept and
`rrr compare` can pair the vanilla and the trained model document by document.

A command of its own rather than a stage of `rrr evaluate`: it runs lm-eval's engine, not rrr's
(loglikelihood scoring and lm-eval's generation), costs hours on a GPU where an evaluation costs minutes,
does not depend on the task rrr trained on, and is run once per model, not once per test set.

Run dir: `config.yaml`, `manifest.json`, `tasks/<task>/results.json` (lm-eval's results, configs,
versions, n-shot, n-samples) and `tasks/<task>/samples.parquet` (one row per document × filter × metric),
written atomically as each task finishes, so a re-run with `run_dir=...` skips finished tasks; then
`benchmark.parquet` (one row per task/subtask/group × metric × filter), `samples.parquet` (all tasks)
and `summary.json`.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from rrr.config import UserError
from rrr.atomic import atomic_write_json, atomic_write_parquet
from rrr.model_info import model_provenance
from rrr.run_dir import RunDir

COMMAND = "forgetting"
FORMER_COMMAND = "benchmark"    # its name before; `rrr benchmark` still runs it (rrr.cli)
PAPER_TASKS = ("mmlu_pro", "gsm8k", "hellaswag", "hendrycks_math")   # conf/forgetting/default.yaml says why
INSTALL = "pip install -e '.[forgetting]'"
RESPONSE_CHARS = 2000         # per-sample response text kept in samples.parquet
# errors that mean "the data could not be fetched" (offline, gated, not cached), not a bug in rrr
DATA_ERROR_MODULES = {"datasets", "huggingface_hub", "requests", "httpx", "fsspec", "aiohttp", "urllib3"}


@dataclass(frozen=True)
class TaskPlan:
    name: str
    num_fewshot: int | None
    limit: int | float | None

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.name)


# ----------------------------------------------------------------------------- config

def _limit(value: Any, where: str) -> int | float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}={value!r} must be an int (documents) or a float in (0, 1) (a share), or null")
    if isinstance(value, float) and not value.is_integer():
        if not 0 < value < 1:
            raise UserError(f"{where}={value!r}: a fractional limit must lie in (0, 1)")
        return float(value)
    if value < 1:
        raise UserError(f"{where}={value!r} must be >= 1")
    return int(value)


def _fewshot(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{where}={value!r} must be an int >= 0 or null (the task's default)")
    return int(value)


def task_plans(forgetting: DictConfig) -> list[TaskPlan]:
    """One plan per task in `forgetting.tasks`, with `forgetting.per_task.<task>` overriding the shared settings."""
    tasks = [str(t) for t in forgetting.tasks]
    if not tasks:
        raise UserError("forgetting.tasks is empty; give lm-eval task names, e.g. forgetting.tasks=[gsm8k,hellaswag]")
    if len(set(tasks)) != len(tasks):
        raise UserError(f"forgetting.tasks lists a task twice: {tasks}")
    per_task = OmegaConf.to_container(forgetting.per_task, resolve=True) if forgetting.get("per_task") else {}
    if not isinstance(per_task, dict):
        raise UserError("forgetting.per_task must be a mapping, e.g. forgetting.per_task='{gsm8k: {num_fewshot: 8}}'")
    unknown = sorted(set(per_task) - set(tasks))
    if unknown:
        raise UserError(f"forgetting.per_task names {unknown}, which are not in forgetting.tasks {tasks}")
    plans = []
    for t in tasks:
        over = per_task.get(t) or {}
        bad = sorted(set(over) - {"num_fewshot", "limit"})
        if bad:
            raise UserError(f"forgetting.per_task.{t} has unknown keys {bad}; valid: num_fewshot, limit")
        plans.append(TaskPlan(
            name=t,
            num_fewshot=_fewshot(over.get("num_fewshot", forgetting.num_fewshot), f"forgetting.per_task.{t}.num_fewshot"
                                 if "num_fewshot" in over else "forgetting.num_fewshot"),
            limit=_limit(over.get("limit", forgetting.limit), f"forgetting.per_task.{t}.limit" if "limit" in over
                         else "forgetting.limit")))
    return plans


def include_path(forgetting: DictConfig) -> str | None:
    if not forgetting.get("include_path"):
        return None
    path = Path(str(forgetting.include_path)).expanduser().resolve()
    if not path.is_dir():
        raise UserError(f"forgetting.include_path={str(forgetting.include_path)!r} is not a folder of lm-eval "
                        "task YAMLs")
    return str(path)


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def fingerprint(cfg: DictConfig, plans: list[TaskPlan], lm_eval_version: str | None) -> dict[str, Any]:
    """What must not change when a benchmark run is resumed (a finished task is not re-run)."""
    b = cfg.forgetting
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "tasks": [p.__dict__ for p in plans],
        "include_path": include_path(b),
        "apply_chat_template": bool(b.apply_chat_template),
        "fewshot_as_multiturn": bool(b.fewshot_as_multiturn),
        "gen_kwargs": _container(b.gen_kwargs),
        "max_length": b.max_length,
        "merge_adapter": bool(b.merge_adapter),
        "lm_eval": lm_eval_version,
    }


# ----------------------------------------------------------------------------- lm-eval

def require_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError:
        raise UserError(f"rrr forgetting needs lm-eval-harness: {INSTALL} (or pip install lm-eval)") from None
    return lm_eval


def lm_eval_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return None


def build_lm(cfg: DictConfig):
    """lm-eval's HFLM around the model rrr loads (a `model.path` adapter applied, merged if asked)."""
    from lm_eval.models.huggingface import HFLM

    from rrr.models import load_model

    model, tokenizer = load_model(cfg.model)
    if bool(cfg.forgetting.merge_adapter) and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()       # W + BA once, instead of an adapter pass per layer
    model.eval()
    kwargs: dict[str, Any] = {"batch_size": int(cfg.forgetting.batch_size)}
    if cfg.forgetting.get("max_length"):
        kwargs["max_length"] = int(cfg.forgetting.max_length)
    return HFLM(pretrained=model, tokenizer=tokenizer, **kwargs)


def build_task_manager(inc: str | None, plans: list[TaskPlan]):
    """lm-eval's TaskManager. Indexing its ~15k built-in task YAMLs takes 10-30 s on a CPU, so when
    `forgetting.include_path` holds every requested task, only that folder is indexed."""
    from lm_eval.tasks import TaskManager

    if inc:
        local = TaskManager(include_path=inc, include_defaults=False)
        if all(p.name in set(local.all_tasks) for p in plans):
            return local
    if inc not in _FULL_INDEX:            # one full index per process and include path
        _FULL_INDEX[inc] = TaskManager(include_path=inc)
    return _FULL_INDEX[inc]


_FULL_INDEX: dict[str | None, Any] = {}


def check_tasks(task_manager: Any, plans: list[TaskPlan]) -> None:
    known = set(task_manager.all_tasks)
    for p in plans:
        if p.name not in known:
            close = difflib.get_close_matches(p.name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"unknown lm-eval task {p.name!r}{hint} (`lm-eval ls tasks` lists them; local "
                            "task YAMLs need forgetting.include_path=DIR)")


def _is_data_error(e: BaseException) -> bool:
    for t in type(e).__mro__:
        if t.__module__.split(".")[0] in DATA_ERROR_MODULES:
            return True
    return isinstance(e, (ConnectionError, TimeoutError, FileNotFoundError))


def evaluate_task(lm: Any, task_manager: Any, plan: TaskPlan, forgetting: DictConfig) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` on one task with per-sample logging; a data-loading failure (offline,
    gated) becomes one UserError naming the task."""
    import lm_eval

    chat = bool(forgetting.apply_chat_template)
    try:
        return lm_eval.simple_evaluate(
            model=lm, tasks=[plan.name], task_manager=task_manager, num_fewshot=plan.num_fewshot,
            limit=plan.limit, log_samples=True, bootstrap_iters=int(forgetting.bootstrap_iters),
            apply_chat_template=chat, fewshot_as_multiturn=chat and bool(forgetting.fewshot_as_multiturn),
            gen_kwargs=_container(forgetting.gen_kwargs))
    except Exception as e:
        if _is_data_error(e):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"lm-eval task {plan.name!r} cannot load its data ({type(e).__name__}: {first}); "
                            "the hub benchmarks need the network or a filled HF datasets cache "
                            "(HF_DATASETS_CACHE); a local task needs forgetting.include_path=DIR") from None
        raise


# ----------------------------------------------------------------------------- lm-eval output -> tables

def _number(v: Any) -> float | None:
    """A per-sample score we can bootstrap: a finite real number (bools included); else None."""
    if isinstance(v, (bool, np.bool_, int, float, np.integer, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else None
    return None


def _text(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str, ensure_ascii=False)
    return s[:RESPONSE_CHARS]


def sample_rows(task: str, output: dict[str, Any]) -> list[dict[str, Any]]:
    """lm-eval's logged samples, one row per (subtask, document, filter, metric) with a numeric score.
    Corpus-level metrics (bleu, ...) log tuples per sample: those have no per-sample score and are left out."""
    rows = []
    for subtask, samples in (output.get("samples") or {}).items():
        for s in samples:
            for metric in s.get("metrics", []):
                score = _number(s.get(metric))
                if score is None:
                    continue
                rows.append({"task": task, "subtask": subtask, "doc_id": int(s["doc_id"]),
                             "filter": str(s.get("filter", "none")), "metric": metric, "score": score,
                             "doc_hash": str(s.get("doc_hash", "")), "prompt_hash": str(s.get("prompt_hash", "")),
                             "target": _text(s.get("target")), "response": _text(s.get("filtered_resps"))})
    return rows


def result_rows(task: str, output: dict[str, Any]) -> list[dict[str, Any]]:
    """lm-eval's aggregate results, one row per (task/subtask/group, metric, filter)."""
    rows = []
    n_samples, n_shot = output.get("n-samples") or {}, output.get("n-shot") or {}
    higher = output.get("higher_is_better") or {}
    for name, res in (output.get("results") or {}).items():
        for key, value in res.items():
            if "," not in key or key.split(",")[0].endswith("_stderr"):
                continue
            metric, filt = key.split(",", 1)
            stderr = res.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "name": name, "metric": metric, "filter": filt,
                         "value": _number(value), "stderr": _number(stderr),
                         "n": (n_samples.get(name) or {}).get("effective", res.get("sample_len")),
                         "num_fewshot": n_shot.get(name), "higher_is_better": (higher.get(name) or {}).get(metric),
                         "is_group": name in (output.get("group_subtasks") or {})
                         and bool(output["group_subtasks"][name])})
    return rows


def _results_json(output: dict[str, Any]) -> dict[str, Any]:
    keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
            "n-samples", "config", "lm_eval_version", "transformers_version", "date", "total_evaluation_time_seconds")
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps({k: output[k] for k in keep if k in output}, default=handle_non_serializable))


# ----------------------------------------------------------------------------- pipeline

def _finished(out_dir: Path) -> bool:
    return (out_dir / "results.json").exists() and (out_dir / "samples.parquet").exists()


def run(cfg: DictConfig) -> Path:
    t0 = time.time()
    plans = task_plans(cfg.forgetting)
    inc = include_path(cfg.forgetting)
    require_lm_eval()
    from rrr.evaluate import train_run_of

    task_manager = build_task_manager(inc, plans)
    check_tasks(task_manager, plans)
    version = lm_eval_version()
    # locked before its results are read; a run of `rrr benchmark` (the former name) is continued too
    rundir = RunDir.open(cfg, COMMAND, fingerprint(cfg, plans, version), former_names=(FORMER_COMMAND,))
    run_dir = rundir.path
    todo = [p for p in plans if not _finished(run_dir / "tasks" / p.slug)]
    lm = build_lm(cfg) if todo else None
    # only now, with valid inputs and a loaded model, does the run dir get its config and manifest
    rundir.claim()
    model_path = cfg.model.get("path")
    rundir.write_run_files(cfg, extra={
        "model": model_provenance(cfg.model),
        "model_label": "trained" if model_path else "vanilla",
        "train_run": train_run_of(model_path),
        "tasks": [p.__dict__ for p in plans],
        "lm_eval_version": version,
        "seeds": "lm-eval's defaults (random 0, numpy/torch/fewshot 1234), so numbers match a plain lm-eval run",
    })

    times: dict[str, float] = {}
    for plan in plans:
        out_dir = run_dir / "tasks" / plan.slug
        if plan not in todo:
            print(f"benchmark {plan.name}: done in an earlier invocation, kept")
            continue
        start = time.time()
        output = evaluate_task(lm, task_manager, plan, cfg.forgetting)
        times[plan.name] = round(time.time() - start, 2)
        # samples first: results.json marks the task finished
        atomic_write_parquet(out_dir / "samples.parquet", pd.DataFrame(sample_rows(plan.name, output),
                                                                        columns=SAMPLE_COLUMNS))
        atomic_write_json(out_dir / "results.json", {**_results_json(output), "rrr_wall_s": times[plan.name]})
        print(f"benchmark {plan.name}: {times[plan.name]:.1f} s")

    table, samples = read_tables(run_dir, plans)
    atomic_write_parquet(run_dir / "benchmark.parquet", table)
    atomic_write_parquet(run_dir / "samples.parquet", samples)
    summary = {"model": str(cfg.model.name), "label": "trained" if model_path else "vanilla",
               "tasks": {p.name: table_summary(table[table.task == p.name]) for p in plans},
               "task_wall_s": times, "wall_s": round(time.time() - t0, 2), "lm_eval_version": version}
    atomic_write_json(run_dir / "summary.json", summary)
    rundir.finish()
    print(format_table(table))
    print(f"results: {run_dir / 'benchmark.parquet'}")
    return run_dir


SAMPLE_COLUMNS = ["task", "subtask", "doc_id", "filter", "metric", "score", "doc_hash", "prompt_hash",
                  "target", "response"]


def read_tables(run_dir: Path, plans: list[TaskPlan]) -> tuple[pd.DataFrame, pd.DataFrame]:
    tables, samples = [], []
    for p in plans:
        d = run_dir / "tasks" / p.slug
        tables.append(pd.DataFrame(result_rows(p.name, json.loads((d / "results.json").read_text()))))
        samples.append(pd.read_parquet(d / "samples.parquet"))
    return pd.concat(tables, ignore_index=True), pd.concat(samples, ignore_index=True)


def table_summary(rows: pd.DataFrame) -> dict[str, Any]:
    return {f"{r.name}/{r.metric},{r.filter}": {"value": r.value, "stderr": r.stderr, "n": r.n}
            for r in rows.itertuples()}


def format_table(table: pd.DataFrame) -> str:
    lines = [f"{'task':34s}{'metric':22s}{'filter':18s}{'value':>8s}{'stderr':>9s}{'n':>7s}"]
    for r in table.itertuples():
        value = "—" if r.value is None or pd.isna(r.value) else f"{r.value:.4f}"
        stderr = "—" if r.stderr is None or pd.isna(r.stderr) else f"{r.stderr:.4f}"
        lines.append(f"{r.name[:33]:34s}{r.metric[:21]:22s}{r.filter[:17]:18s}{value:>8s}{stderr:>9s}"
                     f"{'' if r.n is None or pd.isna(r.n) else int(r.n):>7}")
    return "\n".join(lines)
