"""collect-failures samples/s and evaluate examples/s, in one process (one model load).

    python -m bench.throughput model=… [queries=4 attempt1_tokens=64 …]

Runs `rrr collect-failures` (rrr.failures.run) on the first `collect_queries` (default: `queries`)
training queries with `samples` samples each — its run dir is the failure set the train-step benches
use, trimmed to `queries` failed queries by bench.run — and then
`rrr.evaluate.evaluate_batch` (what `rrr evaluate` runs: attempt 1, reflection + retry and the three
controls for the failures) on `queries` test examples. Only the generation calls are timed.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from bench.common import DEFAULTS, Timer, emit, parse_args, rrr_overrides, set_threads


def main() -> None:
    a = parse_args(defaults={**DEFAULTS, "samples": 2, "collect_queries": 0})
    collect_queries = a["collect_queries"] or a["queries"]
    set_threads(a["threads"])
    from rrr import failures
    from rrr.config import compose
    from rrr.evaluate import evaluate_batch
    from rrr.rollout import RolloutStats
    from rrr.tasks import get_task

    timer, collected = Timer(), {"samples": 0}
    chunk = failures.collect_chunk

    def timed_chunk(engine, tokenizer, task, examples, cfg, stats):
        with timer.phase("collect_s"):
            rows = chunk(engine, tokenizer, task, examples, cfg, stats)
        collected["samples"] += len(examples) * int(cfg.collect.samples_per_query)
        collected["engine"] = (engine, tokenizer)
        return rows

    failures.collect_chunk = timed_chunk
    run_dir = Path(a["out"]) / f"failures-{a['task']}-{a['model']}"
    shutil.rmtree(run_dir, ignore_errors=True)
    budgets = [f"eval.sampling.{s}.max_tokens={a[k]}" for s, k in
               (("attempt1", "attempt1_tokens"), ("reflection", "reflection_tokens"), ("attempt2", "retry_tokens"))]
    cfg = compose([*rrr_overrides(a), "data.split=train", f"data.limit={collect_queries}", f"collect.samples_per_query={a['samples']}",
                   f"collect.keep_attempts={a['samples']}", f"collect.max_tokens={a['attempt1_tokens']}",
                   f"collect.batch_queries={min(collect_queries, 8)}", f"run_dir={run_dir}", *budgets,
                   f"eval.batch_queries={a['queries']}"])
    failures.run(cfg)
    collect_s = timer.take()["collect_s"]

    engine, tokenizer = collected["engine"]
    task = get_task(cfg.task.name)
    examples = task.load(cfg.task, "test", a["queries"], int(cfg.seed))
    stats = RolloutStats()
    t0 = time.perf_counter()
    rows = evaluate_batch(engine, tokenizer, task, examples, cfg, stats)
    eval_s = time.perf_counter() - t0
    emit({"bench": "throughput", "args": a, "failures": str(run_dir),
          "collect": {"samples": collected["samples"], "seconds": collect_s,
                      "samples_per_s": collected["samples"] / collect_s},
          "evaluate": {"examples": len(rows), "seconds": eval_s, "examples_per_s": len(rows) / eval_s,
                       "generated_tokens": sum(stats.generated_tokens.values()),
                       "stages_s": {k: round(v, 2) for k, v in stats.seconds.items()}}})


if __name__ == "__main__":
    sys.exit(main())
