"""`rrr collect-failures`: the paper's "dataset of failures" (paper.md §1.4).

Sample every training query k times (paper: up to 64), verify every sample, and keep the queries the
model fails at least once, with up to `collect.keep_attempts` failed attempts stored as the exact sampled
token ids (the trainer replays attempt 1 token-in/token-out). The paper does not say whether "failed"
means any sample or all of them, so we keep any failure and store the pass rate; `train.min_pass_rate` /
`train.max_pass_rate` filter further.

Crash safety: queries run in chunks of `collect.batch_queries`; each finished chunk is written atomically
to `parts/part_NNNNN.parquet` (every query, solved or not, so a resume knows it is done). Re-running with
`run_dir=...` skips the ids already in `parts/`; `failures.parquet` is rebuilt from the parts at the end.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from rrr import distributed as dist
from rrr import preemption
from rrr.config import UserError
from rrr.atomic import atomic_write_json, atomic_write_parquet
from rrr.engines import build_generator
from rrr.model_info import model_provenance
from rrr.parts import chunks, done_ids, read_parts, write_part
from rrr.provenance import data_sha256, examples_sha256
from rrr.rollout import sampling_params, throughput
from rrr.run_dir import RunDir, read_manifest
from rrr.validate import check as check_settings, check_at_least_one
from rrr.tasks import Example, excluded_ids, get_task
from rrr.verifiers import VERIFIER_VERSION

COMMAND = "collect-failures"
SEGMENT = "attempt1"   # collected samples are attempt-1 samples: same seed stream as online attempt 1
STEP = 0


# ----------------------------------------------------------------------------- provenance

def fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """What must not change when a collection is resumed (data.limit may grow: that only adds queries)."""
    return {
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "prompts": OmegaConf.to_container(cfg.prompts, resolve=True),
        "split": cfg.data.split,
        "seed": int(cfg.seed),
        "samples_per_query": int(cfg.collect.samples_per_query),
        "keep_attempts": int(cfg.collect.keep_attempts),
        "sampling": sampling_params(cfg.collect).__dict__,
        "verifier_version": VERIFIER_VERSION,
    }


# ----------------------------------------------------------------------------- one query's row

def query_row(example: Example, attempts: Sequence[Any], prompt_token_ids: Sequence[int],
              keep: int) -> dict[str, Any]:
    """One row per query: counts, pass rate, and the first `keep` failed attempts (sample order).

    An attempt the verifier could not score (rollout's UNSCORABLE verdict) is neither a pass nor a
    failure: it is counted apart and left out of the pass rate and the stored failures."""
    from rrr.rollout import UNSCORABLE

    scored = [a for a in attempts if a.verdict is not UNSCORABLE]
    failed = [a for a in scored if not a.verdict.correct][:keep]
    n_correct = sum(bool(a.verdict.correct) for a in scored)
    return {
        **example.to_row(),
        "n_samples": len(scored),
        "n_correct": n_correct,
        "n_unscorable": len(attempts) - len(scored),
        "pass_rate": n_correct / len(scored) if scored else float("nan"),
        "failed_texts": [a.text for a in failed],
        "failed_token_ids": [list(map(int, a.sample.token_ids)) for a in failed],
        "failed_reasons": [a.verdict.reason for a in failed],
        "failed_truncated": [bool(a.sample.truncated) for a in failed],
        "prompt_token_ids": list(map(int, prompt_token_ids)),
    }


def summarize(df: pd.DataFrame) -> dict[str, Any]:
    """pass@1 estimate = mean per-query pass rate (unbiased for one sample at the collect temperature).
    Shares are over the queries with at least one scored sample."""
    scored = df[df.n_samples > 0]
    return {
        "queries": len(df),
        "samples": int(df.n_samples.sum()),
        "unscorable": int(df.n_unscorable.sum()),
        "pass_at_1": float(scored.pass_rate.mean()),
        "never_solved": float((scored.n_correct == 0).mean()),
        "always_solved": float((scored.n_correct == scored.n_samples).mean()),
        "kept": int((df.n_correct < df.n_samples).sum()),
    }


def format_summary(s: dict[str, Any]) -> str:
    return (f"queries {s['queries']}  samples {s['samples']}  pass@1 {s['pass_at_1']:.3f}  "
            f"never solved {s['never_solved']:.1%}  always solved {s['always_solved']:.1%}  "
            f"kept (>=1 failure) {s['kept']}  unscorable samples {s['unscorable']}  "
            f"generated {s['generated_tokens']} tokens ({s['tokens_per_s']} tokens/s)")


# ----------------------------------------------------------------------------- pipeline

def collect_chunk(engine: Any, tokenizer: Any, task: Any, examples: Sequence[Example], cfg: DictConfig,
                  stats: Any) -> list[dict[str, Any]]:
    """Sample k attempts per query, verify them (inside rollout), and build one row per query."""
    from rrr.rollout import prompt_ids, sample_attempts

    c = cfg.collect
    attempts = sample_attempts(engine, tokenizer, task, list(examples), cfg.prompts, sampling_params(c),
                               n=int(c.samples_per_query), seed=int(cfg.seed), step=STEP, segment=SEGMENT,
                               stats=stats)
    return [query_row(ex, atts, prompt_ids(tokenizer, task, ex, cfg.prompts), int(c.keep_attempts))
            for ex, atts in zip(examples, attempts)]


def validate(cfg: DictConfig) -> None:
    c = cfg.collect
    check_at_least_one(c.samples_per_query, "collect.samples_per_query", "paper: up to 64")
    check_at_least_one(c.keep_attempts, "collect.keep_attempts", "the trainer needs a failed attempt per query")
    check_at_least_one(c.batch_queries, "collect.batch_queries")


def run(cfg: DictConfig) -> Path:
    from tqdm.auto import tqdm

    from rrr.rollout import RolloutStats

    validate(cfg)
    check_settings(cfg, COMMAND)
    t0 = time.time()
    task = get_task(cfg.task.name)
    examples = task.load(cfg.task, cfg.data.split, cfg.data.limit, int(cfg.seed))
    if not examples:
        raise UserError(f"no {cfg.task.name} examples in split {cfg.data.split!r}; check data.split / data.limit")
    rundir = RunDir.open(cfg, COMMAND, fingerprint(cfg))   # named by rank 0, locked before its parts are read
    run_dir, parts = rundir.path, rundir.path / "parts"
    done = dist.from_main(lambda: done_ids(parts))     # every rank: the same work list
    todo = [e for e in examples if e.id not in done]
    engine, tokenizer = build_generator(cfg) if todo else (None, None)
    # only now, with valid inputs and a loaded model, does the run dir get its config and manifest
    rundir.claim()
    rundir.write_run_files(cfg, extra={
        "task": cfg.task.name,
        "model": model_provenance(cfg.model),
        "engine": OmegaConf.to_container(cfg.engine, resolve=True),
        "sampling": sampling_params(cfg.collect).__dict__,
        "samples_per_query": int(cfg.collect.samples_per_query),
        "seeds": {"run_seed": int(cfg.seed), "step": STEP, "segment": SEGMENT,
                  "derivation": "derive_seed(run_seed, step, example_id, sample_index, segment)"},
        "verifier_version": VERIFIER_VERSION,
        "split": cfg.data.split,
        "examples": len(examples),
        "excluded_examples": excluded_ids(task, cfg.task, cfg.data.split),
        "examples_sha256": examples_sha256(examples),
        "data_sha256": data_sha256(examples),
    })

    if done and dist.is_main():
        print(f"resuming {run_dir}: {len(examples) - len(todo)} of {len(examples)} queries already done")
    stats = RolloutStats()
    if todo:
        bar = tqdm(total=len(examples), initial=len(examples) - len(todo), unit="query",
                   desc="collect-failures", disable=not cfg.log.progress or not dist.is_main())
        written = len(examples) - len(todo)
        for chunk in chunks(todo, int(cfg.collect.batch_queries)):
            # under torchrun each rank samples its share of the chunk; rank 0 writes the merged part
            rows = dist.map_shards(lambda part: collect_chunk(engine, tokenizer, task, part, cfg, stats), chunk)
            if dist.is_main():
                write_part(parts, rows)
            bar.update(len(chunk))
            written += len(chunk)
            if written < len(examples) and preemption.requested_everywhere():   # SIGTERM/SIGUSR1: exit 75
                raise preemption.Preempted(run_dir, f"{written} of {len(examples)} queries written to parts/")
        bar.close()
    tp = dist.sum_over_ranks(throughput(stats))
    if not dist.is_main():
        return run_dir

    df = read_parts(parts)
    df = df[df.id.isin({e.id for e in examples})].reset_index(drop=True)  # a resumed run may use a smaller limit
    atomic_write_parquet(run_dir / "failures.parquet",
                         df[df.n_correct < df.n_samples].reset_index(drop=True))
    atomic_write_parquet(run_dir / "all_queries.parquet",
                         df[["id", "source", "n_samples", "n_correct", "pass_rate"]])
    summary = {**summarize(df), **tp, "wall_s": round(time.time() - t0, 2)}
    atomic_write_json(run_dir / "summary.json", summary)
    rundir.finish(summary=summary)
    print(format_summary(summary))
    print(f"failures: {run_dir / 'failures.parquet'}")
    return run_dir


# ----------------------------------------------------------------------------- for the trainer

def _ints(x: Any) -> list[int]:
    return [int(v) for v in x]


def load_failures(run_dir: str | Path) -> tuple[list[Example], list[dict[str, Any]]]:
    """The failure set of a collect-failures run: Examples, and per example its stored failed attempts
    {"token_ids", "texts", "reasons", "truncated", "pass_rate", "n_samples", "n_correct",
    "prompt_token_ids"}, in the order of failures.parquet."""
    path = Path(run_dir) / "failures.parquet"
    manifest = read_manifest(Path(run_dir))
    if manifest is not None and manifest.get("command") not in (None, COMMAND):
        raise UserError(f"{run_dir} is a {manifest.get('command')!r} run, not a {COMMAND} run; pass "
                        f"train.failures=<the run dir of rrr {COMMAND}>")
    if not path.exists():
        hint = ("the collection did not finish: re-run rrr collect-failures with run_dir=" + str(run_dir)
                if (Path(run_dir) / "parts").exists() else "run rrr collect-failures first and pass its run dir")
        raise UserError(f"no failures.parquet in {run_dir}; {hint}")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 — pyarrow raises several types for a damaged file
        raise UserError(f"{path} is unreadable ({type(e).__name__}); re-run rrr collect-failures with "
                        f"run_dir={run_dir} (it rebuilds failures.parquet from parts/)") from None
    missing = sorted(set(FAILURE_COLUMNS) - set(df.columns))
    if missing:
        raise UserError(f"{path} is not a failure set (missing columns {missing[:4]}); pass the run dir of "
                        f"rrr {COMMAND}")
    examples, attempts = [], []
    try:
        for row in df.to_dict("records"):
            examples.append(Example.from_row(row))
            attempts.append({
                "token_ids": [_ints(t) for t in row["failed_token_ids"]],
                "texts": [str(t) for t in row["failed_texts"]],
                "reasons": [str(r) for r in row["failed_reasons"]],
                "truncated": [bool(t) for t in row["failed_truncated"]],
                "pass_rate": float(row["pass_rate"]),
                "n_samples": int(row["n_samples"]),
                "n_correct": int(row["n_correct"]),
                "prompt_token_ids": _ints(row["prompt_token_ids"]),
            })
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"{path} has malformed rows ({type(e).__name__}: {e}); re-run rrr collect-failures") from None
    return examples, attempts


FAILURE_COLUMNS = ("id", "task", "source", "fields", "failed_token_ids", "failed_texts", "failed_reasons",
                   "failed_truncated", "pass_rate", "n_samples", "n_correct", "prompt_token_ids")
