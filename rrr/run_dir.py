"""A run directory and its life cycle, the same for every command.

Layout: `outputs/<command>/<YYYYmmdd-HHMMSS>[-name]/` with `config.yaml` (resolved), `manifest.json`
(rrr.provenance + what the command adds) and what the command writes. The life cycle:

    rundir = RunDir.open(cfg, COMMAND, fingerprint)  # plan (name it), lock it if it exists, check_resumable
    ...validate inputs, read what an earlier invocation left (parts, checkpoints), load the model...
    rundir.claim()                                   # create it, lock it, announce it
    rundir.write_run_files(cfg, extra={...})         # config.yaml + manifest.json (fingerprint included)
    ...write results atomically (rrr.atomic, rrr.parts)...
    rundir.finish(summary=...)                       # manifest: finished (+ fields)

So a failed start leaves no empty or half-configured run behind, a resume with other settings is refused
before any work, and one process writes a run dir at a time (rrr.run_lock). Under torchrun rank 0 names
the directory for all ranks and is its only writer.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rrr.atomic import atomic_write_json, atomic_write_text
from rrr.config import UserError
from rrr.provenance import manifest_fields, now
from rrr.run_lock import lock_run_dir

CURRENT_RUN: Path | None = None     # the run dir this process writes (for the Ctrl-C message)


@dataclass
class RunDir:
    path: Path
    command: str
    fingerprint: dict[str, Any] | None = None     # what must not change on a resume (set by check_resumable)

    @classmethod
    def plan(cls, cfg: DictConfig, command: str) -> RunDir:
        """Name the run directory (rank 0 names it for every rank; it is not created yet) and, if it
        exists (a resume), lock it before anything reads it: one writer per run dir."""
        from rrr import distributed as dist

        path = dist.from_main(lambda: plan_run_dir(cfg, command))
        if path.is_dir() and dist.is_main():
            lock_run_dir(path)
        return cls(path, command)

    @classmethod
    def open(cls, cfg: DictConfig, command: str, fingerprint: dict[str, Any],
             former_names: tuple[str, ...] = ()) -> RunDir:
        """`plan`, then `check_resumable(fingerprint, former_names)`."""
        run = cls.plan(cfg, command)
        run.check_resumable(fingerprint, former_names)
        return run

    def check_resumable(self, fingerprint: dict[str, Any], former_names: tuple[str, ...] = ()) -> None:
        """Refuse a run dir of another command (`former_names`: what this command was called before) or
        one run with other settings; remember the fingerprint for the manifest."""
        check_resumable(self.path, self.command, fingerprint, former_names)
        self.fingerprint = fingerprint

    def claim(self) -> Path:
        """Create the directory, lock it (rank 0) and say where the command writes."""
        return claim_run_dir(self.path)

    def write_run_files(self, cfg: DictConfig, extra: dict[str, Any] | None = None) -> None:
        """config.yaml and manifest.json (with the resume fingerprint); rank 0 only."""
        fields = {"resume_fingerprint": self.fingerprint} if self.fingerprint is not None else {}
        write_run_files(self.path, cfg, self.command, extra={**fields, **(extra or {})})

    def update_manifest(self, **fields: Any) -> None:
        """Add or replace manifest fields; rank 0 only."""
        from rrr import distributed as dist

        if dist.is_main():
            update_manifest(self.path, **fields)

    def finish(self, **fields: Any) -> None:
        """The run is complete: `finished` (and `fields`) in the manifest; rank 0 only."""
        self.update_manifest(**fields, finished=now())

    def manifest(self) -> dict[str, Any] | None:
        return read_manifest(self.path)


# ----------------------------------------------------------------------------- the steps, as functions

def plan_run_dir(cfg: DictConfig, command: str) -> Path:
    """The run directory, not created yet: `cfg.run_dir` if given (continue/resume), else a new
    timestamped one under `out_root`. A command creates it with `claim_run_dir` only once its inputs are
    valid and its model loaded, so a failed start leaves no empty or half-configured run behind."""
    if cfg.get("run_dir"):
        run = Path(cfg.run_dir)
        if run.exists() and not run.is_dir():
            raise UserError(f"run_dir={str(run)!r} is a file, not a directory; pass a run directory or drop run_dir=")
        return run
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{cfg.name}" if cfg.get("name") else stamp
    root = Path(cfg.get("out_root") or "outputs")
    for parent in (root, *root.parents):
        if parent.exists():
            if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"out_root={str(root)!r} cannot be created: {parent} is "
                                f"{'not a directory' if not parent.is_dir() else 'not writable'}")
            break
    run = root / command / name
    i = 1
    while run.exists():
        run = run.with_name(f"{name}-{i}")
        i += 1
    return run


def claim_run_dir(run: Path) -> Path:
    """Create `run` (if needed), take its lock and say where the command writes. Under torchrun only
    rank 0 does (it is the only writer); the other ranks get the path."""
    from rrr import distributed

    if not distributed.is_main():
        return run
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the run directory {run}: {e.strerror or e}") from None
    lock_run_dir(run)
    global CURRENT_RUN
    CURRENT_RUN = run
    print(f"run dir: {run}", flush=True)
    return run


def new_run_dir(cfg: DictConfig, command: str) -> Path:
    """`plan_run_dir` + `claim_run_dir` in one go (for callers with nothing to check in between)."""
    return claim_run_dir(plan_run_dir(cfg, command))


def write_run_files(run: Path, cfg: DictConfig, command: str, extra: dict[str, Any] | None = None) -> None:
    """config.yaml (resolved) and manifest.json; an existing manifest keeps its start time. Under torchrun
    only rank 0 writes them."""
    from rrr import distributed

    if not distributed.is_main():
        return
    atomic_write_text(run / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    manifest: dict[str, Any] = read_manifest(run) or {}
    manifest.setdefault("started", now())
    manifest.update(manifest_fields(cfg, command))
    if extra:
        manifest.update(extra)
    atomic_write_json(run / "manifest.json", manifest)


def update_manifest(run: Path, **fields: Any) -> None:
    manifest = read_manifest(run) or {}
    manifest.update(fields)
    atomic_write_json(run / "manifest.json", manifest)


def read_manifest(run: Path) -> dict[str, Any] | None:
    """The run's manifest.json (None when there is none); a corrupt one is one clear error."""
    path = run / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
        return manifest
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt ({type(e).__name__}); restore it, or drop run_dir=... to start "
                        "a new run") from None


def check_resumable(run: Path, command: str, fp: dict[str, Any], former_names: tuple[str, ...] = ()) -> None:
    old = read_manifest(run)
    if old is None:
        return
    if old.get("command") not in (command, *former_names):
        raise UserError(f"{run} is a {old.get('command')!r} run, not {command!r}; pass a {command} run_dir or none")
    if old.get("resume_fingerprint") not in (None, fp):
        changed = changed_keys(old["resume_fingerprint"], fp)
        raise UserError(f"{run} was run with different settings ({', '.join(changed[:6])}"
                        f"{', ...' if len(changed) > 6 else ''}); use the same overrides to continue it, "
                        "or drop run_dir=... to start a new run")


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (`model.lora.r`, `train.lr`)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return [] if old == new else [prefix or "(all)"]
    out: list[str] = []
    for key in sorted(set(old) | set(new), key=str):
        out += changed_keys(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
    return out
