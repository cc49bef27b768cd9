"""TRL's `GRPOTrainer` on the shared workload: R3 through `rollout_func` + `env_mask`, or plain GRPO.

    python -m bench.trl_grpo mode=r3 failures=RUN_DIR [model=… queries=8 group=4 …]
    python -m bench.trl_grpo mode=r3_full failures=RUN_DIR
    python -m bench.trl_grpo mode=plain failures=RUN_DIR

Written from TRL's documented API (trl 1.16, `trl/trainer/grpo_trainer.py`): `rollout_func(prompts,
trainer)` receives the generation batch's prompts, each `num_generations` times in a row (RepeatSampler),
and returns `prompt_ids`, `completion_ids`, `logprobs` (None: HF generate gives none) and `env_mask`
(1 = in the loss); every other key goes to the reward functions as a keyword.

R3 (mode=r3, lean): the prompt is the failed query's reflection prompt (task prompt · stored attempt 1 ·
feedback, the attempt 1 `rrr train` picks at that step); the rollout samples G reflections with one
`model.generate(num_return_sequences=G)` per batch, then one retry per reflection with a second
`generate`; the completion is the reflection alone (what the loss covers; env_mask = 1 on it, 0 when it
was truncated, as rrr does), and the retry's reward travels in the extra key `retry_reward`, so TRL
scores (reference and policy forwards) no token past the reflection: what a good TRL user would write.
R3 (mode=r3_full, the bench's earlier variant): completion = reflection · retry prompt · retry, env_mask
1 on the reflection only; TRL then runs the retry through every forward for nothing.
Plain GRPO (mode=plain): the task prompts, G completions of ≤ reflection + retry tokens each, reward =
verify(completion): TRL's own generation path at about the same number of generated tokens.

Both: LoRA r=16 on q/k/v/o, β as given (reference = adapters disabled), loss_type="grpo" (rrr's
seq_mean_token_mean), one generation per optimizer step (steps_per_generation = accumulation steps, so
no π_old forward), micro-batches of G, no gradient checkpointing (as the rrr run), fp32 on CPU.
Phases: generation = `_generate`; reference log-probs = `_get_per_token_logps_and_entropies` under
no_grad; fwd+bwd+opt = the step minus `_prepare_inputs`.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from bench.common import DEFAULTS, Timer, emit, model_dtype, parse_args, set_threads, summarize_steps
from bench.workload import attempt1, hf_generate, load_workload, reflection_prompts, retry_prompt


def main() -> None:
    a = parse_args(defaults={**DEFAULTS, "mode": "r3"})
    if a["mode"] not in MODES:
        raise SystemExit(f"error: mode={a['mode']!r} is not one of {', '.join(MODES)}")
    set_threads(a["threads"])
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rrr.models import load_model
    from rrr.rollout import sampling_from_cfg
    from rrr.tasks import get_task

    cfg, examples, stored = load_workload(a)
    task, sampling, G, Q = get_task(cfg.task.name), sampling_from_cfg(cfg.train.sampling), a["group"], a["queries"]
    model, tokenizer = load_model(cfg.model, for_training=True)
    key_of = lambda messages: json.dumps(messages, sort_keys=True)                       # noqa: E731
    index_of = {key_of(task.messages(ex, cfg.prompts)): i for i, ex in enumerate(examples)}
    dataset = Dataset.from_list([{"prompt": task.messages(ex, cfg.prompts)} for ex in examples])
    counts = new_counts()
    r3 = a["mode"] != "plain"
    r3_rollout = make_r3_rollout(cfg, tokenizer, task, examples, stored, G, sampling, counts,
                                 lean=a["mode"] == "r3") if r3 else None

    def r3_reward(prompts, completions, retry_reward, **kwargs):
        return list(retry_reward)

    def plain_reward(prompts, completions, completion_ids, **kwargs):
        out = []
        for p, ids in zip(prompts, completion_ids):
            counts["generated_tokens"] += len(ids)
            out.append(float(task.verify(examples[index_of[key_of(p)]],
                                         tokenizer.decode(ids, skip_special_tokens=True)).correct))
        return out

    budget = sampling["reflection"].max_tokens + sampling["attempt2"].max_tokens
    args = GRPOConfig(
        output_dir=os.path.join(a["out"], f"trl-{a['mode']}-{a['model']}"), report_to="none", save_strategy="no",
        use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False, seed=a["seed"], logging_steps=1,
        max_steps=a["steps"], learning_rate=float(cfg.train.lr), lr_scheduler_type="constant", warmup_steps=0,
        per_device_train_batch_size=G, gradient_accumulation_steps=Q, num_generations=G,
        max_completion_length={"plain": budget, "r3": sampling["reflection"].max_tokens, "r3_full": budget + 64}[a["mode"]],
        temperature=1.0, top_k=0, top_p=1.0,
        beta=a["beta"], loss_type="grpo", scale_rewards="group", epsilon=0.2, num_iterations=1,
        gradient_checkpointing=False, remove_unused_columns=False, dataloader_num_workers=0,
        log_completions=False, disable_tqdm=True, max_grad_norm=1.0,
    )
    peft = LoraConfig(r=a["lora_r"], lora_alpha=2 * a["lora_r"], lora_dropout=0.0, bias="none",
                      target_modules=a["lora_targets"].split(","), task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=r3_reward if r3 else plain_reward, args=args,
                          train_dataset=dataset, processing_class=tokenizer, peft_config=peft,
                          rollout_func=r3_rollout)

    timer, steps = Timer(), []
    trainer._generate = timer.wrap(trainer._generate, "generation_s")
    trainer._prepare_inputs = timer.wrap(trainer._prepare_inputs, "prepare_s")
    logps = trainer._get_per_token_logps_and_entropies

    def timed_logps(*args, **kwargs):
        if torch.is_grad_enabled():
            return logps(*args, **kwargs)
        with timer.phase("ref_logprobs_s"):
            return logps(*args, **kwargs)
    trainer._get_per_token_logps_and_entropies = timed_logps

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            timer.take()
            counts.update(new_counts())
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            steps.append({**trl_step_record(time.perf_counter() - self.t0, timer.take(), counts),
                          "rss_gb": round(_rss(), 3)})
            print(f"trl-{a['mode']} step {state.global_step}: {json.dumps(steps[-1])}", flush=True)

    trainer.add_callback(StepTimer())
    trainer.train()
    emit({"system": SYSTEMS[a["mode"]], "args": a, **summarize_steps(steps),
          "engine_config": {"name": "transformers model.generate (in the rollout_func)", "compiled": False,
                            "lora_sync": "peft unmerged (shared model)", "model_dtype": model_dtype(cfg),
                            "gradient_checkpointing": False, "micro_batch_size": G,
                            "completion": {"r3": "reflection", "r3_full": "reflection · retry prompt · retry",
                                           "plain": "completion"}[a["mode"]]}})


MODES = ("r3", "r3_full", "plain")
SYSTEMS = {"r3": "TRL R3 (rollout_func, completion = reflection)",
           "r3_full": "TRL R3 (rollout_func, completion = reflection · retry prompt · retry)",
           "plain": "TRL plain GRPO"}


def new_counts() -> dict:
    """Per-step workload counters the rollout (or the plain reward) fills."""
    return {"generated_tokens": 0, "reflections": 0, "truncated_reflections": 0, "seq_len_max": 0,
            "update_len_max": 0}


def trl_step_record(step_s: float, seconds: dict[str, float], counts: dict) -> dict[str, float]:
    """One TRL step: phases (generation = `_generate`; reference = `_get_per_token_logps_and_entropies`
    without grad; fwd+bwd+opt = the step minus `_prepare_inputs`), update = reference + fwd+bwd+opt."""
    gen, ref, prep = seconds.get("generation_s", 0.0), seconds.get("ref_logprobs_s", 0.0), seconds.get("prepare_s", 0.0)
    n = counts["generated_tokens"]
    return {"step_s": step_s, "generation_s": gen, "ref_logprobs_s": ref, "fwd_bwd_opt_s": step_s - prep,
            "update_s": ref + step_s - prep, "other_s": prep - gen - ref, "sampled_tokens": n,
            "generated_tokens": n, "tokens_per_s": n / step_s, "generation_tokens_per_s": n / max(gen, 1e-9),
            "reflections": counts["reflections"],
            "truncated_reflection_share": counts["truncated_reflections"] / counts["reflections"]
            if counts["reflections"] else 0.0,
            "seq_len_max": counts["seq_len_max"], "update_len_max": counts["update_len_max"]}


def make_r3_rollout(cfg, tokenizer, task, examples, stored, G: int, sampling, counts: dict, lean: bool = True):
    """A TRL `rollout_func` running R3 on the failed queries `examples` (their stored attempts `stored`).
    lean: the completion is the reflection alone; else reflection · retry prompt · retry."""
    from rrr.engines.hf import stop_token_ids

    key_of = lambda messages: json.dumps(messages, sort_keys=True)                       # noqa: E731
    index_of = {key_of(task.messages(ex, cfg.prompts)): i for i, ex in enumerate(examples)}
    stop = set(stop_token_ids(tokenizer))

    def r3_rollout(prompts, trainer):
        """R3 for the generation batch: G consecutive copies of each failed query's prompt."""
        step = trainer.state.global_step + 1
        unique = [index_of[key_of(p)] for p in prompts[::G]]
        assert all(index_of[key_of(p)] == unique[j // G] for j, p in enumerate(prompts)), "RepeatSampler order"
        attempts = [attempt1(cfg, examples[i], stored[i], step) for i in unique]
        prefixes = reflection_prompts(cfg, tokenizer, task, [examples[i] for i in unique], attempts)
        reflections = hf_generate(trainer.model, tokenizer, [p.ids for p in prefixes], G,
                                  sampling["reflection"].max_tokens, sampling["reflection"].temperature,
                                  sampling["reflection"].top_p)                               # [U][G]
        retry_prefixes = [retry_prompt(cfg, tokenizer, p, r) for p, group in zip(prefixes, reflections) for r in group]
        retries = [r[0] for r in hf_generate(trainer.model, tokenizer, [p.ids for p in retry_prefixes], 1,
                                             sampling["attempt2"].max_tokens, sampling["attempt2"].temperature,
                                             sampling["attempt2"].top_p)]
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": None, "env_mask": [], "retry_reward": []}
        for row, (rp, retry) in enumerate(zip(retry_prefixes, retries)):
            u, g = divmod(row, G)
            prefix, reflection = prefixes[u], reflections[u][g]
            episode = list(rp.ids[len(prefix.ids):]) + retry                    # reflection · retry prompt · retry
            completion = list(reflection) if lean else episode
            truncated = not reflection or reflection[-1] not in stop
            out["prompt_ids"].append(list(prefix.ids))
            out["completion_ids"].append(completion)
            out["env_mask"].append([0 if truncated else 1] * len(reflection) + [0] * (len(completion) - len(reflection)))
            verdict = task.verify(examples[unique[u]], tokenizer.decode(retry, skip_special_tokens=True))
            out["retry_reward"].append(float(verdict.correct))
            counts["generated_tokens"] += len(reflection) + len(retry)
            counts["reflections"] += 1
            counts["truncated_reflections"] += int(truncated)
            counts["seq_len_max"] = max(counts["seq_len_max"], len(prefix.ids) + len(episode))
            counts["update_len_max"] = max(counts["update_len_max"], len(prefix.ids) + len(completion))
        return out

    return r3_rollout


def _rss() -> float:
    from bench.common import rss_gb
    return rss_gb()


if __name__ == "__main__":
    sys.exit(main())
