"""Settings no run can use, refused before any work (one line each; issue #12, item 4).

Each command calls `check(cfg, command)` first: sampling knobs of every segment it samples, the data
limits it reads, and the knobs only one command uses (train.lr, eval.bootstrap_samples). The Countdown
generator bounds its own knobs (`rrr.tasks.countdown.Knobs.check`).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from rrr.config import UserError
from rrr.episode import SAMPLED_SEGMENTS as SAMPLED


def check_sampling(node: Any, where: str) -> None:
    """temperature >= 0 (0 = greedy in both engines), 0 < top_p <= 1, max_tokens >= 1."""
    t, p, m = node.get("temperature", 1.0), node.get("top_p", 1.0), node.get("max_tokens")
    if _num(t, f"{where}.temperature") < 0:
        raise UserError(f"{where}.temperature={t} must be >= 0 (0 = greedy)")
    if not 0 < _num(p, f"{where}.top_p") <= 1:
        raise UserError(f"{where}.top_p={p} must be in (0, 1] (1 = no nucleus cut)")
    if m is None or _num(m, f"{where}.max_tokens") < 1 or int(m) != float(m):
        raise UserError(f"{where}.max_tokens={m} must be an integer >= 1")


def check_limit(value: Any, where: str) -> None:
    if value is not None and (_num(value, where) < 0 or int(value) != float(value)):
        raise UserError(f"{where}={value} must be null (all examples) or an integer >= 0")


def check(cfg: DictConfig, command: str) -> None:
    if command == "collect-failures":
        check_sampling(cfg.collect, "collect")
        check_limit(cfg.data.limit, "data.limit")
    elif command == "evaluate":
        for seg in SAMPLED:
            check_sampling(cfg.eval.sampling[seg], f"eval.sampling.{seg}")
        check_limit(cfg.eval.limit, "eval.limit")
        if _num(cfg.eval.bootstrap_samples, "eval.bootstrap_samples") < 1:
            raise UserError(f"eval.bootstrap_samples={cfg.eval.bootstrap_samples} must be >= 1 (default 2000)")
    elif command == "train":
        for seg in SAMPLED:
            check_sampling(cfg.train.sampling[seg], f"train.sampling.{seg}")
        if not _num(cfg.train.lr, "train.lr") > 0:
            raise UserError(f"train.lr={cfg.train.lr} must be > 0")
        for key in ("beta", "epsilon", "epsilon_high", "max_grad_norm", "weight_decay"):
            if _num(cfg.train[key], f"train.{key}") < 0:
                raise UserError(f"train.{key}={cfg.train[key]} must be >= 0")
        if not 0 <= _num(cfg.train.min_pass_rate, "train.min_pass_rate") <= \
                _num(cfg.train.max_pass_rate, "train.max_pass_rate") <= 1:
            raise UserError("train.min_pass_rate <= train.max_pass_rate must both lie in [0, 1]")
    if cfg.task.name == "countdown" and cfg.task.source == "generated":
        from rrr.tasks.countdown import Knobs

        Knobs.from_cfg(cfg.task.generated)


def _num(value: Any, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}={value!r} is not a number") from None


def check_logger(cfg: DictConfig) -> None:
    """logger.mode=online needs a wandb login; without one wandb would prompt or fail mid-setup."""
    logger = cfg.get("logger") or {}
    if logger.get("name") != "wandb":
        return
    mode = str(logger.get("mode", "offline"))
    if mode not in ("online", "offline", "disabled"):
        raise UserError(f"logger.mode={mode!r}; valid choices: online, offline, disabled")
    if mode == "online" and not wandb_logged_in():
        raise UserError("logger.mode=online needs a wandb login: run `wandb login` or set WANDB_API_KEY, "
                        "or use logger.mode=offline (sync later with `wandb sync`)")


def wandb_logged_in() -> bool:
    """An API key in WANDB_API_KEY or in ~/.netrc for the wandb host (where `wandb login` puts it)."""
    import netrc
    import os
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        auth = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])
