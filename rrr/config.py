"""Compose the Hydra config from `conf/` and `key=value` overrides, and fail early with one clear line.

We use Hydra's compose API (not `@hydra.main`) so the typer CLI owns argument parsing and `rrr` owns
run directories. Hydra already refuses unknown keys; we add two checks it does not do for plain YAML:
unknown group options are reported with the valid choices, and a value whose type does not match the
default's type (e.g. `train.lr=fast`) is refused before any work starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from rrr.errors import ConfigError, UserError  # noqa: F401  (re-exported: `from rrr.config import UserError`)

CONF_DIR = Path(os.environ.get("RRR_CONF", Path(__file__).resolve().parent.parent / "conf"))
GROUPS = ("task", "model", "engine", "prompts", "collect", "train", "eval", "forgetting", "logger", "experiment")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _split(override: str) -> tuple[str, str]:
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not key=value (e.g. train.lr=1e-6)")
    key, value = override.split("=", 1)
    return key.strip(), value


def _check_groups(overrides: list[str]) -> None:
    for ov in overrides:
        key, value = _split(ov)
        key = key.lstrip("+~")
        if key in GROUPS:
            choices = group_options(key)
            if value not in choices:
                raise ConfigError(f"unknown {key} option {value!r}; valid choices: {', '.join(choices)}")


def _type_name(v: Any) -> str:
    return type(v).__name__


def _compatible(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)
    if isinstance(default, (list, ListConfig)):
        return isinstance(value, (list, ListConfig))
    if isinstance(default, (dict, DictConfig)):
        return isinstance(value, (dict, DictConfig))
    return True


def _check_types(base: DictConfig, cfg: DictConfig, overrides: list[str]) -> None:
    for ov in overrides:
        key, _ = _split(ov)
        if key.startswith(("+", "~")) or key in GROUPS or key.startswith("hydra"):
            continue
        default = OmegaConf.select(base, key, default=None, throw_on_missing=False)
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value)
        if not _compatible(default, value):
            raise ConfigError(
                f"{key}={value!r} has type {_type_name(value)}, but {key} expects "
                f"{_type_name(default)} (default {default!r})"
            )


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose `conf/config.yaml` with overrides; raise ConfigError with one readable line on bad input."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException, HydraException
    from omegaconf.errors import OmegaConfBaseException

    from rrr.config_schema import register

    register()
    overrides = list(overrides or [])
    _check_groups(overrides)
    group_only = [o for o in overrides if _split(o)[0].lstrip("+~") in GROUPS]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            base = hydra_compose("config", overrides=group_only)
            cfg = hydra_compose("config", overrides=overrides)
    except (ConfigCompositionException, HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_explain(e, overrides)) from None
    finally:
        GlobalHydra.instance().clear()
    _check_types(base, cfg, overrides)
    OmegaConf.set_struct(cfg, True)
    return cfg


def _schema_error(e: Exception, overrides: list[str]) -> str | None:
    """A value the typed schema (rrr/config_schema.py) refuses, in the same words as `_check_types`:
    a choice that does not exist names the valid ones; a value of the wrong type names the type."""
    import re

    from omegaconf.errors import ValidationError

    cause = e
    while cause is not None and not isinstance(cause, ValidationError):
        cause = cause.__cause__ or cause.__context__
    if cause is None or not getattr(cause, "full_key", None):
        return None
    key, text = cause.full_key, str(cause).splitlines()[0]
    given = next((_split(o)[1] for o in overrides if _split(o)[0].lstrip("+~") == key), None)
    choice = re.match(r"Invalid value '(.*)', expected one of \[(.*)\]", text)
    if choice:
        return f"{key}={choice.group(1)!r}; valid choices: {choice.group(2)}"
    typed = re.match(r"Value '(.*)' of type '(\w+)' could not be converted to (\w+)", text)
    if typed:
        value = given if given is not None else typed.group(1)
        shown = repr(value) if typed.group(2) == "str" else value
        expects = {"Integer": "int", "Float": "float", "Boolean": "bool"}.get(typed.group(3), typed.group(3))
        return f"{key}={shown} has type {typed.group(2)}, but {key} expects {expects}"
    return None


def _explain(e: Exception, overrides: list[str]) -> str:
    schema = _schema_error(e, overrides)
    if schema:
        return schema
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    cause = e.__cause__ or e.__context__
    detail = str(cause).strip().splitlines()[0] if cause and str(cause).strip() else ""
    text = f"{msg} {detail}".strip()
    if "Could not override" in text or "Key '" in text or "not in struct" in text:
        for ov in overrides:
            key = _split(ov)[0].lstrip("+~")
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            if f"'{key}'" in text or f"'{key.rsplit('.', 1)[-1]}'" in text:
                return f"unknown config key {key!r}{_valid_keys(parent, overrides)}"
    return f"invalid configuration: {text}"


def _valid_keys(parent: str, overrides: list[str]) -> str:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    group_only = [o for o in overrides if _split(o)[0].lstrip("+~") in GROUPS]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            base = hydra_compose("config", overrides=group_only)
    except Exception:
        return ""
    finally:
        GlobalHydra.instance().clear()
    node = OmegaConf.select(base, parent) if parent else base
    if isinstance(node, DictConfig):
        where = f" under {parent!r}" if parent else ""
        return f"; valid keys{where}: {', '.join(str(k) for k in node.keys())}"
    return ""


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
