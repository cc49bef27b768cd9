"""How much RL signal does a setting give? Mixed-group share and retry success on a failure set.

    python scripts/measure_signal.py FAILURES_RUN_DIR [--queries N] [--group-size G] [overrides...]

For the first N failed queries (their stored attempt 1), sample G reflections + one retry each under
two feedback settings (plain, and with the verifier's reason) and report, per setting and per
pass-rate bucket (sometimes solved: 0 < p < 1; never solved: p = 0), the retry success rate and the
share of mixed groups (0 < successes < G): only those groups carry a GRPO gradient. Training split
only: this is how the demo settings in conf/experiment/demo.yaml were chosen.
"""

from __future__ import annotations

import argparse
import json
import time

from omegaconf import OmegaConf

from rrr.config import compose
from rrr.engines import build_engine
from rrr.engines.base import Sample
from rrr.failures import load_failures
from rrr.models import load_model
from rrr.rollout import reflect_retry, sampling_from_cfg
from rrr.tasks import get_task


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("failures")
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()

    run_cfg = OmegaConf.load(f"{args.failures}/config.yaml")
    cfg = compose([f"task={run_cfg.task.name}", f"model={run_cfg.model.name}", *args.overrides])
    examples, stored = load_failures(args.failures)
    examples, stored = examples[:args.queries], stored[:args.queries]
    model, tokenizer = load_model(cfg.model)
    engine = build_engine(cfg, model, tokenizer)
    task = get_task(cfg.task.name)
    sampling = sampling_from_cfg(cfg.train.sampling)
    attempts1 = [Sample(token_ids=list(s["token_ids"][0]), finish_reason="stop") for s in stored]
    pass_rates = [s["pass_rate"] for s in stored]

    report = {}
    for with_reason in (False, True):
        prompts = OmegaConf.merge(cfg.prompts, {"feedback_with_reason": with_reason})
        t0 = time.time()
        groups = reflect_retry(engine, tokenizer, task, examples, attempts1, prompts, sampling,
                               args.group_size, cfg.seed, 0)
        rows = []
        for p, group in zip(pass_rates, groups):
            wins = sum(ep.reward or 0 for ep in group)
            rows.append({"sometimes": 0 < p < 1, "wins": wins, "mixed": 0 < wins < len(group)})
        for bucket, keep in (("all", lambda r: True), ("sometimes_solved", lambda r: r["sometimes"]),
                             ("never_solved", lambda r: not r["sometimes"])):
            sel = [r for r in rows if keep(r)]
            if sel:
                report[f"reason={with_reason}/{bucket}"] = {
                    "groups": len(sel), "mixed_groups": sum(r["mixed"] for r in sel),
                    "retry_success": sum(r["wins"] for r in sel) / (len(sel) * args.group_size)}
        report[f"reason={with_reason}/seconds"] = round(time.time() - t0, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
