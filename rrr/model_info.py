"""What a model config points at, read without loading weights: its architecture (config.json where it
already lies on disk; rrr.validate checks settings against it) and its provenance for run manifests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rrr.models import EMBEDDED, _cfg, cache_root


def architecture_config(model_cfg: DictConfig | dict) -> dict[str, Any] | None:
    """The model's config.json as a dict, read from where it already lies on disk (no weights loaded,
    nothing downloaded or converted): a model.path directory (an adapter's: its base model's), a converted
    embedded model, the local hub cache, or built from `model.random`. None when it is not on disk yet."""
    cfg = _cfg(model_cfg)
    path = Path(cfg.path) if cfg.get("path") else None
    if path is not None and not (path / "adapter_config.json").exists():
        found: Any = path / "config.json"
    elif cfg.source == "random":
        r = cfg.random
        return {"model_type": "llama", "max_position_embeddings": int(cfg.max_context),
                "hidden_size": int(r.hidden_size), "intermediate_size": int(r.intermediate_size),
                "num_hidden_layers": int(r.layers), "num_attention_heads": int(r.heads),
                "num_key_value_heads": int(r.kv_heads), "tie_word_embeddings": True}
    elif cfg.source == "embedded" and cfg.name in EMBEDDED:
        found = cache_root() / "models" / f"{cfg.name}-{EMBEDDED[cfg.name].sha256[:12]}" / "config.json"
    elif cfg.source == "hub" and cfg.get("hub_id"):
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(cfg.hub_id), "config.json", revision=str(cfg.revision or "main"))
    else:
        return None
    try:
        return json.loads(Path(found).read_text()) if isinstance(found, (str, Path)) else None
    except (OSError, ValueError):
        return None


def model_provenance(model_cfg: DictConfig | dict, model=None) -> dict[str, Any]:
    """What exactly was loaded, for the run manifest: source, hub id, revision (and the resolved commit
    when `model` is given), local path, and the GGUF sha256 of an embedded model."""
    cfg = _cfg(model_cfg)
    info: dict[str, Any] = {"name": cfg.name, "source": cfg.source, "hub_id": cfg.get("hub_id"),
                            "revision": cfg.get("revision"), "path": cfg.get("path"),
                            "dtype": cfg.dtype, "attn_implementation": cfg.attn_implementation}
    if cfg.source == "embedded" and cfg.name in EMBEDDED:
        spec = EMBEDDED[cfg.name]
        info.update(gguf_sha256=spec.sha256, gguf_bytes=spec.size, gguf_parts=[f"{p}/{r}" for p, r in spec.parts])
    if cfg.source == "random":
        info["random"] = OmegaConf.to_container(cfg.random, resolve=True)
    adapter = Path(cfg.path) / "adapter_config.json" if cfg.get("path") else None
    if adapter is not None and adapter.exists():
        info["adapter_base"] = json.loads(adapter.read_text()).get("base_model_name_or_path")
    if model is not None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        info["resolved_commit"] = getattr(base.config, "_commit_hash", None)
        info["parameters"] = sum(p.numel() for p in base.parameters())
    return info
