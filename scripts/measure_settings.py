"""Signal per second of CPU: which training settings give updates that carry gradient, and how fast?

    python scripts/measure_settings.py FAILURES_RUN_DIR --steps S [--out FILE.jsonl] \\
        --setting NAME 'override override ...' [--setting NAME '...' ...]
    python scripts/measure_settings.py --table FILE.jsonl      # the markdown table of earlier runs

Runs the trainer's own step (rrr.trainer: failure filter, cursor, stored attempt 1, reflect + retry,
`train.zero_std` handling, policy update) for S steps per setting, on one collect-failures run of the
TRAINING split, with `experiment=demo` under each setting's overrides. The update's forward and
backward run for real (their time is measured), but the optimizer's learning rate is 0, so every
setting starts from the same initial policy and the settings can be compared in any order; the prefix
KV cache is emptied between settings. One model load serves every setting of a call.

Per setting it reports: mixed groups (0 < successes < G: the only groups with a GRPO advantage) at the
first draw and after dynamic sampling, truncated reflections (a truncated reflection gets no
gradient), steps whose update had a non-zero gradient, and seconds per update carrying gradient
(all step seconds / steps with grad norm > 0). Timings depend on what else runs on the machine:
compare settings measured in one sitting only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from rrr import grpo
from rrr import trainer as tr
from rrr.train_log import rollout_stats
from rrr.config import compose
from rrr.engines import build_engine
from rrr.rollout import sampling_from_cfg
from rrr.tasks import get_task

# the settings a call may change without reloading the model (LoRA shape and checkpointing are fixed)
FIXED = ("model.", "train.gradient_checkpointing", "train.finetune")


def measure(cfg, model, reference, tokenizer, engine, steps: int, episodes_out: Path | None = None) -> dict:
    """S trainer steps under `cfg` at lr 0; per-step rows and totals."""
    t = cfg.train
    examples, stored = tr.load_failure_set(t.failures, t.min_pass_rate, t.max_pass_rate, cfg.task.name)
    optimizer, _ = tr.build_optimizer(cfg, model)
    task = get_task(cfg.task.name)
    ctx = tr.Rollouts(engine, tokenizer, task, cfg.prompts, sampling_from_cfg(t.sampling), int(cfg.seed),
                      int(t.group_size), t.leak)
    cursor = tr.FailureCursor(n=len(examples), seed=int(cfg.seed))
    engine.load_weights(model)                               # empties the prefix cache: no carry-over
    rows = []
    for step in range(1, steps + 1):
        t0 = time.time()
        batch = cursor.draw(int(t.batch_queries))
        queries, ctx = [examples[i] for i in batch], ctx.for_step()
        attempts1, _ = tr.first_attempts(ctx, t.attempt1, queries, [stored[i] for i in batch], step)
        groups = tr.reflect_retry(ctx, queries, attempts1, step)
        rewards = tr.group_scores(ctx, queries, groups)
        mixed_first = int((~grpo.zero_std_groups(rewards)).sum())
        if t.zero_std == "resample":
            groups, rewards = tr.resample_zero_std(ctx, queries, attempts1, step, groups, rewards,
                                                   int(t.resample_tries))
        mixed = ~grpo.zero_std_groups(rewards)
        keep = mixed if t.zero_std in ("skip", "resample") else torch.ones(len(groups), dtype=torch.bool)
        gen_s = time.time() - t0
        advantages = grpo.group_advantages(rewards, t.scale_rewards)
        trained, trained_advantages = tr.training_batch(groups, rewards, advantages, keep)
        update = tr.policy_update(cfg, model, reference, optimizer, tokenizer, trained, trained_advantages)
        stats = rollout_stats(groups, rewards)
        rows.append({"step": step, "queries": [q.id for q in queries], "groups": len(groups),
                     "mixed_first_draw": mixed_first, "mixed": int(mixed.sum()),
                     "reward_mean": stats["reward_mean"], "truncated_reflection": stats["truncated_reflection"],
                     "reflection_len_mean": stats["reflection_len_mean"], "episodes_trained": len(trained),
                     "grad_norm": update["grad_norm"], "gen_s": round(gen_s, 1),
                     "update_s": round(time.time() - t0 - gen_s, 1), "step_s": round(time.time() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
        if episodes_out is not None:                          # texts, to see why groups fail or truncate
            with episodes_out.open("a") as f:
                for g in groups:
                    for ep in g:
                        f.write(json.dumps({"step": step, "query": ep.example_id, "reward": ep.reward,
                                            "reflection_truncated": bool(ep.truncated.get("reflection")),
                                            "reflection": ep.texts.get("reflection", ""),
                                            "attempt2": ep.texts.get("attempt2", "")}) + "\n")
    groups = sum(r["groups"] for r in rows)
    with_grad = sum(r["grad_norm"] > 0 for r in rows)
    seconds = sum(r["step_s"] for r in rows)
    return {"failure_queries": len(examples), "steps": steps, "groups": groups,
            "mixed_first_draw": sum(r["mixed_first_draw"] for r in rows), "mixed": sum(r["mixed"] for r in rows),
            "truncated_reflection": sum(r["truncated_reflection"] * r["groups"] for r in rows) / max(groups, 1),
            "steps_with_grad": with_grad, "seconds": round(seconds, 1),
            "gen_s": round(sum(r["gen_s"] for r in rows), 1), "update_s": round(sum(r["update_s"] for r in rows), 1),
            "s_per_grad_update": round(seconds / with_grad, 1) if with_grad else None, "rows": rows}


def hydra_quoted(override: str) -> str:
    """key=value with the value quoted for Hydra's override grammar when it holds spaces or punctuation
    (shlex has already removed the shell's quotes)."""
    key, sep, value = override.partition("=")
    if not sep or value.replace(".", "").replace("-", "").replace("_", "").isalnum() or value == "":
        return override
    return f"{key}='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def table(path: Path) -> str:
    lines = ["| setting | overrides | queries in filter | mixed groups, 1st draw | mixed groups, after resample "
             "| truncated reflections | updates with gradient | s / step | s / update with gradient |",
             "|---|---|---|---|---|---|---|---|---|"]
    for line in path.read_text().splitlines():
        r = json.loads(line)
        g = r["groups"]
        lines.append(f"| {r['name']} | `{' '.join(r['overrides'])}` | {r['failure_queries']} "
                     f"| {r['mixed_first_draw']}/{g} | {r['mixed']}/{g} | {100 * r['truncated_reflection']:.0f}% "
                     f"| {r['steps_with_grad']}/{r['steps']} | {r['seconds'] / r['steps']:.0f} "
                     f"| {r['s_per_grad_update'] if r['s_per_grad_update'] is not None else '∞ (none)'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("failures", nargs="?")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--setting", nargs=2, action="append", metavar=("NAME", "OVERRIDES"), default=[])
    ap.add_argument("--out", type=Path, default=Path("outputs/measure_settings.jsonl"))
    ap.add_argument("--table", type=Path)
    ap.add_argument("--episodes", type=Path, help="append every trained group's texts and rewards here (JSONL)")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    if not args.failures or not args.setting:
        ap.error("give FAILURES_RUN_DIR and at least one --setting NAME 'overrides'")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    run_cfg = OmegaConf.load(f"{args.failures}/config.yaml")
    base = ["experiment=demo", f"task={run_cfg.task.name}", f"model={run_cfg.model.name}",
            f"train.failures={args.failures}", "train.lr=0.0"]
    settings = [(name, [hydra_quoted(o) for o in shlex.split(ov)]) for name, ov in args.setting]
    for name, ov in settings:
        if any(o.startswith(FIXED) for o in ov):
            raise SystemExit(f"setting {name}: {', '.join(FIXED)} are fixed within one call (one model load)")
    cfg0 = compose(base + settings[0][1])
    model, tokenizer = tr.build_policy(cfg0)
    reference = tr.build_reference(cfg0, model)
    engine = build_engine(cfg0, model, tokenizer)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, ov in settings:
        print(f"=== {name}: {' '.join(ov)}", flush=True)
        result = measure(compose(base + ov), model, reference, tokenizer, engine, args.steps, args.episodes)
        with args.out.open("a") as f:
            f.write(json.dumps({"name": name, "overrides": ov, **result}) + "\n")
        print(table(args.out))


if __name__ == "__main__":
    main()
