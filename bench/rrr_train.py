"""`rrr train` steps with a timer around each phase: generation (attempt 1 + reflect + retry + verify),
reference log-probs, and the rest of the update (policy forward + backward + optimizer).

    python -m bench.rrr_train failures=RUN_DIR [model=… engine=hf|vllm queries=8 group=4 …]

It runs `rrr.trainer.run` itself (the loop `rrr train` runs); the timers are wrapped around the trainer's
module functions, so nothing in the loop changes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.common import Timer, emit, parse_args, rrr_overrides, set_threads, summarize_steps


def main() -> None:
    a = parse_args()
    set_threads(a["threads"])
    from rrr import trainer
    from rrr.train_log import generated_tokens
    from rrr.config import compose

    timer, tokens, steps = Timer(), [0], []
    reflect_retry, policy_update, build_reference = trainer.reflect_retry, trainer.policy_update, trainer.build_reference

    def timed_reflect_retry(*args, **kwargs):
        with timer.phase("generation_s"):
            groups = reflect_retry(*args, **kwargs)
        tokens[0] += generated_tokens(groups)
        return groups

    def timed_policy_update(*args, **kwargs):
        with timer.phase("update_s"):
            out = policy_update(*args, **kwargs)
        t = timer.take()
        steps.append({"generation_s": t.get("generation_s", 0.0), "ref_logprobs_s": t.get("ref_s", 0.0),
                      "fwd_bwd_opt_s": t["update_s"] - t.get("ref_s", 0.0), "generated_tokens": tokens[0]})
        tokens[0] = 0
        return out

    def timed_build_reference(cfg, model):
        ref = build_reference(cfg, model)
        return None if ref is None else timer.wrap(ref, "ref_s")

    trainer.reflect_retry, trainer.policy_update = timed_reflect_retry, timed_policy_update
    trainer.build_reference = timed_build_reference
    out = Path(a["out"]) / f"rrr-train-{a['model']}-{a['engine']}"
    cfg = compose([*rrr_overrides(a), f"train.failures={a['failures']}", f"train.steps={a['steps']}",
                   "train.save_every=100000", "train.lr_schedule=constant", "train.warmup_steps=0",
                   f"run_dir={out}"])
    if out.exists():
        import shutil
        shutil.rmtree(out)
    run_dir = trainer.run(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for s, row in zip(steps, rows):
        s["step_s"] = row["step_time_s"]
        s["other_s"] = s["step_s"] - s["generation_s"] - s["ref_logprobs_s"] - s["fwd_bwd_opt_s"]
        s["tokens_per_s"] = s["generated_tokens"] / s["step_s"]
        s["generation_tokens_per_s"] = s["generated_tokens"] / max(s["generation_s"], 1e-9)
        s["reward_mean"] = row["reward_mean"]
        s["seq_len_max"] = row.get("seq_len_max", 0)
    emit({"system": f"rrr ({a['engine']})", "args": a, **summarize_steps(steps)})


if __name__ == "__main__":
    sys.exit(main())
