"""Equal-work bookkeeping: which sides run in which order, and how their steps become the table.

Equal work = the same failed queries, G, token budgets, LoRA, β, seed and torch threads on every side
(`WORKLOAD_KEYS`; `check_equal_work` refuses results that differ). The primary figure is **seconds per
step**; tokens/s sits beside it (it also moves with how many tokens a side happened to sample, which is
why it is not the headline). Every side runs `rounds` times (a process each: 1 warm-up step + ≥ 3 timed
steps), in alternating order (round 0 forward, round 1 backward, …), so a drift in machine load lands on
both sides; the spread is the range of the per-run medians.

Pure functions over the workers' JSON results: no timing here (tests feed them fake results).
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, Sequence

# the workload a side must share with the reference side to be compared with it
WORKLOAD_KEYS = ("task", "experiment", "model", "queries", "group", "reflection_tokens", "retry_tokens",
                 "steps", "threads", "beta", "lora_r", "lora_targets", "seed", "failures")
REFERENCE = "trl_r3"


def workload(args: dict) -> tuple:
    """What a run must share with another to be compared with it (its WORKLOAD_KEYS)."""
    return tuple(args.get(k) for k in WORKLOAD_KEYS)


def schedule(sides: Sequence[str], rounds: int) -> list[tuple[int, str]]:
    """(round, side) in run order: round 0 in the given order, round 1 reversed, and so on."""
    return [(r, side) for r in range(rounds) for side in (sides if r % 2 == 0 else list(reversed(sides)))]


def run_rounds(sides: Sequence[str], rounds: int, run_side: Callable[[str, int], dict],
               once: Sequence[str] = ()) -> dict[str, list[dict]]:
    """Run every side `rounds` times in `schedule` order, then each side of `once` a single time.
    `run_side(side, round)` returns a worker result (with `steps` and `median`). -> side -> [results]."""
    runs: dict[str, list[dict]] = {side: [] for side in [*sides, *once]}
    for r, side in [*schedule(sides, rounds), *((0, side) for side in once)]:
        runs[side].append(run_side(side, r))
    return runs


def check_equal_work(runs: dict[str, list[dict]]) -> None:
    """Every run of every side used the same workload (WORKLOAD_KEYS of its `args`); else SystemExit."""
    seen: dict[tuple, str] = {}
    for side, results in runs.items():
        for result in results:
            key = workload(result["args"])
            seen.setdefault(key, side)
    if len(seen) > 1:
        (a, side_a), (b, side_b) = list(seen.items())[:2]
        diff = [k for k, x, y in zip(WORKLOAD_KEYS, a, b) if x != y]
        raise SystemExit(f"error: not equal work: {side_a} and {side_b} differ in {', '.join(diff)}")


def timed_steps(result: dict) -> list[dict]:
    """The steps after the warm-up of one worker result."""
    return result["steps"][result.get("warmup_steps", 1):]


def _median(values: list[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def summarize_side(results: list[dict]) -> dict[str, Any]:
    """One side's figures over all its runs: medians over the pooled timed steps; `spread` = the per-run
    medians of s/step (min, max) and their range over the pooled median."""
    steps = [s for r in results for s in timed_steps(r)]
    per_run = [_median([s["step_s"] for s in timed_steps(r)]) for r in results]
    per_run = [x for x in per_run if x is not None]
    step_s = _median([s["step_s"] for s in steps])
    out = {"runs": len(results), "timed_steps": len(steps), "step_s": step_s,
           "run_step_s": per_run, "spread": (max(per_run) - min(per_run)) / step_s if per_run and step_s else None}
    for key in ("sampled_tokens", "tokens_per_s", "generation_s", "update_s", "truncated_reflection_share"):
        out[key] = _median([s[key] for s in steps if key in s])
    out["seq_len_max"] = max((s.get("seq_len_max", 0) for s in steps), default=0)
    out["update_len_max"] = max((s.get("update_len_max", 0) for s in steps), default=0)
    return out


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """side -> its summary plus `per_step_x` = reference s/step ÷ this side's s/step (equal work)."""
    summaries = {side: summarize_side(results) for side, results in runs.items() if results}
    ref = summaries.get(REFERENCE, {}).get("step_s")
    for s in summaries.values():
        s["per_step_x"] = ref / s["step_s"] if ref and s["step_s"] else None
    return summaries


def _f(x, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def table(rows: Sequence[tuple[str, str, dict]]) -> str:
    """Markdown: one line per (task, label, summary); ×TRL-R3 divides per-step seconds of equal work."""
    lines = ["| task | side | s/step | run medians (spread) | ×TRL-R3 per step | sampled tok/step | tok/s | "
             "truncated reflections | generation s | update s | seq_len_max |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, label, s in rows:
        runs = " / ".join(_f(x) for x in s["run_step_s"])
        lines.append(f"| {task} | {label} | {_f(s['step_s'])} | {runs} ({_pct(s['spread'])}) | "
                     f"{_f(s['per_step_x'], 2)} | {_f(s['sampled_tokens'], 0)} | {_f(s['tokens_per_s'], 2)} | "
                     f"{_pct(s['truncated_reflection_share'])} | {_f(s['generation_s'])} | {_f(s['update_s'])} | "
                     f"{s['seq_len_max'] or '–'} |")
    return "\n".join(lines)
