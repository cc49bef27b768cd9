"""engine=vllm vs engine=hf on one train-step rollout, with start-up and weight-sync times.

    VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 .venv-vllm/bin/python scripts/bench_vllm.py \
        engine=vllm engine.lora_sync=merged        # or engine.lora_sync=adapter, or engine=hf

The rollout is the trainer's online step (attempt 1, G reflections per failed attempt, one retry each)
on `--queries` Countdown training queries, policy = SmolLM2-135M + a LoRA adapter whose B matrices are
random (so merged ≠ base and every sync moves real weights). It runs twice around `--syncs` weight
syncs; tok/s counts generated tokens of the second rollout. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    import torch

    from rrr import rollout
    from rrr.config import compose
    from rrr.engines import SamplingParams, build_engine
    from rrr.episode import Segment
    from rrr.models import apply_lora, load_model
    from rrr.tasks import get_task

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--syncs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vllm = ["engine.enforce_eager=true", "engine.gpu_memory_utilization=0.1"] if "engine=vllm" in args.overrides else []
    cfg = compose(["task=countdown", "model=smollm2-135m", "model.device=cpu", "model.dtype=float32",
                   "model.max_context=2048", *vllm, *args.overrides])
    torch.manual_seed(0)
    model, tokenizer = load_model(cfg.model, for_training=True)
    model = apply_lora(model, cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    t0 = time.perf_counter()
    engine = build_engine(cfg, model, tokenizer)
    startup = time.perf_counter() - t0
    task = get_task("countdown")
    queries = task.load(cfg.task, "train", args.queries, 0)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=1.0)
    stages = {"attempt1": sampling, "reflection": sampling, "attempt2": sampling}

    def step_rollout(step: int) -> tuple[int, float]:
        t = time.perf_counter()
        attempts = [a[0] for a in rollout.sample_attempts(engine, tokenizer, task, queries, cfg.prompts,
                                                          sampling, n=1, seed=0, step=step)]
        groups = rollout.reflect_retry(engine, tokenizer, task, queries, [a.sample for a in attempts],
                                       cfg.prompts, stages, group_size=args.group, seed=0, step=step)
        tokens = sum(len(a.sample.token_ids) for a in attempts) + sum(
            sum(1 for s in ep.segment_ids if s in (Segment.REFLECTION, Segment.ATTEMPT2)) for g in groups for ep in g)
        return tokens, time.perf_counter() - t

    first = step_rollout(1)
    syncs = []
    for _ in range(args.syncs):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn_like(p) * 1e-4)
        t = time.perf_counter()
        engine.load_weights(model)
        syncs.append(time.perf_counter() - t)
    tokens, seconds = step_rollout(2)
    print(json.dumps({"engine": cfg.engine.name, "lora_sync": cfg.engine.get("lora_sync"),
                      "startup_s": round(startup, 1), "first_rollout_tok_per_s": round(first[0] / first[1], 1),
                      "rollout_tokens": tokens, "rollout_s": round(seconds, 1),
                      "rollout_tok_per_s": round(tokens / seconds, 1),
                      "sync_s": [round(s, 2) for s in syncs]}), flush=True)


if __name__ == "__main__":      # vLLM starts its engine core with spawn
    main()
