"""An adapter fits only the base model it was trained on: the record rrr saves with every adapter
(`rrr_base_model.json`) and the check that refuses it on another base, in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from rrr.errors import UserError


BASE_MODEL_FILE = "rrr_base_model.json"   # in every adapter rrr saves: the model config it was trained on


def base_model_record(cfg: DictConfig) -> dict[str, Any]:
    return {"name": str(cfg.name), "source": str(cfg.source), "hub_id": cfg.get("hub_id"),
            "revision": cfg.get("revision")}


def check_adapter_base(cfg: DictConfig, path: Path) -> None:
    """An adapter only fits the base model it was trained on: refuse it on another (by its record)."""
    record = path / BASE_MODEL_FILE
    if not record.exists():
        return                               # a foreign adapter: loading it will tell
    try:
        base = json.loads(record.read_text())
    except (ValueError, OSError):
        raise UserError(f"{record} is corrupt; restore the checkpoint or re-save the adapter") from None
    mine = base_model_record(cfg)
    if base.get("name") != mine["name"] or (base.get("hub_id") or None) != (mine["hub_id"] or None):
        raise UserError(f"model.path={str(path)!r} is a LoRA adapter for model={base.get('name')}, not "
                        f"model={mine['name']}; pass model={base.get('name')} model.path={path}")


def is_adapter(model_cfg: DictConfig) -> bool:
    """`model.path` is a peft adapter (a LoRA checkpoint) rather than a full model directory."""
    return bool(model_cfg.get("path")) and (Path(model_cfg.path) / "adapter_config.json").exists()
