"""`rrr failure-eval`: the held-out failure evaluation (issue 21; DESIGN.md "the evaluation that judges it").

A reflection can only matter where attempt 1 failed, so this evaluation is run on failures. The failure set
is fixed once, from the *vanilla* model, with the collect-failures machinery on the test split:

    rrr collect-failures data.split=test collect.samples_per_query=k collect.keep_attempts=m ...

(every failed attempt stored as its sampled token ids). Then, for any model (vanilla or `model.path=`
a trained checkpoint), each failure (query, failed attempt 1) gets R = `eval.reflections_per_failure`
reflections → retries, and on the same failures and seeds the controls of `eval.controls`: a retry with
no reflection, a fresh attempt (best-of-2: a second independent attempt 1) and a generic reflection.
A failure's fix rate is the mean of its R retries. Seeds derive from (seed, step = stored-attempt index,
query id, sample index, segment), so two models see the same failures with the same seeds and compare
paired, failure by failure, clustered by query (rrr.stats), with the
minimum detectable effect at 80% power; `rrr compare VANILLA_RUN TRAINED_RUN` (rrr/report/failures.py)
reports them first.

Why a command of its own rather than `rrr evaluate eval.on=failures`: its input (a failure set), unit
(failure × R) and results differ from evaluate's per-example table; its own command and run directory
keep resume fingerprints and `rrr compare` from ever mixing the two, and `rrr evaluate` stays as it is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from rrr import distributed as dist
from rrr.config import UserError
from rrr.engines.base import Sample
from rrr.evaluate import REFLECTION_MODE, controls_of, segment_sampling, train_run_of
from rrr.failures import load_failures
from rrr.leak import reflection_leaks
from rrr.atomic import atomic_write_json, atomic_write_parquet
from rrr.engines import build_generator
from rrr.model_info import model_provenance
from rrr.parts import chunks, done_ids, read_parts, write_part
from rrr.provenance import sha256_file
from rrr.rollout import throughput
from rrr.run_dir import RunDir, read_manifest
from rrr.stats import clustered_rate as rate
from rrr.stats import min_detectable_effect, paired_delta
from rrr.tasks import Example, get_task
from rrr.validate import check as check_settings
from rrr.validate import check_at_least_one, check_limit
from rrr.verifiers import VERIFIER_VERSION, Verdict

COMMAND = "failure-eval"
METHOD = "reflection"        # the method's condition; the controls keep their evaluate names


@dataclass(frozen=True)
class Failure:
    """One fixed (query, failed attempt 1) pair of the failure set."""
    pair_id: str             # "<query id>#<stored attempt index>"
    example: Example
    index: int               # which stored failed attempt; seeds use it as the step
    sample: Sample
    verdict: Verdict


def failures_of(examples: Sequence[Example], stored: Sequence[dict], per_query: int) -> list[Failure]:
    """The first `per_query` stored failed attempts of every query, as failures."""
    out = []
    for ex, s in zip(examples, stored):
        for k in range(min(per_query, len(s["token_ids"]))):
            sample = Sample(token_ids=list(s["token_ids"][k]), finish_reason="length" if s["truncated"][k] else "stop")
            out.append(Failure(f"{ex.id}#{k}", ex, k, sample, Verdict(False, s["reasons"][k])))
    return out


def conditions_of(cfg: DictConfig) -> list[str]:
    return [METHOD, *controls_of(cfg)]


# ----------------------------------------------------------------------------- one batch

def outcome_columns(name: str, task: Any, example: Example, texts: Sequence[str],
                    correct: Sequence[bool | None]) -> dict[str, Any]:
    """R retries of one condition: their texts, outcomes (NaN = unscorable), fix rate = mean of the
    scorable ones, and the strict (leaderboard-format) outcomes beside them when the task has that
    format. Columns are `<condition>_attempt2_texts`, `_correct`, `_fix_rate`, `_strict`, `_strict_fix_rate`
    (`reflection_texts` holds the method's reflections themselves)."""
    outcomes = [np.nan if c is None else float(c) for c in correct]
    cols = {f"{name}_attempt2_texts": list(texts), f"{name}_correct": outcomes, f"{name}_fix_rate": _mean(outcomes)}
    if hasattr(task, "verify_strict"):
        strict = [float(bool(t) and task.verify_strict(example, t).correct) for t in texts]
        cols.update({f"{name}_strict": strict, f"{name}_strict_fix_rate": _mean(strict)})
    return cols


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not np.isnan(x)]
    return float(np.mean(xs)) if xs else float("nan")


def evaluate_failures(engine: Any, tokenizer: Any, task: Any, failures: Sequence[Failure], cfg: DictConfig,
                      stats: Any) -> list[dict[str, Any]]:
    """R reflections → retries per failure, and each control on the same failures and seeds."""
    from rrr.rollout import UNSCORABLE, reflect_retry_modes, sample_attempts

    R, controls, sampling, seed = int(cfg.eval.reflections_per_failure), controls_of(cfg), segment_sampling(cfg), \
        int(cfg.seed)
    modes = ["model"] + [REFLECTION_MODE[c] for c in controls if c in REFLECTION_MODE]
    rows: dict[str, dict[str, Any]] = {}
    for index in sorted({f.index for f in failures}):       # one seed step per stored-attempt index
        batch = [f for f in failures if f.index == index]
        examples = [f.example for f in batch]
        episodes = reflect_retry_modes(engine, tokenizer, task, examples, [f.sample for f in batch], cfg.prompts,
                                       sampling, group_size=R, seed=seed, step=index, reflection_modes=modes,
                                       verdicts1=[f.verdict for f in batch], stats=stats)
        fresh = sample_attempts(engine, tokenizer, task, examples, cfg.prompts, sampling["attempt1"], n=R, seed=seed,
                                step=index, segment="best_of_2", stats=stats) if "best_of_2" in controls else None
        for i, f in enumerate(batch):
            group = episodes["model"][i]
            row = {"pair_id": f.pair_id, "example_id": f.example.id, "source": f.example.source,
                   "attempt_index": index, "attempt1_reason": f.verdict.reason,
                   "reflection_texts": [ep.texts.get("reflection", "") for ep in group],
                   "reflection_tokens": [int(ep.reflection_length) for ep in group],
                   "reflection_truncated": [bool(ep.truncated.get("reflection", False)) for ep in group],
                   "reflection_leak": [bool(reflection_leaks(task, f.example, ep.texts.get("reflection")))
                                       for ep in group]}
            row.update(outcome_columns(METHOD, task, f.example, [ep.texts.get("attempt2", "") for ep in group],
                                       [ep.attempt2_correct for ep in group]))
            for c in controls:
                if c == "best_of_2":
                    texts = [a.text for a in fresh[i]]
                    correct = [None if a.verdict is UNSCORABLE else bool(a.verdict.correct) for a in fresh[i]]
                else:
                    eps = episodes[REFLECTION_MODE[c]][i]
                    texts, correct = [ep.texts.get("attempt2", "") for ep in eps], [ep.attempt2_correct for ep in eps]
                row.update(outcome_columns(c, task, f.example, texts, correct))
            rows[f.pair_id] = row
    return [rows[f.pair_id] for f in failures]


# ----------------------------------------------------------------------------- statistics

def summarize(df: pd.DataFrame, conditions: Sequence[str], n_boot: int, seed: int) -> dict[str, Any]:
    """Fix rates per condition (lenient, and strict where present), the method against each control
    within this model, and the planning MDE of a future paired comparison of this condition between two
    models assuming uncorrelated fix rates (√2 · SE; pairing only lowers it)."""
    clusters = df.example_id.to_numpy()
    fix = {c: rate(df[f"{c}_fix_rate"], clusters, n_boot, seed) for c in conditions}
    tokens = np.concatenate([np.asarray(t, float) for t in df.reflection_tokens]) if len(df) else np.array([])
    summary = {
        "n_failures": len(df), "n_queries": int(df.example_id.nunique()),
        "fix_rate": fix,
        "within": {f"{METHOD} - {c}": paired_delta(df[f"{METHOD}_fix_rate"], df[f"{c}_fix_rate"], clusters,
                                                    n_boot, seed) for c in conditions if c != METHOD},
        "planning_mde_between_models": {c: (min_detectable_effect(np.sqrt(2) * f["se"]) if f["se"] else None)
                                        for c, f in fix.items()},
        "reflection": {"tokens_mean": float(tokens.mean()) if tokens.size else None,
                       "truncated_share": _share(df.reflection_truncated), "leak_share": _share(df.reflection_leak)},
    }
    if f"{METHOD}_strict_fix_rate" in df:
        summary["strict_fix_rate"] = {c: rate(df[f"{c}_strict_fix_rate"], clusters, n_boot, seed) for c in conditions}
    return summary


def _share(column: pd.Series) -> float | None:
    flat = [bool(x) for xs in column for x in xs]
    return float(np.mean(flat)) if flat else None


def _pp(x: float | None, sign: bool = False) -> str:
    return "n/a" if x is None or np.isnan(x) else f"{100 * x:+.1f}" if sign else f"{100 * x:.1f}"


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"{COMMAND} · {s['model']} ({s['label']}) · {s['n_failures']} failures of {s['n_queries']} queries "
             f"({s['failure_set']['held_out']}) · R = {s['R']}",
             f"{'':22s}fix rate   95% CI (by query)" + ("   strict" if "strict_fix_rate" in s else "")]
    for c, v in s["fix_rate"].items():
        line = f"{c.replace('_', ' '):22s}{_pp(v['mean']):>8s}   [{_pp(v['ci'][0])}, {_pp(v['ci'][1])}]"
        if "strict_fix_rate" in s:
            line += f"   {_pp(s['strict_fix_rate'][c]['mean'])}"
        lines.append(line)
    for k, d in s["within"].items():
        lines.append(f"{k.replace('_', ' ')}: {_pp(d['delta'], True)} pp [{_pp(d['ci'][0], True)}, "
                     f"{_pp(d['ci'][1], True)}], MDE {_pp(d['mde'])} pp")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- pipeline

def failure_set_info(failures_dir: Path) -> dict[str, Any]:
    manifest = read_manifest(failures_dir) or {}
    model = manifest.get("model") or {}
    split = manifest.get("split")
    return {"run": str(failures_dir), "failures_sha256": sha256_file(failures_dir / "failures.parquet"),
            "split": split, "model": model.get("name"), "vanilla": not model.get("path"),
            "held_out": "held-out: test split" if split == "test" else f"NOT held out: {split} split"}


def validate(cfg: DictConfig) -> Path:
    e = cfg.eval
    if not e.get("failures"):
        raise UserError("eval.failures is not set: collect the vanilla model's failures on the test split "
                        "(rrr collect-failures data.split=test ...) and pass eval.failures=<its run dir>")
    check_at_least_one(e.reflections_per_failure, "eval.reflections_per_failure", "R retries per failure; default 4")
    check_at_least_one(e.attempts_per_query, "eval.attempts_per_query", "stored failed attempts used per query")
    check_at_least_one(e.batch_queries, "eval.batch_queries")
    check_limit(e.failures_limit, "eval.failures_limit")
    check_settings(cfg, "evaluate")               # eval.sampling.*, eval.bootstrap_samples
    return Path(e.failures)


def check_prompts(tokenizer, task, examples, stored, prompts_cfg, run: str) -> None:
    """The trainer's check: a stored attempt 1 must continue the very prompt rebuilt now."""
    from rrr.failure_set import check_stored_prompts

    check_stored_prompts(tokenizer, task, examples, stored, prompts_cfg, run)


def fingerprint(cfg: DictConfig, info: dict[str, Any]) -> dict[str, Any]:
    return {"task": OmegaConf.to_container(cfg.task, resolve=True),
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "prompts": OmegaConf.to_container(cfg.prompts, resolve=True), "engine": str(cfg.engine.name),
            "failures_sha256": info["failures_sha256"], "seed": int(cfg.seed), "controls": controls_of(cfg),
            "R": int(cfg.eval.reflections_per_failure), "attempts_per_query": int(cfg.eval.attempts_per_query),
            "sampling": {seg: p.__dict__ for seg, p in segment_sampling(cfg).items()},
            "verifier_version": VERIFIER_VERSION}


def run(cfg: DictConfig) -> Path:
    from rrr.rollout import RolloutStats

    t0 = time.time()
    failures_dir = validate(cfg)
    examples, stored = load_failures(failures_dir)
    limit = cfg.eval.failures_limit
    examples, stored = (examples[:int(limit)], stored[:int(limit)]) if limit else (examples, stored)
    if any(ex.task != cfg.task.name for ex in examples):
        raise UserError(f"eval.failures={failures_dir} holds {examples[0].task} failures, not task={cfg.task.name}")
    failures = failures_of(examples, stored, int(cfg.eval.attempts_per_query))
    task, info = get_task(cfg.task.name), failure_set_info(failures_dir)
    rundir = RunDir.open(cfg, COMMAND, fingerprint(cfg, info))   # named by rank 0, locked before parts are read
    run_dir = rundir.path
    parts = run_dir / "parts"
    done = dist.from_main(lambda: done_ids(parts, key="pair_id"))
    todo = [f for f in failures if f.pair_id not in done]
    engine, tokenizer = build_generator(cfg) if todo else (None, None)
    if todo:
        check_prompts(tokenizer, task, examples, stored, cfg.prompts, str(failures_dir))
    rundir.claim()
    label = "trained" if cfg.model.get("path") else "vanilla"
    rundir.write_run_files(cfg, extra={
        "task": cfg.task.name, "model": model_provenance(cfg.model), "model_label": label,
        "train_run": train_run_of(cfg.model.get("path")), "failure_set": info, "conditions": conditions_of(cfg),
        "R": int(cfg.eval.reflections_per_failure), "failures": len(failures), "queries": len(examples),
        "seeds": {"run_seed": int(cfg.seed), "step": "stored attempt index",
                  "derivation": "derive_seed(run_seed, step, example_id, sample_index, segment)"},
        "verifier_version": VERIFIER_VERSION})
    stats = RolloutStats()
    for batch in chunks(todo, int(cfg.eval.batch_queries)):
        rows = dist.map_shards(lambda part: evaluate_failures(engine, tokenizer, task, part, cfg, stats), batch)
        if dist.is_main():
            write_part(parts, rows)
    tp = dist.sum_over_ranks(throughput(stats))
    if not dist.is_main():
        return run_dir
    order = {f.pair_id: i for i, f in enumerate(failures)}
    df = read_parts(parts, key="pair_id")
    df = df[df.pair_id.isin(order)].sort_values("pair_id", key=lambda s: s.map(order)).reset_index(drop=True)
    atomic_write_parquet(run_dir / "results.parquet", df)
    summary = {**summarize(df, conditions_of(cfg), int(cfg.eval.bootstrap_samples), int(cfg.seed)),
               "model": str(cfg.model.name), "label": label, "R": int(cfg.eval.reflections_per_failure),
               "failure_set": info, "task": cfg.task.name, **tp, "wall_s": round(time.time() - t0, 2)}
    atomic_write_json(run_dir / "summary.json", summary)
    rundir.finish()
    print(format_summary(summary))
    print(f"results: {run_dir / 'results.parquet'}")
    return run_dir
