"""The `rrr` command line. Each command composes the Hydra config from `key=value` overrides and calls
one pipeline function; `--cfg` prints the resolved config instead of running."""

from __future__ import annotations

import sys
from importlib import import_module
from pathlib import Path
from typing import Callable, List, Optional

import typer

from rrr.config import ConfigError, UserError, compose, to_yaml

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Reflect, Retry, Reward: collect failures, train reflections with GRPO, evaluate, "
                       "check forgetting, compare.")

EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
OVERRIDES = typer.Argument(None, help="Hydra overrides, e.g. task=countdown model=smollm2-135m train.lr=1e-6")
SHOW_CFG = typer.Option(False, "--cfg", help="Print the resolved config and exit.")


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", 0))


def _fail(msg: str, code: int, every_rank: bool = False) -> None:
    if _rank() == 0 or every_rank:       # every rank meets the same error: one line, from rank 0
        typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _run(module: str, overrides: list[str] | None, show_cfg: bool) -> None:
    try:
        cfg = compose(overrides or [])
    except ConfigError as e:
        _fail(str(e), 2)
    if show_cfg:
        typer.echo(to_yaml(cfg))
        return
    run: Callable = import_module(f"rrr.{module}").run
    from rrr import distributed, preemption

    try:                                 # under torchrun / accelerate launch: join the process group
        distributed.init(cfg.get("dist", {}).get("timeout_s"))
    except ConfigError as e:
        _fail(str(e), 2)
    if module in preemption.POLLED:      # SIGTERM / SIGUSR1: save at the next safe point, exit 75
        preemption.install()
    try:
        run(cfg)
    except preemption.Preempted as e:
        if _rank() == 0:
            typer.echo(str(e), err=True)
        raise typer.Exit(preemption.EXIT_RESUME)
    except ConfigError as e:             # a setting refused before the model loads (rrr.validate)
        _fail(str(e), 2)
    except distributed.CollectiveTimeout as e:     # only the ranks that waited know: each says so
        _fail(str(e), 1, every_rank=True)
    except UserError as e:
        _fail(str(e), 1)
    except RuntimeError as e:            # a collective outside rrr.distributed's (FSDP's) timed out
        if not distributed.is_timeout(e):
            raise
        _fail(distributed.timeout_message(), 1, every_rank=True)
    except KeyboardInterrupt:
        from rrr.run_dir import CURRENT_RUN

        typer.echo("", err=True)                   # off the progress bar's line
        if CURRENT_RUN is None:
            _fail("interrupted before anything was written", 130)
        _fail(f"interrupted; everything written so far is kept. To continue, re-run the same command with\n"
              f"  run_dir={CURRENT_RUN}", 130)
    finally:
        preemption.uninstall()
        distributed.destroy()


@app.command("collect-failures", context_settings=EXTRA)
def collect_failures(overrides: Optional[List[str]] = OVERRIDES, cfg: bool = SHOW_CFG) -> None:
    """Sample each training query k times, verify, keep the failures (failures.parquet)."""
    _run("failures", overrides, cfg)


@app.command(context_settings=EXTRA)
def train(overrides: Optional[List[str]] = OVERRIDES, cfg: bool = SHOW_CFG) -> None:
    """Reflection-masked GRPO on a failure set (train.failures=RUN_DIR)."""
    _run("trainer", overrides, cfg)


@app.command(context_settings=EXTRA)
def evaluate(overrides: Optional[List[str]] = OVERRIDES, cfg: bool = SHOW_CFG) -> None:
    """First-try and second-try accuracy with controls, on the test split."""
    _run("evaluate", overrides, cfg)


@app.command("failure-eval", context_settings=EXTRA)
def failure_eval(overrides: Optional[List[str]] = OVERRIDES, cfg: bool = SHOW_CFG) -> None:
    """R reflections -> retries per held-out failure (eval.failures=RUN_DIR of collect-failures on the test split), with controls."""
    _run("failure_eval", overrides, cfg)


@app.command(context_settings=EXTRA)
def forgetting(overrides: Optional[List[str]] = OVERRIDES, cfg: bool = SHOW_CFG) -> None:
    """The forgetting check: lm-eval-harness tasks (forgetting.tasks) on the model, adapter applied."""
    _run("forgetting", overrides, cfg)


@app.command(context_settings=EXTRA, hidden=True)
def benchmark(overrides: Optional[List[str]] = OVERRIDES, cfg: bool = SHOW_CFG) -> None:
    """The former name of `rrr forgetting` (its `bench.*` settings are `forgetting.*` now)."""
    typer.echo("note: `rrr benchmark` is now `rrr forgetting` (bench.* settings are forgetting.*); running that",
               err=True)
    _run("forgetting", [_renamed_override(o) for o in overrides or []], cfg)


def _renamed_override(override: str) -> str:
    """`bench.limit=3` → `forgetting.limit=3` (also with +, ++ or ~ in front, and the group `bench=...`)."""
    prefix = override[:len(override) - len(override.lstrip("+~"))]
    rest = override[len(prefix):]
    for old in ("bench.", "bench="):
        if rest.startswith(old):
            return prefix + "forgetting" + rest[len("bench"):]
    return override


@app.command(context_settings=EXTRA)
def verify(overrides: Optional[List[str]] = OVERRIDES, cfg: bool = SHOW_CFG) -> None:
    """Verify completions in a JSONL file: rrr verify task=countdown input=FILE.jsonl"""
    _run("verify", overrides, cfg)


@app.command()
def compare(run_dirs: List[Path] = typer.Argument(..., help="evaluate, failure-eval and/or forgetting run directories"),
            out: Optional[Path] = typer.Option(None, "--out", help="output directory for report.md"),
            note: str = typer.Option("", "--note", help="a sentence printed and put at the top of report.md")) -> None:
    """Paper-style table, paired bootstrap CIs and plots from evaluate runs."""
    from rrr.report import run as compare_run
    try:
        compare_run([Path(r) for r in run_dirs], out, note=note)
    except UserError as e:
        _fail(str(e), 1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
