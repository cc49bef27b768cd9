"""Time the stages of one evaluation batch (attempt 1, reflect, retry, each control) through the engine.

    python scripts/bench_engine.py --examples 8 engine.prefix_cache_gb=0      # no prefix cache
    python scripts/bench_engine.py --examples 8 engine.prefix_cache_gb=2      # the default

Prints seconds per stage, prompt tokens prefilled vs served from the prefix cache, and one JSON line.
Hydra overrides after the options (default: the demo settings on qwen2.5-coder-0.5b, BFCL simple_python).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rrr.config import compose
from rrr.engines import build_engine
from rrr.evaluate import REFLECTION_MODE, segment_sampling
from rrr.models import load_model
from rrr.rollout import reflect_retry, sample_attempts
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
    task, engine, sampling = get_task(cfg.task.name), build_engine(cfg, model, tokenizer), segment_sampling(cfg)
    examples = task.load(cfg.task, "test", args.examples, int(cfg.seed))
    cache = getattr(engine, "prefix_cache", None)
    times: dict[str, float] = {}

    def timed(name, fn):
        start = time.perf_counter()
        out = fn()
        times[name] = round(time.perf_counter() - start, 1)
        print(f"{name:22s} {times[name]:7.1f} s")
        return out

    first = timed("attempt1", lambda: [a[0] for a in sample_attempts(
        engine, tokenizer, task, examples, cfg.prompts, sampling["attempt1"], n=1, seed=0, step=0)])
    # every example goes through reflect/retry and the controls, failed or not: a fixed workload
    samples, verdicts = [a.sample for a in first], [a.verdict for a in first]
    timed("reflect+retry", lambda: reflect_retry(engine, tokenizer, task, examples, samples, cfg.prompts,
                                                 sampling, group_size=1, seed=0, step=0, verdicts1=verdicts))
    timed("best_of_2", lambda: sample_attempts(engine, tokenizer, task, examples, cfg.prompts,
                                               sampling["attempt1"], n=1, seed=0, step=0, segment="best_of_2"))
    for control in ("retry_no_reflection", "generic_reflection"):
        timed(control, lambda: reflect_retry(engine, tokenizer, task, examples, samples, cfg.prompts, sampling,
                                             group_size=1, seed=0, step=0, verdicts1=verdicts,
                                             reflection_mode=REFLECTION_MODE[control]))
    result = {"examples": args.examples, "threads": args.threads, "total_s": round(sum(times.values()), 1),
              "stages_s": times, "overrides": args.overrides}
    if cache is not None:
        result |= {"prompt_tokens_prefilled": cache.miss_tokens, "prompt_tokens_from_cache": cache.hit_tokens}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
