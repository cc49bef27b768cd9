"""Atomic training checkpoints and resume.

A checkpoint is a directory `checkpoints/step_NNNNN/` (or `checkpoints/final/`) that is itself a Hugging
Face model directory (the LoRA adapter or the full model, + tokenizer), so `model.path=<ckpt>` and plain
transformers/peft load it, plus what decides the rest of the run:

    state.json          step, data cursor, wandb run id (human-readable)
    trainer_state.pt    optimizer, LR scheduler, every RNG (python, numpy, torch; cuda per visible device)
    COMPLETE            written last; a directory without it is ignored

An FSDP-sharded policy (train.parallel=fsdp) instead keeps model and optimizer state as every rank's
shards in `sharded/` (torch.distributed.checkpoint: one file per rank, nothing gathered; a resume on
another rank count re-shards while reading) and the HF config and tokenizer beside them; `final` also
holds the gathered weights in HF format, for `rrr evaluate model.path=...`.

It is written into a temp directory next to its final place and renamed only when complete, so a run
killed at any moment (SIGKILL included) never leaves a half-written checkpoint where resume looks.
Retention (`train.keep_checkpoints`) deletes the same way in reverse: an old checkpoint is first renamed
to a tombstone (`.step_NNNNN.deleted`, which the loader never looks at), then removed.
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
TOMBSTONE = ".deleted"
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
    """Restore the CPU generators always, the CUDA ones only onto the same number of visible devices.

    What makes a resumed run replay the uninterrupted one is on the CPU: the data cursor (state.json),
    the sampling seeds (derived from run seed, step, example and sample, not drawn) and the CPU RNGs
    here. The CUDA RNG only feeds dropout on the GPU; a checkpoint written where 8 GPUs were visible
    must still resume where 4 are (torch's set_rng_state_all would fail on device 4), so it is skipped
    with a note rather than calling a good checkpoint damaged."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if not cuda:
        return
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda) != visible:
        _note(f"the checkpoint holds the CUDA RNG of {len(cuda)} device(s), this process sees {visible}: "
              "CUDA RNG not restored (it only affects GPU dropout; sampling seeds and data order are exact)")
        return
    torch.cuda.set_rng_state_all(cuda)


def _note(message: str) -> None:
    import sys

    if dist.is_main():
        print(f"note: {message}", file=sys.stderr, flush=True)


def save_checkpoint(run_dir: str | Path, name: str, *, model, tokenizer, optimizer, scheduler,
                    step: int, cursor: dict[str, Any], wandb_run_id: str | None) -> Path:
    """Write `run_dir/checkpoints/<name>/` atomically; return its path. Distributed: rank 0 writes it
    (FSDP: every rank writes its shards into the temp dir rank 0 names, then rank 0 completes it)."""
    final = Path(run_dir) / "checkpoints" / name
    if fsdp.is_sharded(model):
        return _save_sharded(final, name, model, tokenizer, optimizer, scheduler, step, cursor, wandb_run_id)
    if not dist.is_main():
        return final
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)                 # adapter only for a PeftModel, else the full model
        _write_rest(tmp, model, tokenizer, optimizer.state_dict(), scheduler, step, cursor, wandb_run_id)
    return final


def _save_sharded(final: Path, name: str, model, tokenizer, optimizer, scheduler, step, cursor, wandb_run_id):
    import shutil
    import tempfile

    def make_tmp() -> str:
        final.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")

    tmp = Path(dist.from_main(make_tmp))                                # one temp dir, named by rank 0
    try:
        fsdp.save_sharded(model, optimizer, tmp / fsdp.SHARDED)         # every rank: its own shard file
        hf_state = fsdp.full_state(model)[0] if name == "final" else None   # `final`: HF weights too
        if dist.is_main():
            if hf_state is not None:
                model.save_pretrained(tmp, state_dict=hf_state)
            else:
                model.config.save_pretrained(tmp)
            _write_rest(tmp, model, tokenizer, None, scheduler, step, cursor, wandb_run_id)
            if final.exists():
                shutil.rmtree(final)
            tmp.replace(final)
    finally:
        if dist.is_main() and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()                                   # no rank goes on before the checkpoint is in place
    return final


def _write_rest(tmp: Path, model, tokenizer, optimizer_state, scheduler, step, cursor, wandb_run_id) -> None:
    record_base_model(model, tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                "rng": rng_state()}, tmp / TRAINER_STATE)
    (tmp / STATE_JSON).write_text(json.dumps(
        {"step": step, "cursor": cursor, "wandb_run_id": wandb_run_id}, indent=2) + "\n")
    (tmp / COMPLETE).write_text(f"{step}\n")     # last: its presence means everything above is there


def record_base_model(model, directory: Path) -> None:
    """An adapter names the base model it belongs to (`rrr_base_model.json`; peft's own
    `base_model_name_or_path` is null or a cache path for embedded and random models), so loading it
    onto another base model is refused with one line (rrr.adapters.check_adapter_base)."""
    from rrr.adapters import BASE_MODEL_FILE

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
    """Delete temp checkpoint dirs and tombstones a killed run left behind (one trainer per run dir, so
    none is live)."""
    import shutil

    root = Path(run_dir) / "checkpoints"
    for pattern in (".*.tmp", f".*{TOMBSTONE}"):
        for p in root.glob(pattern) if root.is_dir() else []:
            shutil.rmtree(p, ignore_errors=True)


def prune_checkpoints(run_dir: str | Path, keep: int | None, newest_step: int) -> list[Path]:
    """After the checkpoint of `newest_step` is written: keep it and the newest `keep` − 1 complete step
    checkpoints before it (and `final`), delete the older ones; rank 0 only; None or 0 keeps all.

    The one a resume would load (the one just written) is always kept. Dirs of a later step (left by a
    run that fell back past a damaged checkpoint; the run overwrites them when it gets there), temp and
    incomplete dirs are not touched. Crash-safe: each victim is renamed to a tombstone first (atomic; the
    loader skips dot-names), then removed, so a kill midway leaves either the whole checkpoint or none
    that resume could pick. Returns the deleted paths."""
    import shutil

    if not keep or not dist.is_main():
        return []
    steps = [(int(m.group(1)), p) for p in complete_checkpoints(run_dir) if (m := _STEP_DIR.match(p.name))]
    older = sorted((sp for sp in steps if sp[0] <= newest_step), reverse=True)   # newest first, by name
    deleted = []
    for _, old in older[max(int(keep), 1):]:
        tomb = old.with_name(f".{old.name}{TOMBSTONE}")
        old.rename(tomb)
        shutil.rmtree(tomb, ignore_errors=True)
        deleted.append(old)
    return deleted


def load_checkpoint(path: Path, *, model, optimizer, scheduler) -> Resume:
    """Load adapter/model weights, optimizer, scheduler and RNG state from `path` in place."""
    if not is_complete(path):
        raise UserError(f"checkpoint {path} is incomplete (no {COMPLETE} marker); delete it and resume again")
    trainer_state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=False)
    if (path / fsdp.SHARDED).is_dir():               # FSDP shards: model and optimizer, re-sharded on load
        if not fsdp.is_sharded(model):
            raise UserError(f"checkpoint {path} holds FSDP shards; resume it with train.parallel=fsdp under torchrun")
        fsdp.load_sharded(model, optimizer, path / fsdp.SHARDED)
    elif fsdp.is_sharded(model):                     # a gathered FSDP checkpoint of an earlier version
        _load_weights(model, path)
        fsdp.load_full_state(model, optimizer, None, trainer_state["optimizer"])
    else:
        _load_weights(model, path)
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
