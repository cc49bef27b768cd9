"""Settings no run can use, refused before any work (one line each; issues #12 item 4, #23 item 4).

Each command calls `check(cfg, command)` first: sampling knobs of every segment it samples, the data
limits it reads, and the knobs only one command uses (train.lr, eval.bootstrap_samples). The Countdown
generator bounds its own knobs (`rrr.tasks.countdown.Knobs.check`).

Then what a library below would reject, before the model loads (`check_model`): the dtype, device and
attention kernel transformers needs; the LoRA rank, alpha, dropout and target modules peft needs (the
targets against the architecture, built on the meta device from config.json: no weights); the token
budgets against the model's context (config.json's max_position_embeddings, and model.max_context, which
vLLM takes as max_model_len); vLLM's tensor/data-parallel sizes against the attention heads and the
visible GPUs. Whatever still escapes a library while the run is built becomes one line naming the
settings (`library_errors`). Refusals of a setting exit with 2 (a usage error), like a bad override.
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig

from rrr.adapters import is_adapter
from rrr.config import ConfigError, UserError
from rrr.episode import SAMPLED_SEGMENTS as SAMPLED


def check_sampling(node: Any, where: str) -> None:
    """temperature >= 0 (0 = greedy in both engines), 0 < top_p <= 1, max_tokens >= 1."""
    t, p, m = node.get("temperature", 1.0), node.get("top_p", 1.0), node.get("max_tokens")
    if _num(t, f"{where}.temperature") < 0:
        raise ConfigError(f"{where}.temperature={t} must be >= 0 (0 = greedy)")
    if not 0 < _num(p, f"{where}.top_p") <= 1:
        raise ConfigError(f"{where}.top_p={p} must be in (0, 1] (1 = no nucleus cut)")
    if m is None or _num(m, f"{where}.max_tokens") < 1 or int(m) != float(m):
        raise ConfigError(f"{where}.max_tokens={m} must be an integer >= 1")


def check_at_least_one(value: Any, where: str, why: str = "") -> None:
    """A count setting (batch sizes, samples, retries) must be >= 1; `why` is added in parentheses."""
    if int(value) < 1:
        raise UserError(f"{where} must be >= 1" + (f" ({why})" if why else ""))


def check_limit(value: Any, where: str) -> None:
    if value is not None and (_num(value, where) < 0 or int(value) != float(value)):
        raise ConfigError(f"{where}={value} must be null (all examples) or an integer >= 0")


def check(cfg: DictConfig, command: str) -> None:
    if command == "collect-failures":
        check_sampling(cfg.collect, "collect")
        check_limit(cfg.data.limit, "data.limit")
    elif command == "evaluate":
        for seg in SAMPLED:
            check_sampling(cfg.eval.sampling[seg], f"eval.sampling.{seg}")
        check_limit(cfg.eval.limit, "eval.limit")
        if _num(cfg.eval.bootstrap_samples, "eval.bootstrap_samples") < 1:
            raise ConfigError(f"eval.bootstrap_samples={cfg.eval.bootstrap_samples} must be >= 1 (default 2000)")
    elif command == "train":
        for seg in SAMPLED:
            check_sampling(cfg.train.sampling[seg], f"train.sampling.{seg}")
        if not _num(cfg.train.lr, "train.lr") > 0:
            raise ConfigError(f"train.lr={cfg.train.lr} must be > 0")
        for key in ("beta", "epsilon", "epsilon_high", "max_grad_norm", "weight_decay"):
            if _num(cfg.train[key], f"train.{key}") < 0:
                raise ConfigError(f"train.{key}={cfg.train[key]} must be >= 0")
        if not 0 <= _num(cfg.train.min_pass_rate, "train.min_pass_rate") <= \
                _num(cfg.train.max_pass_rate, "train.max_pass_rate") <= 1:
            raise ConfigError("train.min_pass_rate <= train.max_pass_rate must both lie in [0, 1]")
        keep = cfg.train.get("keep_checkpoints")
        if keep is not None and (_num(keep, "train.keep_checkpoints") < 0 or int(keep) != float(keep)):
            raise ConfigError(f"train.keep_checkpoints={keep} must be null or 0 (keep all) or an integer >= 1 "
                            "(the newest N step checkpoints are kept, plus final)")
    if cfg.task.name == "countdown" and cfg.task.source == "generated":
        from rrr.tasks.countdown import Knobs

        Knobs.from_cfg(cfg.task.generated)
    if command in BUDGETS:
        check_model(cfg, command)


# ----------------------------------------------------------------------------- what the libraries reject

# the sampled token budgets of one episode, per command (each holds prompt + all of them)
BUDGETS = {"collect-failures": ("collect",), "evaluate": tuple(f"eval.sampling.{s}" for s in SAMPLED),
           "train": tuple(f"train.sampling.{s}" for s in SAMPLED)}
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def check_model(cfg: DictConfig, command: str) -> None:
    """The model, LoRA, token-budget and engine settings transformers, peft or vLLM would refuse."""
    from rrr.model_info import architecture_config

    m = cfg.model
    arch = architecture_config(m)          # None: not on disk yet (a hub model not downloaded)
    check_device(m)
    context = check_context(m, arch)
    check_budgets(cfg, command, context)
    if command == "train" and cfg.train.get("finetune") == "lora" and not is_adapter(m):
        check_lora(m, arch)
    if cfg.engine.name == "vllm":
        check_vllm(cfg, arch)


def check_device(m: DictConfig) -> None:
    import torch

    if str(m.dtype) not in DTYPES:
        raise ConfigError(f"model.dtype={m.dtype!r}; valid choices: auto, float32, bfloat16, float16")
    device, suffix = str(m.device), str(m.device)[4:]
    if device not in ("auto", "cpu") and not (device.startswith("cuda") and
                                               (not suffix or suffix[:1] == ":" and suffix[1:].isdigit())):
        raise ConfigError(f"model.device={device!r}; valid choices: auto, cpu, cuda, cuda:N")
    if device.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(suffix[1:] or 0) >= n:
            raise ConfigError(f"model.device={device}: torch sees {n} CUDA device(s); use model.device=auto "
                              "or cpu" + (f", or cuda:0..cuda:{n - 1}" if n else ""))
    attn = str(m.attn_implementation)
    if attn not in ATTENTION:
        raise ConfigError(f"model.attn_implementation={attn!r}; valid choices: {', '.join(ATTENTION)}")
    if attn.startswith("flash_attention"):
        import importlib.util

        package = "flash_attn" if attn == "flash_attention_2" else "flash_attn_interface"
        if importlib.util.find_spec(package) is None or not torch.cuda.is_available():
            raise ConfigError(f"model.attn_implementation={attn} needs a CUDA GPU and the {package} package; "
                              "use model.attn_implementation=sdpa")


def check_context(m: DictConfig, arch: dict[str, Any] | None) -> int:
    """The context the run can use: model.max_context, which must not exceed config.json's
    max_position_embeddings (vLLM refuses a longer max_model_len; transformers' positions run out)."""
    context = int(_num(m.max_context, "model.max_context"))
    if context < 2:
        raise ConfigError(f"model.max_context={m.max_context} must be an integer >= 2")
    limit = (arch or {}).get("max_position_embeddings")
    if limit and context > int(limit):
        raise ConfigError(f"model.max_context={context} exceeds the {int(limit)} positions of model "
                          f"{m.name} (max_position_embeddings in its config.json); set model.max_context<={int(limit)}")
    return context


def check_budgets(cfg: DictConfig, command: str, context: int) -> None:
    """An episode holds its prompt and every sampled segment: their budgets must leave room in context."""
    keys = BUDGETS[command]
    budgets = {k: int(_num(_select(cfg, k).max_tokens, f"{k}.max_tokens")) for k in keys}
    total = sum(budgets.values())
    if total >= context:
        parts = " + ".join(f"{k}.max_tokens={v}" for k, v in budgets.items())
        shown = f"{parts} = {total}" if len(budgets) > 1 else parts
        raise ConfigError(f"{shown} tokens do not fit the {context}-token context of model {cfg.model.name} "
                          "(with the prompt); lower them")


def check_lora(m: DictConfig, arch: dict[str, Any] | None) -> None:
    """peft's LoraConfig/get_peft_model, checked ahead: r >= 1, alpha > 0, 0 <= dropout < 1, and every
    target module name matches a Linear/Embedding/Conv layer of the architecture."""
    lora = m.lora
    r = lora.r
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ConfigError(f"model.lora.r={r}: the LoRA rank must be an integer >= 1 (e.g. 8 or 16)")
    if not _num(lora.alpha, "model.lora.alpha") > 0:
        raise ConfigError(f"model.lora.alpha={lora.alpha} must be > 0 (the update is scaled by alpha / r; usual: 2r)")
    if not 0 <= _num(lora.dropout, "model.lora.dropout") < 1:
        raise ConfigError(f"model.lora.dropout={lora.dropout} must lie in [0, 1)")
    targets = lora.target_modules
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"model.lora.target_modules={targets!r} must be a non-empty list of module names "
                          "(e.g. [q_proj, v_proj])")
    layers = lora_targetable(arch)
    if layers is None:
        return
    missing = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in layers)]
    if missing:
        kinds = sorted({name.rsplit(".", 1)[-1] for name in layers})
        raise ConfigError(f"model.lora.target_modules: {', '.join(missing)} match no Linear/Embedding layer of "
                          f"model {m.name}; its layer names: {', '.join(kinds)}")


def lora_targetable(arch: dict[str, Any] | None) -> list[str] | None:
    """Names of the modules peft can wrap (Linear, Embedding, Conv), from the architecture built on the
    meta device (no memory, no weights). None when the architecture is unknown here."""
    if not arch or "model_type" not in arch:
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        config = AutoConfig.for_model(**arch)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 — an architecture this transformers cannot build: peft will tell
        return None
    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def check_vllm(cfg: DictConfig, arch: dict[str, Any] | None) -> None:
    """vLLM's parallel and memory settings: sizes >= 1, tensor parallelism dividing the attention heads,
    and tp × dp GPUs per rank within the visible ones (when CUDA is there to count)."""
    import torch

    e = cfg.engine
    tp, dp = (e.get(k, 1) for k in ("tensor_parallel_size", "data_parallel_size"))
    for key, value in (("tensor_parallel_size", tp), ("data_parallel_size", dp)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"engine.{key}={value} must be an integer >= 1")
    if not 0 < _num(e.gpu_memory_utilization, "engine.gpu_memory_utilization") <= 1:
        raise ConfigError(f"engine.gpu_memory_utilization={e.gpu_memory_utilization} must lie in (0, 1]")
    heads = (arch or {}).get("num_attention_heads")
    if heads and int(heads) % tp:
        raise ConfigError(f"engine.tensor_parallel_size={tp} must divide the {heads} attention heads of model "
                          f"{cfg.model.name}")
    if torch.cuda.is_available():
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        visible = torch.cuda.device_count()
        if tp * dp * ranks > visible:
            raise ConfigError(f"engine.tensor_parallel_size={tp} x engine.data_parallel_size={dp} x {ranks} "
                              f"rank(s) on this node need {tp * dp * ranks} GPUs; {visible} visible")
    if cfg.engine.get("lora_sync") == "adapter" and isinstance(cfg.model.lora.r, int) and cfg.model.lora.r > 512:
        raise ConfigError(f"model.lora.r={cfg.model.lora.r}: vLLM serves LoRA ranks up to 512; use "
                          "engine.lora_sync=merged")


def _select(cfg: DictConfig, key: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key)


def _num(value: Any, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={value!r} is not a number") from None


def check_logger(cfg: DictConfig) -> None:
    """logger.mode=online needs a wandb login; without one wandb would prompt or fail mid-setup."""
    logger = cfg.get("logger") or {}
    if logger.get("name") != "wandb":
        return
    mode = str(logger.get("mode", "offline"))
    if mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"logger.mode={mode!r}; valid choices: online, offline, disabled")
    if mode == "online" and not wandb_logged_in():
        raise UserError("logger.mode=online needs a wandb login: run `wandb login` or set WANDB_API_KEY, "
                        "or use logger.mode=offline (sync later with `wandb sync`)")


def wandb_logged_in() -> bool:
    """An API key in WANDB_API_KEY or in ~/.netrc for the wandb host (where `wandb login` puts it)."""
    import netrc
    import os
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        auth = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])
