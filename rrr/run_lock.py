"""One writer per run directory: `run/.lock` holds the writer's PID and host.

A second command on a held run dir gets one line naming the holder; a lock left by a dead process
(kill -9) on this host is taken over; the lock is removed when the process exits. Under torchrun only
rank 0 writes run files, so only rank 0 takes the lock.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rrr.config import UserError

LOCK = ".lock"
_HELD: set[Path] = set()


def lock_run_dir(run: Path) -> None:
    """Make this process the only writer of `run` (see the module docstring)."""
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
