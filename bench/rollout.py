"""Rollout throughput of one train step's reflections and retries (generated tokens/s).

    python -m bench.rollout failures=RUN_DIR [model=… engine=hf|vllm reps=3]

- `engine=hf` (or `engine=vllm`): `rrr.rollout.reflect_retry`, what `rrr train` calls per step (the
  prefix cache emptied before each rep, as after every weight update);
- `raw` (with engine=hf only): the same prompts through two batched `model.generate` calls, reflections
  with `num_return_sequences=G`, then one retry per reflection: the limit for a HF-generate rollout.
The policy is the LoRA-wrapped model in both, as in a train step. Reps alternate between the two (same machine load); the first rep is a warm-up.
"""

from __future__ import annotations

import sys
import time

from bench.common import DEFAULTS, emit, parse_args, set_threads, summarize_steps
from bench.workload import attempt1, hf_generate, load_workload, reflection_prompts, retry_prompt


def main() -> None:
    a = parse_args(defaults={**DEFAULTS, "reps": 4, "raw": True})
    set_threads(a["threads"])
    from rrr import rollout, trainer
    from rrr.train_log import generated_tokens
    from rrr.tasks import get_task

    cfg, examples, stored = load_workload(a)
    model, tokenizer = trainer.build_policy(cfg)
    engine = trainer.build_engine(cfg, model, tokenizer)
    task, sampling, G = get_task(cfg.task.name), rollout.sampling_from_cfg(cfg.train.sampling), a["group"]

    raw = a["raw"] and a["engine"] == "hf"
    reps: dict[str, list] = {f"engine={a['engine']}": [], **({"raw generate": []} if raw else {})}
    for rep in range(a["reps"]):                 # interleaved, so both see the same machine load
        attempts = [attempt1(cfg, ex, s, rep + 1) for ex, s in zip(examples, stored)]
        engine.load_weights(model)                       # what the trainer does after every update
        t0 = time.perf_counter()
        groups = rollout.reflect_retry(engine, tokenizer, task, examples, [at.sample for at in attempts], cfg.prompts,
                                       sampling, group_size=G, seed=int(cfg.seed), step=rep + 1,
                                       verdicts1=[at.verdict for at in attempts])
        dt = time.perf_counter() - t0
        n = generated_tokens(groups)
        reps[f"engine={a['engine']}"].append({"seconds": dt, "generated_tokens": n, "tokens_per_s": n / dt})
        print(f"engine={a['engine']} rep {rep}: {dt:.1f} s, {n} tokens, {n / dt:.1f} tok/s", flush=True)
        if not raw:
            continue
        prefixes = reflection_prompts(cfg, tokenizer, task, examples, attempts)
        torch_seed(rep)
        t0 = time.perf_counter()
        refl = hf_generate(model, tokenizer, [p.ids for p in prefixes], G, sampling["reflection"].max_tokens,
                           sampling["reflection"].temperature, sampling["reflection"].top_p)
        t_refl = time.perf_counter() - t0
        retry_ids = [retry_prompt(cfg, tokenizer, p, r).ids for p, group in zip(prefixes, refl) for r in group]
        t1 = time.perf_counter()
        retries = hf_generate(model, tokenizer, retry_ids, 1, sampling["attempt2"].max_tokens,
                              sampling["attempt2"].temperature, sampling["attempt2"].top_p)
        dt = t_refl + time.perf_counter() - t1
        n = sum(len(r) for g in refl for r in g) + sum(len(r[0]) for r in retries)
        reps["raw generate"].append({"seconds": dt, "generated_tokens": n, "tokens_per_s": n / dt})
        print(f"raw generate rep {rep}: {dt:.1f} s, {n} tokens, {n / dt:.1f} tok/s", flush=True)
    results = {name: summarize_steps(r) for name, r in reps.items()}
    emit({"bench": "rollout", "args": a, "results": results})


def torch_seed(rep: int) -> None:
    import torch

    torch.manual_seed(1000 + rep)


if __name__ == "__main__":
    sys.exit(main())
