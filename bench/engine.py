"""Time one evaluation batch (attempt 1, reflection + retry, the three controls) through the engine.

    python -m bench.engine --examples 8 engine.prefix_cache_gb=0      # no prefix cache
    python -m bench.engine --examples 8                               # the default (2 GB)

Runs `rrr.evaluate.evaluate_batch`, the code `rrr evaluate` runs, on the first test examples, and prints
seconds per generation stage, prompt tokens prefilled vs served from the prefix cache, and one JSON
line. Hydra overrides follow the options (default: the demo settings, BFCL simple_python).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rrr.config import compose
from rrr.engines import build_engine
from rrr.evaluate import evaluate_batch
from rrr.models import load_model
from rrr.rollout import RolloutStats
from rrr.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = compose(["experiment=demo", "model=qwen2.5-coder-0.5b", "task=function_calling", *args.overrides])
    model, tokenizer = load_model(cfg.model)
    task, engine, stats = get_task(cfg.task.name), build_engine(cfg, model, tokenizer), RolloutStats()
    examples = task.load(cfg.task, "test", args.examples, int(cfg.seed))
    start = time.perf_counter()
    rows = evaluate_batch(engine, tokenizer, task, examples, cfg, stats)
    total = time.perf_counter() - start
    for segment, seconds in stats.seconds.items():
        print(f"{segment:12s} {seconds:7.1f} s  {stats.samples[segment]:4d} samples  "
              f"{stats.generated_tokens[segment]:6d} tokens")
    result = {"examples": len(rows), "failed_attempt1": sum(not r["attempt1_correct"] for r in rows),
              "threads": args.threads, "total_s": round(total, 1),
              "stages_s": {k: round(v, 1) for k, v in stats.seconds.items()},
              "generated_tokens": sum(stats.generated_tokens.values()), "overrides": args.overrides}
    cache = getattr(engine, "prefix_cache", None)
    if cache is not None:
        result |= {"prompt_tokens_prefilled": cache.miss_tokens, "prompt_tokens_from_cache": cache.hit_tokens}
    result["examples_per_s"] = round(len(rows) / total, 4)
    print("BENCH_JSON " + json.dumps(result))


if __name__ == "__main__":
    main()
