"""Generation engines behind one interface (`rrr.engines.base.Engine`): `hf` (transformers, CPU/GPU)
and `vllm` (vLLM offline LLM, optional import)."""

from __future__ import annotations

from omegaconf import DictConfig

from rrr.config import UserError
from rrr.engines.base import Engine, Sample, SamplingParams, derive_seed

__all__ = ["Engine", "Sample", "SamplingParams", "build_engine", "build_generator", "derive_seed"]


def build_engine(cfg: DictConfig, model, tokenizer) -> Engine:
    """The engine named by `cfg.engine.name`, sampling from `model` (hf shares the object; vllm loads
    the base weights itself; when `model` carries adapters they are pushed: merged into full weights
    with lora_sync=merged, the default, or served by vLLM's LoRA support with lora_sync=adapter).
    A library error on the way is one line naming the engine settings (rrr.errors.library_errors)."""
    from rrr.errors import library_errors

    with library_errors(f"starting engine={cfg.engine.name}", "engine.* (and model.max_context, model.dtype)"):
        return _build_engine(cfg, model, tokenizer)


def _build_engine(cfg: DictConfig, model, tokenizer) -> Engine:
    from rrr.engines.hf import HFEngine, stop_token_ids

    name = cfg.engine.name
    if name == "hf":
        return HFEngine(model, tokenizer, batch_size=int(cfg.engine.batch_size),
                        prefix_cache_gb=float(cfg.engine.prefix_cache_gb),
                        merge_lora=bool(cfg.engine.get("merge_lora", True)))
    if name == "vllm":
        from rrr.engines.vllm import VLLMEngine, check_lora_sync
        from rrr.models import resolve_device, resolve_dtype, weights_source

        # vLLM's LoRA serving only when there are adapters to serve (a base model or a full fine-tune
        # would pay for enable_lora and never use it)
        lora_sync = check_lora_sync(str(cfg.engine.lora_sync))
        lora_sync = lora_sync if hasattr(model, "merge_adapter") else "merged"
        source, revision = weights_source(cfg.model)
        dtype = str(resolve_dtype(cfg.model.dtype, resolve_device(cfg.model.device))).removeprefix("torch.")
        engine = VLLMEngine(source, revision=revision, stop_ids=stop_token_ids(tokenizer), dtype=dtype,
                            seed=int(cfg.seed), max_model_len=int(cfg.model.max_context),
                            gpu_memory_utilization=float(cfg.engine.gpu_memory_utilization),
                            enable_prefix_caching=bool(cfg.engine.enable_prefix_caching),
                            enforce_eager=bool(cfg.engine.enforce_eager), parallel=vllm_parallel(cfg),
                            lora_sync=lora_sync, max_lora_rank=lora_rank(cfg),
                            sleep_mode=sleep_mode(cfg))
        if hasattr(model, "merge_adapter"):     # adapters (e.g. a checkpoint): vLLM holds only the base
            engine.load_weights(model)
        return engine
    raise UserError(f"engine={name!r} is not one of hf, vllm")


def build_generator(cfg: DictConfig) -> tuple[Engine, object]:
    """(engine, tokenizer) for a command that only samples (collect-failures, evaluate): the model of
    cfg.model behind the engine of cfg.engine; tests replace this with a fake."""
    from rrr.models import load_model

    model, tokenizer = load_model(cfg.model)
    return build_engine(cfg, model, tokenizer), tokenizer


def vllm_parallel(cfg: DictConfig) -> dict:
    """vLLM's parallel settings, non-default ones only: tensor/data parallel sizes, and under torchrun
    with several ranks the `external_launcher` backend (TRL's colocate mode: each rank hosts its vLLM in
    the process torchrun started, instead of vLLM spawning workers of its own). Untested on GPUs."""
    from rrr import distributed

    args = {}
    for key in ("tensor_parallel_size", "data_parallel_size"):
        if int(cfg.engine.get(key, 1)) > 1:
            args[key] = int(cfg.engine[key])
    if distributed.world() > 1:
        args["distributed_executor_backend"] = "external_launcher"
    return args


def lora_rank(cfg: DictConfig) -> int:
    """vLLM's max_lora_rank for lora_sync=adapter: the policy's rank, rounded up to one vLLM accepts."""
    r = int(cfg.model.lora.r) if cfg.get("model") and cfg.model.get("lora") else 16
    return next((k for k in (8, 16, 32, 64, 128, 256, 320, 512) if k >= r), r)


def sleep_mode(cfg: DictConfig) -> bool:
    """engine.sleep_mode: vLLM frees its GPU memory during the optimizer step (CUDA/ROCm only)."""
    if not cfg.engine.get("sleep_mode", False):
        return False
    import torch

    if not torch.cuda.is_available():
        raise UserError("engine.sleep_mode=true needs a CUDA/ROCm GPU (vLLM has no sleep mode on CPU); "
                        "set engine.sleep_mode=false")
    return True
