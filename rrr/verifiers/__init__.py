"""Binary verifiers. Pure Python: importing this package must not import torch.

Every verifier returns a Verdict and never raises on model text; they never eval/exec it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VERIFIER_VERSION = "2"   # 2: BFCL list-of-dicts accepts [] for an optional param, as plain lists do


@dataclass(frozen=True)
class Verdict:
    correct: bool
    reason: str          # short, human-readable; "ok" when correct
    parsed: Any = None   # what the verifier read from the completion (None when nothing parsed)
