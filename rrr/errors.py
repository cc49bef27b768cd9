"""The errors a user can fix, and the net that turns a library's exception into one of them.

The CLI prints a `UserError` as one line, without a traceback, and exits non-zero (2 for a `ConfigError`):
the message says what to do next. Plain Python, imports nothing from rrr (every layer may raise these).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


class UserError(RuntimeError):
    """An error the user can fix (bad input, missing file, offline hub): the CLI prints the message as
    one line, without a traceback, and exits non-zero. The message says what to do next."""


class ConfigError(UserError, ValueError):
    """A bad override: unknown key, unknown group option, or a value of the wrong type."""


@contextlib.contextmanager
def library_errors(building: str, settings: str) -> Iterator[None]:
    """The net under rrr.validate's checks: an exception a library raises while the run is built (model
    load, peft, engine) becomes one line naming the settings involved. RRR_TRACEBACK=1 keeps the traceback."""
    try:
        yield
    except (UserError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 — transformers, peft and vLLM raise many types
        if os.environ.get("RRR_TRACEBACK"):
            raise
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(f"{building} failed ({type(e).__name__}: {text}); check {settings} "
                        "(RRR_TRACEBACK=1 shows the traceback)") from None
