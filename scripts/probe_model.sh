#!/usr/bin/env bash
# Probe a model on the *training* split before any training (issue 21, item 3): pass@1, the share of its
# failed queries it sometimes solves (the queries whose groups can be mixed), and the vanilla reflection
# fix rate against retry-without-reflection, on the same failures and seeds (rrr failure-eval).
#   bash scripts/probe_model.sh                      # MODEL=qwen2.5-coder-1.5b QUERIES=8 SAMPLES=4 R=2
#   MODEL=qwen2.5-coder-0.5b QUERIES=24 bash scripts/probe_model.sh
# Settings otherwise those of conf/experiment/cpu-experiment.yaml (prompts, token caps, temperatures).
# Everything stays on the training split: the test split is not looked at to choose model or task.
set -euo pipefail
cd "$(dirname "$0")/.."
RRR=${RRR:-.venv/bin/rrr}
MODEL=${MODEL:-qwen2.5-coder-1.5b}
QUERIES=${QUERIES:-8}
SAMPLES=${SAMPLES:-4}
R=${R:-2}
OUT=${OUT:-outputs/probe/$MODEL-$(date +%Y%m%d-%H%M%S)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ARGS=(experiment=cpu-experiment model=$MODEL task=function_calling log.progress=false ${ARGS:-})
start=$(date +%s)
stage() { printf '\n=== %s (%ds elapsed)\n' "$1" $(( $(date +%s) - start )); }

stage "collect: $QUERIES training queries x $SAMPLES samples"
$RRR collect-failures "${ARGS[@]}" data.split=train data.limit=$QUERIES collect.samples_per_query=$SAMPLES \
  collect.keep_attempts=1 run_dir="$OUT/collect"
stage "vanilla reflection vs retry without reflection: R=$R per failure, same seeds"
$RRR failure-eval "${ARGS[@]}" eval.failures="$OUT/collect" eval.reflections_per_failure=$R \
  "eval.controls=[retry_no_reflection]" run_dir="$OUT/failure-eval"
stage "summary"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
c = json.load(open(f"{out}/collect/summary.json"))
f = json.load(open(f"{out}/failure-eval/summary.json"))
failed = c["queries"] - round(c["always_solved"] * c["queries"])
sometimes = c["kept"] - round(c["never_solved"] * c["queries"])
fr, w = f["fix_rate"], f["within"]["reflection - retry_no_reflection"]
print(f"pass@1 {c['pass_at_1']:.3f} over {c['queries']} queries x {c['samples'] // max(c['queries'], 1)} samples; "
      f"failed queries {c['kept']}, sometimes solved {sometimes} ({sometimes / max(c['kept'], 1):.0%})")
print(f"fix rate over {f['n_failures']} failures x R={f['R']}: reflection {fr['reflection']['mean']:.3f}, "
      f"retry without reflection {fr['retry_no_reflection']['mean']:.3f}; difference {w['delta']:+.3f} "
      f"[{w['ci'][0]:+.3f}, {w['ci'][1]:+.3f}]")
print(f"reflections: {f['reflection']['tokens_mean']:.1f} tokens mean, {f['reflection']['truncated_share']:.0%} truncated")
print(f"generation: collect {c['generated_tokens']} tokens in {c['wall_s']:.0f} s, failure-eval "
      f"{f['generated_tokens']} tokens in {f['wall_s']:.0f} s")
PY
