"""bf16 numerics measured on CPU (issue #22, item 3): the sampler/trainer log-prob gap of a bf16 run.

Runs `rrr train` (engine=hf, Countdown prompts, stored failed attempts) for a few steps and records
|log π_θ − log π_sampler| on every loss token (reflection tokens) of every step, for three samplers:
  shared   the hf engine on the policy object itself: bf16 autocast over fp32 master weights, the
           trainer's own arithmetic (cached decode vs one full forward is the only difference)
  copy     the hf engine on its own bf16 copy, synced each step by load_state_dict: bf16 weights and
           bf16 kernels, as vLLM holds and runs them (the gap a GPU run with vLLM bf16 starts from)
  skipped  `copy` whose sync after step --skip-step is skipped once (the failure the canary must catch)
and prints, per sampler, mean / p50 / p95 / max of the per-token |Δ| and each step's mean (the logged
`sync/logprob_diff`), with the TIS weights' statistics (is_ratio_mean, is_capped_frac at C = 2).

    PYTHONPATH=. python scripts/bf16_gap.py                       # SmolLM2-135M, full, bf16, 4 steps
    PYTHONPATH=. python scripts/bf16_gap.py --model tiny-random --steps 3
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import pandas as pd
import torch

SAMPLERS = ("shared", "copy", "skipped")


def write_failures(run_dir: Path, tokenizer, n: int = 4) -> Path:
    """A failures.parquet of n Countdown queries, each with one stored failed attempt."""
    from rrr.config import compose
    from rrr.rollout import prompt_ids
    from rrr.tasks import Example, get_task

    prompts = compose(["task=countdown"]).prompts
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for i in range(n):
        ex = Example(id=f"cd{i}", task="countdown", source="generated",
                     fields={"nums": [i + 2, i + 3, i + 5], "target": 4 * i + 13, "witness": None})
        text = f"<answer>{i + 2} + {i + 3}</answer>"
        rows.append({**ex.to_row(), "n_samples": 1, "n_correct": 0, "pass_rate": 0.0, "failed_texts": [text],
                     "failed_token_ids": [tokenizer(text, add_special_tokens=False)["input_ids"] + [end]],
                     "failed_reasons": ["wrong value"], "failed_truncated": [False],
                     "prompt_token_ids": prompt_ids(tokenizer, get_task("countdown"), ex, prompts)})
    run_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(run_dir / "failures.parquet", index=False)
    return run_dir


class SkippingEngine:
    """An engine that skips its weight sync once (the `skip`-th call of load_weights, 1-based)."""

    def __init__(self, engine, skip: int):
        self.engine, self.skip, self.calls = engine, skip, 0

    def generate(self, *args, **kwargs):
        return self.engine.generate(*args, **kwargs)

    def load_weights(self, model) -> None:
        self.calls += 1
        if self.calls != self.skip:
            self.engine.load_weights(model)


def tokenizer_of(model: str):
    from rrr.models import load_tokenizer_only

    return load_tokenizer_only("smollm2-135m" if model == "tiny-random" else model)


def copy_engine(model, tokenizer, weights: str = "bf16", **engine_kwargs):
    """The hf engine on its own copy of the policy, synced by load_state_dict: `bf16` weights and kernels
    (as vLLM holds and runs them), or `policy` = the policy's own precision (as FSDP's gathered copy)."""
    from rrr import precision
    from rrr.engines.hf import HFEngine
    from rrr.models import merge_adapter

    twin = merge_adapter(copy.deepcopy(model)).eval().requires_grad_(False)
    if weights == "bf16":
        twin = precision.set_compute_dtype(twin.to(torch.bfloat16), torch.bfloat16)
    return HFEngine(twin, tokenizer, **engine_kwargs)


def measure(model: str, sampler: str, *, steps: int, dtype: str = "bfloat16", finetune: str = "full",
            skip_step: int = 2, copy_weights: str = "bf16", extra: tuple[str, ...] = (),
            workdir: Path | None = None) -> dict:
    """Run `steps` training steps with `sampler` (copy engines hold `copy_weights`: bf16 | policy); per
    step: the per-token |Δ| [n] and the logged row. `extra` overrides come last (e.g. the canary's limit)."""
    from rrr import trainer
    from rrr.config import compose
    workdir = Path(workdir or tempfile.mkdtemp(prefix="bf16-gap-"))
    failures = write_failures(workdir / "failures", tokenizer_of(model))
    cfg = compose([f"model={model}", "task=countdown", f"model.dtype={dtype}", "model.device=cpu",
                   f"train.finetune={finetune}", f"train.failures={failures}", f"run_dir={workdir / sampler}",
                   f"train.steps={steps}", f"train.save_every={steps}", "train.batch_queries=2",
                   "train.group_size=4", "train.micro_batch_size=4", "train.warmup_steps=0",
                   "train.lr_schedule=constant", "train.is_correction=token_tis", "train.is_cap=2.0",
                   "train.sampling.reflection.max_tokens=48", "train.sampling.attempt2.max_tokens=16",
                   "engine=hf", "engine.max_logprob_diff=null", "logger=none", "log.progress=false", *extra])
    gaps: list[torch.Tensor] = []
    real_diff, real_build = trainer.sampler_abs_diff_sum, trainer.build_engine
    # a random tiny model almost never ends a turn by itself: there every third id stops a sample
    stop = {"stop_ids": list(range(0, len(tokenizer_of(model)), 3))} if model == "tiny-random" else {}

    def record(logp, sampler_logp, mask):
        gaps.append((logp - sampler_logp).abs()[mask].double())
        return real_diff(logp, sampler_logp, mask)

    def build(cfg_, policy, tokenizer):
        from rrr.engines.hf import HFEngine

        if sampler == "shared":
            return HFEngine(policy, tokenizer, **stop)
        engine = copy_engine(policy, tokenizer, copy_weights, **stop)
        return SkippingEngine(engine, skip_step) if sampler == "skipped" else engine

    per_step: list[torch.Tensor] = []
    real_update = trainer.policy_update

    def update(*args, **kwargs):
        gaps.clear()
        out = real_update(*args, **kwargs)
        per_step.append(torch.cat(gaps) if gaps else torch.zeros(0, dtype=torch.float64))
        return out

    trainer.sampler_abs_diff_sum, trainer.build_engine, trainer.policy_update = record, build, update
    try:
        run = trainer.run(cfg)
    finally:
        trainer.sampler_abs_diff_sum, trainer.build_engine, trainer.policy_update = real_diff, real_build, real_update
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"per_token": per_step, "rows": rows}


def summary(per_token: list[torch.Tensor]) -> dict[str, float]:
    x = torch.cat(per_token)
    return {"tokens": len(x), "mean": x.mean().item(), "p50": x.quantile(0.5).item(),
            "p95": x.quantile(0.95).item(), "max": x.max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--finetune", default="full")
    parser.add_argument("--skip-step", type=int, default=2, help="the sync skipped by `skipped` (1-based)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"model={args.model} dtype={args.dtype} finetune={args.finetune} steps={args.steps} lr=1e-5 (defaults)")
    print(f"{'sampler':8} {'tokens':>6} {'mean':>9} {'p50':>9} {'p95':>9} {'max':>9}   per-step mean "
          f"(sync/logprob_diff) | is_ratio_mean | is_capped_frac")
    for sampler in args.samplers.split(","):
        out = measure(args.model, sampler, steps=args.steps, dtype=args.dtype, finetune=args.finetune,
                      skip_step=args.skip_step)
        s = summary(out["per_token"])
        steps = " ".join(f"{r['sync/logprob_diff']:.4f}" for r in out["rows"])
        ratio = " ".join(f"{r.get('is_ratio_mean', float('nan')):.4f}" for r in out["rows"])
        capped = " ".join(f"{r.get('is_capped_frac', float('nan')):.4f}" for r in out["rows"])
        print(f"{sampler:8} {s['tokens']:6d} {s['mean']:9.5f} {s['p50']:9.5f} {s['p95']:9.5f} {s['max']:9.5f}   "
              f"{steps} | {ratio} | {capped}", flush=True)


if __name__ == "__main__":
    main()
