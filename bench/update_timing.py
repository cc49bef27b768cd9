"""The update alone, shared prefix vs per episode, on the demo's workload: seconds per `policy_update`
(policy forward + backward + reference + optimizer step) on the same batch, the two paths alternating.

    python -m bench.update_timing [--reps 3] [--model qwen2.5-coder-0.5b] [--reflections 62,82,96,22 36,42,40,22] [overrides...]

The batch is scripts/prefix_tokens.py's demo-like one (BFCL live_simple prompts, the demo's prompts and
budgets, issue 20's step-1 reflection lengths) on the demo's model (Qwen2.5-Coder-0.5B-Instruct, LoRA
r = 16, gradient checkpointing, β = 0.001: the reference runs too), with fixed non-zero advantages and
lr = 0, so every repetition computes the same thing. One warm-up call per path, then `--reps` timed calls
per path in alternating order (shared first in odd rounds, per-episode first in even ones). Prints one
JSON line: median and min/max seconds per path, their ratio, and the tokens each sends through the backbone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def demo_episodes(tokenizer, cfg, lengths):
    spec = importlib.util.spec_from_file_location("prefix_tokens", ROOT / "scripts" / "prefix_tokens.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.episodes(tokenizer, cfg, lengths)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--reflections", nargs="+", default=["62,82,96,22", "36,42,40,22"])
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args()
    torch.set_num_threads(a.threads)
    from rrr import trainer
    from rrr.config import compose
    from rrr.train_setup import build_optimizer, build_policy, build_reference

    base = ["experiment=demo", "task=function_calling", f"model={a.model}", "train.lr=1e-30",
            "train.warmup_steps=0", "train.lr_schedule=constant", *a.overrides]
    cfgs = {shared: compose([*base, f"train.shared_prefix={str(shared).lower()}"]) for shared in (True, False)}
    model, tokenizer = build_policy(cfgs[True])
    references = {s: build_reference(cfgs[s], model) for s in cfgs}   # the reference follows the path too
    optimizer, _ = build_optimizer(cfgs[True], model)
    lengths = [[int(x) for x in r.split(",")] for r in a.reflections]
    episodes = demo_episodes(tokenizer, cfgs[True], lengths)
    advantages = torch.tensor([(-1.0) ** i * (1 + i % 3) / 3 for i in range(len(episodes))])
    times: dict[bool, list[float]] = {True: [], False: []}
    stats: dict[bool, dict] = {}
    for rnd in range(a.reps + 1):                       # round 0 is the warm-up of both paths
        for shared in ((True, False) if rnd % 2 else (False, True)):
            t0 = time.perf_counter()
            stats[shared] = trainer.policy_update(cfgs[shared], model, references[shared], optimizer, tokenizer,
                                                  episodes, advantages)
            if rnd:
                times[shared].append(time.perf_counter() - t0)
            print(f"round {rnd} shared={shared}: {time.perf_counter() - t0:.1f} s", flush=True)
    med = {s: statistics.median(t) for s, t in times.items()}
    print(json.dumps({
        "episodes": len(episodes), "reps": a.reps, "threads": a.threads,
        "shared_s": {"median": med[True], "min": min(times[True]), "max": max(times[True])},
        "per_episode_s": {"median": med[False], "min": min(times[False]), "max": max(times[False])},
        "shared_over_per_episode": med[True] / med[False],
        "backbone_tokens_shared": stats[True].get("update/backbone_tokens"),
        "backbone_tokens_per_episode": stats[False].get("update/backbone_tokens"),
        "loss_shared": stats[True]["loss"], "loss_per_episode": stats[False]["loss"]}))


if __name__ == "__main__":
    main()
