"""`rrr evaluate`: first-try and second-try accuracy, with the controls the paper lacks (paper.md §1.5, §6).

For every test example: attempt 1 (n=1). If it passes, the example is solved at the first try and the
episode stops (no reflection, no retry). If it fails: one self-reflection and one retry; second try =
solved at attempt 1 or at attempt 2 after reflecting. In the same pass, on the same failures and seeds:

  best_of_2            a second independent attempt 1 (no reflection): is it reflection or just a 2nd draw?
  retry_no_reflection  the retry prompt with no reflection in between: is it the reflection or the retry?
  generic_reflection   a fixed task-agnostic reflection: is it *this* reflection or any text?

Seeds derive from (seed, step=0, example id, sample index, segment), so the same seed and example give the
same attempt 1 in every evaluate run: vanilla and trained runs are paired example by example.

Scores: `*_correct` is the lenient verdict (the reward: fenced or bare JSON calls count); for a task with
a strict, leaderboard format (function calling: BFCL's `<tool_call>` blocks) `*_strict_correct` and the
summary's `strict` block report that verdict beside it, never in its place.

Several test sets (`eval.test_sets`, rrr/testsets.py): the same loop runs once per set, each set with its
own task, prompts and examples; results.parquet gets a `test_set` column and summary.json a summary (with
CIs) per set, so transfer to sources and tasks the model never trained on is visible.

Crash safety: examples run in batches of `eval.batch_queries`; each finished batch is written atomically
to `parts/part_NNNNN.parquet` (`parts/<set>/` with several sets); `run_dir=...` resumes and skips the example ids already there.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from rrr import distributed as dist
from rrr import preemption
from rrr.config import UserError
from rrr.episode import Segment
from rrr.leak import reflection_leaks
from rrr.atomic import atomic_write_json, atomic_write_parquet
from rrr.engines import build_generator
from rrr.model_info import model_provenance
from rrr.parts import chunks, done_ids, read_parts, write_part
from rrr.provenance import examples_sha256
from rrr.rollout import sampling_from_cfg, throughput
from rrr.run_dir import RunDir
from rrr.validate import check as check_settings, check_at_least_one
from rrr.eval_summary import format_table, summarize
from rrr.tasks import Example, excluded_ids, get_task
from rrr.testsets import TestSet
from rrr.testsets import resolve as resolve_test_sets
from rrr.verifiers import VERIFIER_VERSION

COMMAND = "evaluate"
STEP = 0                     # evaluation seeds use step 0, so every evaluate run draws the same attempt 1
CONTROLS = ("best_of_2", "retry_no_reflection", "generic_reflection")
REFLECTION_MODE = {"retry_no_reflection": "none", "generic_reflection": "generic"}


# ----------------------------------------------------------------------------- config and provenance

def controls_of(cfg: DictConfig) -> list[str]:
    controls = [str(c) for c in cfg.eval.controls]
    unknown = [c for c in controls if c not in CONTROLS]
    if unknown:
        raise UserError(f"unknown eval.controls {unknown}; valid: {', '.join(CONTROLS)}")
    return controls


def segment_sampling(cfg: DictConfig) -> dict[str, Any]:
    return sampling_from_cfg(cfg.eval.sampling)


def train_run_of(model_path: str | None) -> str | None:
    """The train run a checkpoint belongs to: the parent of the `checkpoints/` folder on its path."""
    if not model_path:
        return None
    path = Path(model_path).resolve()
    for d in (path, *path.parents):
        if d.name == "checkpoints":
            return str(d.parent)
    return None


def fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """What must not change when an evaluation is resumed (eval.limit may: it only adds examples)."""
    return {
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "prompts": OmegaConf.to_container(cfg.prompts, resolve=True),
        "engine": str(cfg.engine.name),
        "split": str(cfg.eval.split),
        "seed": int(cfg.seed),
        "controls": controls_of(cfg),
        "sampling": {seg: p.__dict__ for seg, p in segment_sampling(cfg).items()},
        "verifier_version": VERIFIER_VERSION,
    }


# ----------------------------------------------------------------------------- one batch

def first_try_row(example: Example, attempt: Any, controls: Sequence[str]) -> dict[str, Any]:
    """The row of an example after attempt 1; the retry columns hold 'no retry' until a retry happens."""
    solved = bool(attempt.verdict.correct)
    return {
        "example_id": example.id,
        "source": example.source,
        "attempt1_text": attempt.text,
        "attempt1_reason": attempt.verdict.reason,
        "attempt1_correct": solved,
        "attempt1_truncated": bool(attempt.sample.truncated),
        "reflection_text": "",
        "reflection_token_ids": [],
        "reflection_tokens": math.nan,
        "reflection_truncated": False,
        "reflection_leak": False,
        "attempt2_text": "",
        "attempt2_reason": "",
        "attempt2_correct": False,
        "second_try_correct": solved,
        **{k: v for c in controls for k, v in control_columns(c, "", "", solved).items()},
    }


def reflection_ids(episode: Any) -> list[int]:
    return [int(t) for t, s in zip(episode.token_ids, episode.segment_ids) if s == Segment.REFLECTION]


def retry_columns(episode: Any) -> dict[str, Any]:
    ids = reflection_ids(episode)
    return {
        "reflection_text": episode.texts.get("reflection", ""),
        "reflection_token_ids": ids,
        "reflection_tokens": float(len(ids)),
        "reflection_truncated": bool(episode.truncated.get("reflection", False)),
        "attempt2_text": episode.texts.get("attempt2", ""),
        "attempt2_reason": _reason(episode, "attempt2"),
        "attempt2_correct": bool(episode.attempt2_correct),
        "second_try_correct": bool(episode.attempt2_correct),
    }


def control_columns(control: str, text: str, reason: str, correct: bool) -> dict[str, Any]:
    return {f"{control}_text": text, f"{control}_reason": reason, f"{control}_correct": bool(correct)}


def strict_columns(task: Any, example: Example, row: dict[str, Any], controls: Sequence[str]) -> dict[str, bool]:
    """Leaderboard-format verdicts beside the lenient ones, for a task that has a strict format
    (`task.verify_strict`; none for countdown): X_strict = attempt 1 strict-correct, or X's retry text
    strict-correct. An attempt 1 that passed leniently got no retry, so its strict second try is its
    strict first try: what the leaderboard would have scored."""
    def ok(text: str) -> bool:
        return bool(text) and bool(task.verify_strict(example, text).correct)

    first = ok(row["attempt1_text"])
    out = {"attempt1_strict_correct": first, "second_try_strict_correct": first or ok(row["attempt2_text"])}
    for c in controls:
        out[f"{c}_strict_correct"] = first or ok(row[f"{c}_text"])
    return out


def with_strict(task: Any, examples: Sequence[Example], rows: list[dict[str, Any]],
                controls: Sequence[str]) -> list[dict[str, Any]]:
    if hasattr(task, "verify_strict"):
        for ex, row in zip(examples, rows):
            row.update(strict_columns(task, ex, row, controls))
    return rows


def _reason(episode: Any, segment: str) -> str:
    return str(episode.reasons.get(segment, ""))


def evaluate_batch(engine: Any, tokenizer: Any, task: Any, examples: Sequence[Example], cfg: DictConfig,
                   stats: Any) -> list[dict[str, Any]]:
    """Attempt 1 for every example; reflection + retry and each control for the failures only."""
    from rrr.rollout import reflect_retry_modes, sample_attempts

    controls, sampling, seed = controls_of(cfg), segment_sampling(cfg), int(cfg.seed)
    first = [a[0] for a in sample_attempts(engine, tokenizer, task, list(examples), cfg.prompts,
                                           sampling["attempt1"], n=1, seed=seed, step=STEP, stats=stats)]
    rows = [first_try_row(ex, a, controls) for ex, a in zip(examples, first)]
    failed = [i for i, a in enumerate(first) if not a.verdict.correct]
    if not failed:
        return with_strict(task, examples, rows, controls)
    failed_examples, failed_samples = [examples[i] for i in failed], [first[i].sample for i in failed]
    failed_verdicts = [first[i].verdict for i in failed]

    # the method and the reflection controls: their retries share one engine call (rollout.reflect_retry_modes)
    modes = ["model"] + [REFLECTION_MODE[c] for c in controls if c in REFLECTION_MODE]
    episodes = reflect_retry_modes(engine, tokenizer, task, failed_examples, failed_samples, cfg.prompts,
                                   sampling, group_size=1, seed=seed, step=STEP, reflection_modes=modes,
                                   verdicts1=failed_verdicts, stats=stats)
    for i, (ep,) in zip(failed, episodes["model"]):
        rows[i].update(retry_columns(ep))
        rows[i]["reflection_leak"] = reflection_leaks(task, examples[i], ep.texts.get("reflection"))
    for control in controls:
        if control == "best_of_2":
            # A separate seed stream ("best_of_2"), so enabling the control never changes attempt 1.
            second = sample_attempts(engine, tokenizer, task, failed_examples, cfg.prompts, sampling["attempt1"],
                                     n=1, seed=seed, step=STEP, segment="best_of_2", stats=stats)
            for i, (a,) in zip(failed, second):
                rows[i].update(control_columns(control, a.text, a.verdict.reason, a.verdict.correct))
        else:
            for i, (ep,) in zip(failed, episodes[REFLECTION_MODE[control]]):
                rows[i].update(control_columns(control, ep.texts.get("attempt2", ""), _reason(ep, "attempt2"),
                                               ep.attempt2_correct))
    return with_strict(task, examples, rows, controls)


# ----------------------------------------------------------------------------- pipeline

def load_examples(ts: TestSet, cfg: DictConfig) -> list[Example]:
    examples = get_task(ts.task).load(ts.cfg.task, cfg.eval.split, ts.limit, int(cfg.seed))
    if not examples:
        raise UserError(f"no examples in test set {ts.name!r} (split {cfg.eval.split!r}); check eval.split / "
                        "eval.limit / eval.test_sets")
    return examples


def parts_dir(run_dir: Path, ts: TestSet) -> Path:
    """A run with one set keeps today's layout (parts/); several sets get parts/<set>/ each."""
    return run_dir / "parts" if ts.default else run_dir / "parts" / ts.slug


def set_fingerprint(sets: Sequence[TestSet]) -> list[dict[str, Any]] | None:
    if len(sets) == 1 and sets[0].default:
        return None
    return [{"name": ts.name, "task": OmegaConf.to_container(ts.cfg.task, resolve=True),
             "prompts": OmegaConf.to_container(ts.cfg.prompts, resolve=True)} for ts in sets]


def set_manifest(ts: TestSet, examples: Sequence[Example], cfg: DictConfig) -> dict[str, Any]:
    return {"name": ts.name, "task": ts.task, "split": str(cfg.eval.split), "limit": ts.limit,
            "task_config": OmegaConf.to_container(ts.cfg.task, resolve=True),
            "examples": len(examples), "examples_sha256": examples_sha256(examples),
            "excluded_examples": excluded_ids(get_task(ts.task), ts.cfg.task, str(cfg.eval.split))}


def run(cfg: DictConfig) -> Path:
    from tqdm.auto import tqdm

    from rrr.rollout import RolloutStats

    t0 = time.time()
    controls = controls_of(cfg)
    check_at_least_one(cfg.eval.batch_queries, "eval.batch_queries")
    check_settings(cfg, COMMAND)
    sets = resolve_test_sets(cfg)
    examples_of = {ts.name: load_examples(ts, cfg) for ts in sets}
    everything = [e for ts in sets for e in examples_of[ts.name]]
    fp = fingerprint(cfg)
    if set_fingerprint(sets) is not None:
        fp["test_sets"] = set_fingerprint(sets)
    rundir = RunDir.open(cfg, COMMAND, fp)     # named by rank 0, locked before its parts are read
    run_dir = rundir.path
    todo_of = {}
    for ts in sets:
        done = dist.from_main(lambda: done_ids(parts_dir(run_dir, ts), key="example_id"))   # every rank: same list
        todo_of[ts.name] = [e for e in examples_of[ts.name] if e.id not in done]
    engine, tokenizer = build_generator(cfg) if any(todo_of.values()) else (None, None)
    # only now, with valid inputs and a loaded model, does the run dir get its config and manifest
    rundir.claim()
    model_path = cfg.model.get("path")
    label = "trained" if model_path else "vanilla"
    single = len(sets) == 1
    rundir.write_run_files(cfg, extra={
        "task": cfg.task.name,
        "split": str(cfg.eval.split),
        "model": model_provenance(cfg.model),
        "model_label": label,
        "train_run": train_run_of(model_path),
        "engine": OmegaConf.to_container(cfg.engine, resolve=True),
        "sampling": fp["sampling"],
        "controls": controls,
        "seeds": {"run_seed": int(cfg.seed), "step": STEP,
                  "derivation": "derive_seed(run_seed, step, example_id, sample_index, segment)"},
        "verifier_version": VERIFIER_VERSION,
        "test_sets": [set_manifest(ts, examples_of[ts.name], cfg) for ts in sets],
        "examples": len(everything),
        # one set: the hash of its examples, as before; several: over "set/example_id"
        "examples_sha256": examples_sha256(everything) if single else hashlib.sha256("\n".join(sorted(
            f"{ts.name}/{e.id}" for ts in sets for e in examples_of[ts.name])).encode()).hexdigest(),
    })

    stats = RolloutStats()
    for ts in sets:                                   # each test set: today's per-source loop
        examples, parts, todo = examples_of[ts.name], parts_dir(run_dir, ts), todo_of[ts.name]
        if len(todo) < len(examples) and dist.is_main():
            print(f"resuming {run_dir} [{ts.name}]: {len(examples) - len(todo)} of {len(examples)} examples done")
        if not todo:
            continue
        task = get_task(ts.task)
        bar = tqdm(total=len(examples), initial=len(examples) - len(todo), unit="example",
                   desc=f"evaluate {ts.name}" if not single else "evaluate", disable=not cfg.log.progress or not dist.is_main())
        written = len(examples) - len(todo)
        for batch in chunks(todo, int(cfg.eval.batch_queries)):
            # under torchrun each rank evaluates its share of the batch; rank 0 writes the merged part
            rows = dist.map_shards(lambda part: evaluate_batch(engine, tokenizer, task, part, ts.cfg, stats), batch)
            if dist.is_main():
                write_part(parts, rows)
            bar.update(len(batch))
            written += len(batch)
            if preemption.requested_everywhere():      # SIGTERM/SIGUSR1: this part is written; exit 75
                raise preemption.Preempted(run_dir, f"{written} of {len(examples)} examples of {ts.name} in parts/")
        bar.close()
    tp = dist.sum_over_ranks(throughput(stats))
    if not dist.is_main():
        return run_dir

    frames, per_set = [], {}
    for ts in sets:
        df = set_results(parts_dir(run_dir, ts), examples_of[ts.name])
        df.insert(0, "test_set", ts.name)
        frames.append(df)
        per_set[ts.name] = {**summarize(df, controls, int(cfg.eval.bootstrap_samples), int(cfg.seed)),
                            "task": ts.task, "split": str(cfg.eval.split)}
    df = pd.concat(frames, ignore_index=True)
    atomic_write_parquet(run_dir / "results.parquet", df)
    common = {"model": str(cfg.model.name), "label": label, **tp, "wall_s": round(time.time() - t0, 2)}
    # one set: today's top-level summary; several: the total n, and each set under test_sets
    top = per_set[sets[0].name] if single else {"n": len(df)}
    summary = {**top, "task": cfg.task.name, **common, "test_sets": per_set}
    atomic_write_json(run_dir / "summary.json", summary)
    rundir.finish()
    for name, s in per_set.items():
        print(format_table({**s, **common, "task": s["task"] if single else f"{name} ({s['task']})"}, controls))
    print(f"results: {run_dir / 'results.parquet'}")
    return run_dir


def set_results(parts: Path, examples: Sequence[Example]) -> pd.DataFrame:
    """The rows of one test set's examples, in load order."""
    order = {e.id: i for i, e in enumerate(examples)}
    df = read_parts(parts, key="example_id")
    df = df[df.example_id.isin(order)].sort_values("example_id", key=lambda s: s.map(order))
    return df.reset_index(drop=True)
