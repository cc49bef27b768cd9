"""`rrr compare` on failure-eval runs: the held-out failure comparison, printed first and put at the top
of report.md. A vanilla and a trained `rrr failure-eval` run on the same failure set and seeds are
paired failure by failure (clustered by query, rrr.stats): n failures, fix rates with CIs (lenient, and
strict where the task has a leaderboard format), the pre-registered deltas with CI and MDE."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rrr.atomic import atomic_write_json
from rrr.config import UserError
from rrr.run_dir import read_manifest
from rrr.stats import clustered_rate as rate
from rrr.stats import paired_delta

COMMAND = "failure-eval"
METHOD = "reflection"
CONDITIONS = (METHOD, "retry_no_reflection", "best_of_2", "generic_reflection")


def is_failure_eval_run(path: Path) -> bool:
    return (read_manifest(Path(path)) or {}).get("command") == COMMAND


HEADLINE = (("trained", METHOD, "vanilla", METHOD),               # the pre-registered primary comparison
            ("trained", METHOD, "trained", "retry_no_reflection"),
            ("trained", METHOD, "vanilla", "best_of_2"))


def compare_runs(vanilla: pd.DataFrame, trained: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Vanilla and trained failure-eval results on the same failures: fix rates, the headline paired
    deltas (trained reflection − vanilla reflection, − trained retry-no-reflection, − vanilla best-of-2)
    and trained − vanilla per condition, each with CI and MDE."""
    if set(vanilla.pair_id) != set(trained.pair_id):
        raise UserError("the two failure-eval runs cover different failures; run both on the same "
                        "eval.failures (and eval.failures_limit / eval.attempts_per_query)")
    both = vanilla.merge(trained, on="pair_id", suffixes=("@vanilla", "@trained"))
    clusters = both["example_id@vanilla"].to_numpy()
    runs = {"vanilla": vanilla, "trained": trained}
    # each run may carry other controls (the reflection arm and its seeds do not depend on them)
    have = {m: [c for c in CONDITIONS if f"{c}_fix_rate" in df] for m, df in runs.items()}

    def col(model: str, condition: str) -> np.ndarray:
        name = f"{condition}_fix_rate"
        return both[name if name in both else f"{name}@{model}"].to_numpy(float)

    return {
        "n_failures": len(both), "n_queries": int(len(set(clusters))),
        "fix_rate": {m: {c: rate(df[f"{c}_fix_rate"], df.example_id, n_boot, seed) for c in have[m]}
                     for m, df in runs.items()},
        "headline": [{"a": f"{ma} {ca}", "b": f"{mb} {cb}",
                      **paired_delta(col(ma, ca), col(mb, cb), clusters, n_boot, seed)}
                     for ma, ca, mb, cb in HEADLINE if ca in have[ma] and cb in have[mb]],
        "trained_minus_vanilla": {c: paired_delta(col("trained", c), col("vanilla", c), clusters, n_boot, seed)
                                  for c in have["vanilla"] if c in have["trained"]},
        # the leaderboard-format fix rates beside the lenient ones (tasks with a strict format)
        "strict_fix_rate": {m: {c: rate(df[f"{c}_strict_fix_rate"], df.example_id, n_boot, seed)["mean"]
                                for c in have[m] if f"{c}_strict_fix_rate" in df} for m, df in runs.items()},
    }


def _pp(x: float | None, sign: bool = False) -> str:
    return "n/a" if x is None or np.isnan(x) else f"{100 * x:+.1f}" if sign else f"{100 * x:.1f}"


def report_lines(comparison: dict[str, Any]) -> list[str]:
    """The first lines of `rrr compare` for a vanilla/trained pair of failure-eval runs."""
    c = comparison
    lines = [f"Held-out failures: {c['n_failures']} failures of {c['n_queries']} queries (fix rate = mean of R "
             f"retries per failure; 95% CIs resample queries; pp)"]
    for model, rates in c["fix_rate"].items():
        lines.append(f"  {model:8s} " + "  ".join(f"{k.replace('_', ' ')} {_pp(v['mean'])} "
                                                   f"[{_pp(v['ci'][0])}, {_pp(v['ci'][1])}]"
                                                   for k, v in rates.items()))
    for model, rates in c.get("strict_fix_rate", {}).items():
        if rates:
            lines.append(f"  {model:8s} strict (leaderboard format): " + "  ".join(
                f"{k.replace('_', ' ')} {_pp(v)}" for k, v in rates.items()))
    for h in c["headline"]:
        shown = h["ci"][0] is not None and (h["ci"][0] > 0 or h["ci"][1] < 0)
        lines.append(f"  {h['a']} − {h['b']}: {_pp(h['delta'], True)} [{_pp(h['ci'][0], True)}, "
                     f"{_pp(h['ci'][1], True)}], MDE {_pp(h['mde'])} ({'shown' if shown else 'not shown'}; "
                     f"n = {h['n']})")
    return lines


def compare_dirs(vanilla_dir: str | Path, trained_dir: str | Path, n_boot: int = 2000) -> dict[str, Any]:
    """`compare_runs` on two failure-eval run directories, after checking they are comparable."""
    manifests = [read_manifest(Path(d)) or {} for d in (vanilla_dir, trained_dir)]
    for d, m in zip((vanilla_dir, trained_dir), manifests):
        if m.get("command") != COMMAND:
            raise UserError(f"{d} is not a {COMMAND} run")
    for key in ("failures_sha256",):
        if manifests[0]["failure_set"][key] != manifests[1]["failure_set"][key]:
            raise UserError("the two failure-eval runs used different failure sets (eval.failures); pair runs "
                            "on the same held-out failures")
    fps = [m["resume_fingerprint"] for m in manifests]
    for key in ("seed", "R", "sampling"):
        if fps[0][key] != fps[1][key]:
            raise UserError(f"the two failure-eval runs differ in {key}; paired comparison needs the same")
    frames = [pd.read_parquet(Path(d) / "results.parquet") for d in (vanilla_dir, trained_dir)]
    return compare_runs(*frames, n_boot=n_boot, seed=fps[0]["seed"])


def pair_runs(paths: list[Path]) -> tuple[Path, Path]:
    """(vanilla, trained) among the failure-eval runs given to `rrr compare`: exactly one of each."""
    by_label: dict[str, list[Path]] = {}
    for p in paths:
        by_label.setdefault((read_manifest(Path(p)) or {}).get("model_label", "?"), []).append(Path(p))
    if len(paths) != 2 or len(by_label.get("vanilla", [])) != 1 or len(by_label.get("trained", [])) != 1:
        raise UserError(f"rrr compare takes one vanilla and one trained failure-eval run (on the same failure set); "
                        f"got {', '.join(str(p) for p in paths)}")
    return by_label["vanilla"][0], by_label["trained"][0]


def section(paths: list[Path], out: Path, n_boot: int) -> list[str]:
    """The held-out failure comparison of `rrr compare`: its lines (printed first, top of report.md);
    `out/failure_eval.json` holds every number."""
    vanilla, trained = pair_runs(paths)
    comparison = compare_dirs(vanilla, trained, n_boot)
    atomic_write_json(Path(out) / "failure_eval.json", {"vanilla": str(vanilla), "trained": str(trained), **comparison})
    return report_lines(comparison)
