"""Atomic training checkpoints and resume.

A checkpoint is a directory `checkpoints/step_NNNNN/` (or `checkpoints/final/`) that is itself a Hugging
Face model directory (the LoRA adapter or the full model, + tokenizer), so `model.path=<ckpt>` and plain
transformers/peft load it, plus what decides the rest of the run:

    state.json          step, data cursor, wandb run id (human-readable)
    trainer_state.pt    optimizer, LR scheduler, every RNG (python, numpy, torch, cuda)
    COMPLETE            written last; a directory without it is ignored

It is written into a temp directory next to its final place and renamed only when complete, so a run
killed at any moment (SIGKILL included) never leaves a half-written checkpoint where resume looks.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rrr import distributed as dist
from rrr import fsdp
from rrr.config import UserError
from rrr.atomic import atomic_dir

COMPLETE = "COMPLETE"
STATE_JSON = "state.json"
TRAINER_STATE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class Resume:
    """What a checkpoint hands back to the trainer (the weights are loaded in place)."""
    path: Path
    step: int
    cursor: dict[str, Any]
    wandb_run_id: str | None


def checkpoint_name(step: int) -> str:
    return f"step_{step:05d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, name: str, *, model, tokenizer, optimizer, scheduler,
                    step: int, cursor: dict[str, Any], wandb_run_id: str | None) -> Path:
    """Write `run_dir/checkpoints/<name>/` atomically; return its path. Distributed: rank 0 writes it."""
    final = Path(run_dir) / "checkpoints" / name
    model_state, optimizer_state = fsdp.full_state(model, optimizer) if fsdp.is_sharded(model) else \
        (None, optimizer.state_dict())    # FSDP: gathered (a collective, every rank), HF format on disk
    if not dist.is_main():
        return final
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp, state_dict=model_state)   # adapter only for a PeftModel, else the full model
        record_base_model(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "rng": rng_state()}, tmp / TRAINER_STATE)
        (tmp / STATE_JSON).write_text(json.dumps(
            {"step": step, "cursor": cursor, "wandb_run_id": wandb_run_id}, indent=2) + "\n")
        (tmp / COMPLETE).write_text(f"{step}\n")     # last: its presence means everything above is there
    return final


def record_base_model(model, directory: Path) -> None:
    """An adapter names the base model it belongs to (`rrr_base_model.json`; peft's own
    `base_model_name_or_path` is null or a cache path for embedded and random models), so loading it
    onto another base model is refused with one line (rrr.models.check_adapter_base)."""
    from rrr.models import BASE_MODEL_FILE

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    record = getattr(base, "rrr_base_model", None)
    if record is not None and (directory / "adapter_config.json").exists():
        (directory / BASE_MODEL_FILE).write_text(json.dumps(record, indent=2) + "\n")


def is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and (path / COMPLETE).is_file()


def checkpoint_step(path: Path) -> int:
    return int(json.loads((path / STATE_JSON).read_text())["step"])


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, newest first (`final` wins a tie); temp and partial dirs are skipped, and a
    checkpoint whose state.json is unreadable sorts last (it is tried, and refused, only after the rest)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if is_complete(p) and (_STEP_DIR.match(p.name) or p.name == "final")]
    return sorted(done, key=lambda p: (_step_or_none(p) is not None, _step_or_none(p) or 0, p.name == "final"),
                  reverse=True)


def _step_or_none(path: Path) -> int | None:
    try:
        return checkpoint_step(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step (`final` wins a tie)."""
    found = complete_checkpoints(run_dir)
    return found[0] if found else None


def load_latest_checkpoint(run_dir: str | Path, *, model, optimizer, scheduler) -> Resume | None:
    """Resume from the newest complete checkpoint that loads; a damaged one (a corrupt weights file,
    optimizer state or state.json) is skipped with a warning for the previous complete one. None when
    the run has no checkpoint; one clear error when none of them loads."""
    import sys

    tried = []
    for path in complete_checkpoints(run_dir):
        try:
            return load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
        except Exception as e:  # noqa: BLE001 — safetensors, torch.load and json raise many types
            why = str(e).splitlines()[0][:160] if isinstance(e, UserError) else type(e).__name__
            print(f"warning: checkpoint {path} cannot be loaded ({why}); falling back to the previous "
                  "complete checkpoint", file=sys.stderr)
            tried.append(path.name)
    if tried:
        raise UserError(f"no checkpoint in {Path(run_dir) / 'checkpoints'} loads (tried {', '.join(tried)}); "
                        "delete the damaged ones to restart from an earlier step, or drop run_dir=... to start over")
    return None


def remove_partial(run_dir: str | Path) -> None:
    """Delete temp checkpoint dirs a killed run left behind (one trainer per run dir, so none is live)."""
    import shutil

    root = Path(run_dir) / "checkpoints"
    for p in root.glob(".*.tmp") if root.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, *, model, optimizer, scheduler) -> Resume:
    """Load adapter/model weights, optimizer, scheduler and RNG state from `path` in place."""
    if not is_complete(path):
        raise UserError(f"checkpoint {path} is incomplete (no {COMPLETE} marker); delete it and resume again")
    _load_weights(model, path)
    trainer_state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=False)
    if fsdp.is_sharded(model):
        fsdp.load_full_state(model, optimizer, None, trainer_state["optimizer"])
    else:
        optimizer.load_state_dict(trainer_state["optimizer"])
    scheduler.load_state_dict(trainer_state["scheduler"])
    set_rng_state(trainer_state["rng"])
    state = json.loads((path / STATE_JSON).read_text())
    return Resume(path=path, step=int(state["step"]), cursor=state["cursor"],
                  wandb_run_id=state.get("wandb_run_id"))


def _load_weights(model, path: Path) -> None:
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        result = set_peft_model_state_dict(model, load_peft_weights(str(path), device="cpu"))
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            raise UserError(f"adapter in {path} does not match the model (missing {missing[:3]}, "
                            f"unexpected {result.unexpected_keys[:3]}); resume with the same model= and LoRA config")
        return
    from safetensors.torch import load_file

    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise UserError(f"no model weights in checkpoint {path}; delete it and resume again")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if fsdp.is_sharded(model):
        fsdp.load_full_state(model, None, state, None)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied weights (e.g. lm_head = embed_tokens) are saved once; anything else missing is a mismatch
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise UserError(f"weights in {path} do not match the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); resume with the same model=")


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or []
    if isinstance(tied, dict):
        tied = list(tied.keys())
    return set(tied)
