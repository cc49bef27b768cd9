"""Time and memory of one LoRA policy update, apart from model loading.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.train_memory --model qwen2.5-coder-0.5b \
        --tokens 512 --episodes 8 --micro-batch 4

Synthetic episodes: prompt, then a 128-token reflection, then 128 tokens of attempt 2. Peak RSS is read
from /proc/self/status (VmHWM), reset between phases, so the update's peak is not the load's.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from bench.common import rss_gb


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:   # "5": reset VmHWM to the current RSS
        f.write("5")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--tokens", type=int, default=512, help="tokens per episode")
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--reflection", type=int, default=128, help="reflection tokens per episode")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--steps", type=int, default=1, help="updates to run (the last one is reported)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("overrides", nargs="*", help="extra config overrides, e.g. train.logprob_chunk_size=256")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from rrr import trainer
    from rrr.config import compose
    from rrr.episode import Episode, Segment

    cfg = compose([f"model={a.model}", f"train.gradient_checkpointing={str(a.gradient_checkpointing).lower()}",
                   f"train.micro_batch_size={a.micro_batch}",
                   f"train.sampling.reflection.max_tokens={a.reflection}", *a.overrides])
    torch.manual_seed(0)                            # LoRA A init: the same gradient from run to run
    t0 = time.time()
    model, tokenizer = trainer.build_policy(cfg)
    reference = trainer.build_reference(cfg, model)
    optimizer, _ = trainer.build_optimizer(cfg, model)
    load_s, load_peak, after_load = time.time() - t0, rss_gb("VmHWM"), rss_gb()

    g = torch.Generator().manual_seed(0)
    T, R = a.tokens, a.reflection
    segments = [int(Segment.PROMPT)] * (T - 2 * R) + [int(Segment.REFLECTION)] * R + [int(Segment.ATTEMPT2)] * R
    episodes = [Episode(example_id=str(i), group_index=0, sample_index=i,
                        token_ids=torch.randint(100, 5000, (T,), generator=g).tolist(), segment_ids=segments,
                        sampler_logprobs=[0.0] * T, truncated={"reflection": False})
                for i in range(a.episodes)]
    advantages = torch.randn(a.episodes, generator=g)

    for _ in range(a.steps):
        reset_peak()
        t0 = time.time()
        stats = trainer.policy_update(cfg, model, reference, optimizer, tokenizer, episodes, advantages)
        update_s = time.time() - t0
    result = {"model": a.model, "tokens": T, "episodes": a.episodes, "micro_batch": a.micro_batch,
              "gradient_checkpointing": a.gradient_checkpointing, "overrides": a.overrides,
              "load_s": round(load_s, 1), "load_peak_rss_gb": round(load_peak, 2),
              "rss_after_load_gb": round(after_load, 2), "update_s": round(update_s, 1),
              "update_peak_rss_gb": round(rss_gb("VmHWM"), 2), "rss_after_update_gb": round(rss_gb(), 2),
              "process_peak_rss_gb": round(max(load_peak, rss_gb("VmHWM")), 2),   # clear_refs resets ru_maxrss too
              "loss": stats["loss"], "grad_norm": stats["grad_norm"]}
    print("BENCH_JSON " + json.dumps(result))


if __name__ == "__main__":
    main()
