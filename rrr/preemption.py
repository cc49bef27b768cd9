"""Save on signal: SIGTERM or SIGUSR1 (what SLURM sends before it preempts or times out a job, with
`--signal=USR1@90`) asks a run to stop at its next safe point, write what it has, and exit with
`EXIT_RESUME` = 75 (EX_TEMPFAIL: "try again"), so a job script requeues the same command.

The handler only sets a flag; the pipelines poll it where stopping loses nothing: `rrr train` after a
finished step (it then writes that step's checkpoint), `collect-failures` and `evaluate` after a written
part. Under torchrun the ranks agree first (`requested_everywhere`: an all-reduce of the flag at the same
point on every rank), so they all stop after the same step, even if the signal reached only some of them.
A second signal while stopping is ignored (the save is already under way); SIGKILL still loses only the
step or part in flight (checkpoints and parts are written atomically).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

from rrr import distributed as dist

EXIT_RESUME = 75
POLLED = ("trainer", "failures", "evaluate")    # the pipelines that poll the flag; others keep the defaults
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_state: dict[str, Any] = {"signal": None, "previous": {}}


class Preempted(Exception):
    """Raised by a pipeline that stopped on a signal after saving; the CLI exits with EXIT_RESUME."""

    def __init__(self, run_dir: Path, saved: str):
        self.run_dir, self.saved = Path(run_dir), saved
        name = signal.Signals(_state["signal"]).name if _state["signal"] else "a signal"
        super().__init__(f"stopped on {name}: {saved}; resume with the same command and run_dir={run_dir} "
                         f"(exit code {EXIT_RESUME})")


def install() -> bool:
    """Catch SIGTERM and SIGUSR1 in this process (the main thread only: elsewhere Python cannot); the flag
    starts cleared. True when installed."""
    _state["signal"] = None
    try:
        _state["previous"] = {s: signal.signal(s, _on_signal) for s in SIGNALS}
    except ValueError:                      # not the main thread (e.g. a test runner's worker thread)
        return False
    return True


def uninstall() -> None:
    for s, previous in _state["previous"].items():
        signal.signal(s, previous)
    _state["previous"] = {}


def _on_signal(signum: int, frame) -> None:
    if _state["signal"] is None:
        _state["signal"] = signum
        if dist.is_main():
            print(f"\n{signal.Signals(signum).name} received: stopping after the current step/part to save "
                  f"(then exit {EXIT_RESUME}: resume me)", file=sys.stderr, flush=True)


def requested() -> bool:
    """This process got a signal."""
    return _state["signal"] is not None


def requested_everywhere() -> bool:
    """Any rank got a signal (a collective: every rank calls it at the same point)."""
    return dist.all_reduce_max(1.0 if requested() else 0.0) > 0
