"""`rrr train` steps with a timer around each phase: generation (reflect + retry + verify), the update
(reference log-probs, policy forward + backward + optimizer) and the rest of the step.

    python -m bench.rrr_train failures=RUN_DIR [model=… engine=hf|vllm queries=8 group=4 …]
                              [rrr_args="train.shared_prefix=false"]

It runs `rrr.trainer.run` itself (the loop `rrr train` runs); the timers wrap the loop's module-level
functions wherever a loaded rrr module holds them (so the trainer split into modules changes nothing),
and nothing in the loop changes. Per step it records the sampled tokens (reflections + retries), the
share of truncated reflections, the longest episode (`seq_len_max`) and the longest update row
(`update_len_max`, up to the last token of a reflection that ended: what the backbone runs; truncated
reflections carry no loss), and the engine config.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench.common import Timer, emit, model_dtype, parse_args, rrr_overrides, set_threads, summarize_steps


def main() -> None:
    a = parse_args()
    set_threads(a["threads"])
    from rrr import trainer
    from rrr.config import compose

    timer, steps, pending = Timer(), [], {}

    def timed_reflect_retry(original):
        def reflect_retry(*args, **kwargs):
            with timer.phase("generation_s"):
                groups = original(*args, **kwargs)
            pending.setdefault("groups", []).extend(groups)
            return groups
        return reflect_retry

    def timed_policy_update(original):
        def policy_update(*args, **kwargs):
            with timer.phase("update_s"):
                out = original(*args, **kwargs)
            steps.append(step_record(timer.take(), pending.pop("groups", [])))
            return out
        return policy_update

    def timed_build_reference(original):
        def build_reference(cfg, model):
            ref = original(cfg, model)
            return None if ref is None else timer.wrap(ref, "ref_s")
        return build_reference

    patch("reflect_retry", timed_reflect_retry)
    patch("policy_update", timed_policy_update)
    patch("build_reference", timed_build_reference)
    out = Path(a["out"]) / f"rrr-train-{a['task']}-{a['model']}-{a['engine']}"
    cfg = compose([*rrr_overrides(a), f"train.failures={a['failures']}", f"train.steps={a['steps']}",
                   "train.save_every=100000", "train.lr_schedule=constant", "train.warmup_steps=0",
                   f"run_dir={out}"])
    if out.exists():
        import shutil
        shutil.rmtree(out)
    run_dir = trainer.run(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for s, row in zip(steps, rows):
        finish_record(s, row)
    emit({"system": f"rrr ({a['engine']})", "args": a, "engine_config": engine_config(cfg),
          **summarize_steps(steps)})


def patch(name: str, wrap: Callable[[Callable], Callable]) -> None:
    """Replace the function `name` of the training loop by `wrap(original)` in every loaded rrr module
    that holds that very function (trainer.py, or the modules it is split into)."""
    import rrr.trainer  # noqa: F401  (loads the loop and the modules it imports)

    modules = [m for n, m in sorted(sys.modules.items()) if n == "rrr" or n.startswith("rrr.")]
    homes = ("rrr.trainer", "rrr.train_setup", "rrr.train_log", "rrr.failure_set")
    original = next((getattr(sys.modules[h], name) for h in homes if h in sys.modules
                     and callable(getattr(sys.modules[h], name, None))), None)
    if original is None:
        raise SystemExit(f"error: bench.rrr_train: no {name} in {', '.join(homes)}; update the bench")
    replacement = wrap(original)
    for m in modules:
        if getattr(m, name, None) is original:
            setattr(m, name, replacement)


def step_record(seconds: dict[str, float], groups: Sequence[Sequence[Any]]) -> dict[str, float]:
    """One step's phases (from the Timer) and workload (from its [Q][G] episodes)."""
    from rrr.episode import Segment

    episodes = [ep for g in groups for ep in g]
    segs = [np.asarray(ep.segment_ids) for ep in episodes]
    # the update runs each row up to its last loss token: reflections that ended, not truncated ones
    trained = [np.flatnonzero(s == Segment.REFLECTION) for s, ep in zip(segs, episodes)
               if not ep.truncated.get("reflection")]
    update = seconds.get("update_s", 0.0)
    return {"generation_s": seconds.get("generation_s", 0.0), "update_s": update,
            "ref_logprobs_s": seconds.get("ref_s", 0.0), "fwd_bwd_opt_s": update - seconds.get("ref_s", 0.0),
            "sampled_tokens": int(sum(((s == Segment.REFLECTION) | (s == Segment.ATTEMPT2)).sum() for s in segs)),
            "reflections": len(episodes),
            "truncated_reflection_share": float(np.mean([bool(ep.truncated.get("reflection")) for ep in episodes]))
            if episodes else 0.0,
            "seq_len_max": max((len(ep.token_ids) for ep in episodes), default=0),
            "update_len_max": max((int(r[-1]) + 1 for r in trained if len(r)), default=0)}


def finish_record(s: dict[str, float], row: dict[str, Any]) -> None:
    """Add the step's wall time (the trainer's own `step_time_s`) and what follows from it."""
    s["step_s"] = row["step_time_s"]
    s["other_s"] = s["step_s"] - s["generation_s"] - s["update_s"]
    s["tokens_per_s"] = s["sampled_tokens"] / s["step_s"]
    s["generation_tokens_per_s"] = s["sampled_tokens"] / max(s["generation_s"], 1e-9)
    s["generated_tokens"] = s["sampled_tokens"]          # the key older result files use
    s["reward_mean"] = row["reward_mean"]


def engine_config(cfg) -> dict[str, Any]:
    """What the timings depend on beyond the workload: the engine's settings as resolved, whether it is
    compiled, how LoRA weights reach it, the update's shared prefix, the model's dtype."""
    from omegaconf import OmegaConf

    engine = OmegaConf.to_container(cfg.engine, resolve=True)
    vllm = engine["name"] == "vllm"
    return {**engine, "compiled": bool(vllm and not engine.get("enforce_eager", False)),
            "lora_sync": engine.get("lora_sync") if vllm else
            ("merged per generate call" if engine.get("merge_lora", True) else "peft unmerged (shared model)"),
            "shared_prefix": cfg.train.get("shared_prefix"), "model_dtype": model_dtype(cfg),
            "gradient_checkpointing": bool(cfg.train.gradient_checkpointing),
            "micro_batch_size": int(cfg.train.micro_batch_size)}


if __name__ == "__main__":
    sys.exit(main())
