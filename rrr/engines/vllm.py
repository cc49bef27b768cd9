"""`engine=vllm`: vLLM's offline `LLM` behind the same interface as `engine=hf` (GPU, or vLLM's CPU build).

Untested on real hardware: the tests run this module against a fake `vllm` module that mimics the
calls we make (`LLM(...)`, `LLM.generate(prompts, params)`, `SamplingParams(...)`, RequestOutput-like
results, the driver worker's `model.load_weights`, `reset_prefix_cache`). Check it against a real vLLM
(>= 0.10.2, for `logprobs_mode`) before relying on it.

- Prompts go in as token ids (`{"prompt_token_ids": ids}`) and samples come back as token ids: never
  re-tokenized.
- One request per (prompt, sample) with `n=1` and its own `seed`, so every sample is replayable; vLLM's
  prefix cache still computes each prompt's prefix once for its n requests.
- `logprobs=0` returns the sampled token's log-prob; `logprobs_mode="processed_logprobs"` makes it the
  temperature-scaled one the trainer recomputes (vLLM's default is the raw, T = 1 distribution). With
  top_p < 1 vLLM renormalises over the nucleus, `engine=hf` does not.
- `load_weights` (after each training step) follows TRL's colocated sync: merge LoRA, push the merged
  weights with the base model's parameter names into the driver worker's model, unmerge, and reset the
  prefix cache (cached prefixes were computed with the old weights).
"""

from __future__ import annotations

from rrr.config import UserError
from rrr.engines.base import Sample, SamplingParams


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise UserError("engine=vllm needs vLLM (a CUDA GPU): pip install 'rrr[vllm]', or use engine=hf") from None
    return vllm


def merged_weights(model) -> list[tuple[str, object]]:
    """(name, tensor) pairs of `model` under the base model's names, LoRA merged in.
    For a PeftModel the caller must hold the adapters merged while it uses the tensors."""
    if not hasattr(model, "merge_adapter"):
        return [(name, p.data) for name, p in model.named_parameters()]
    weights = []
    for name, p in model.named_parameters():
        if "lora_" in name or "original_module" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        weights.append((name.replace("modules_to_save.default.", ""), p.data))
    return weights


class VLLMEngine:
    def __init__(self, model_source: str, *, revision: str | None, stop_ids: list[int], dtype: str,
                 seed: int, max_model_len: int, gpu_memory_utilization: float, enable_prefix_caching: bool,
                 enforce_eager: bool, parallel: dict | None = None):
        self.vllm = _import_vllm()
        self.stop_ids = stop_ids
        self.llm = self.vllm.LLM(
            model=model_source, revision=revision, dtype=dtype, seed=seed, max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
            enforce_eager=enforce_eager, logprobs_mode="processed_logprobs", **(parallel or {}))

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
                 seeds: list[list[int]] | None = None) -> list[list[Sample]]:
        if seeds is None:
            import torch

            seeds = torch.randint(0, 2**62, (len(prompts), n)).tolist()
        requests = [{"prompt_token_ids": list(p)} for p in prompts for _ in range(n)]
        params = [self.vllm.SamplingParams(
            n=1, seed=int(s), logprobs=0, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, stop_token_ids=self.stop_ids, detokenize=False)
            for row in seeds for s in row]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        samples = [_to_sample(out.outputs[0]) for out in outputs]
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]

    def load_weights(self, model) -> None:
        runner_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        is_peft = hasattr(model, "merge_adapter")
        if is_peft:
            model.merge_adapter()
        try:
            runner_model.load_weights(merged_weights(model))
        finally:
            if is_peft:
                model.unmerge_adapter()
        self.llm.reset_prefix_cache()


def _to_sample(completion) -> Sample:
    """vLLM CompletionOutput -> Sample: the sampled ids (a sampled stop token included) and their log-probs."""
    if completion.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM request ended with finish_reason={completion.finish_reason!r}")
    ids = list(completion.token_ids)
    logprobs = [step[token].logprob for step, token in zip(completion.logprobs, ids)]
    return Sample(token_ids=ids, logprobs=logprobs, finish_reason=completion.finish_reason)
