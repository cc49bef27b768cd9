#!/usr/bin/env bash
# make cpu-experiment: the pre-registered CPU science run (docs/results.md, first section), <= 2 h here.
#   1. collect training failures (live_simple, train split)        2. collect held-out failures (test split)
#   3. train with dynamic sampling                                  4./5. failure-eval vanilla, then trained
#   6. rrr compare: the paired comparison over the held-out failures
# Settings: conf/experiment/cpu-experiment.yaml. Any stage can be resumed by re-running the script with the
# same OUT (every stage resumes its own run dir).
set -euo pipefail
cd "$(dirname "$0")/.."
RRR=${RRR:-.venv/bin/rrr}
OUT=${OUT:-outputs/cpu-experiment/$(date +%Y%m%d-%H%M%S)}
HELDOUT_QUERIES=${HELDOUT_QUERIES:-64}     # test queries sampled twice; ~58% hold a failure at pass@1 0.65
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread: immune to other work stalling an OpenMP barrier
ARGS=(experiment=cpu-experiment model=qwen2.5-coder-0.5b task=function_calling ${ARGS:-})
start=$(date +%s)
stage() { printf '\n=== %s (%ds elapsed)\n' "$1" $(( $(date +%s) - start )); }

stage "1. collect failures on the training split"
$RRR collect-failures "${ARGS[@]}" data.split=train run_dir="$OUT/failures"
stage "2. collect the vanilla model's held-out failures (test split, 2 samples per query)"
$RRR collect-failures "${ARGS[@]}" data.split=test data.limit=$HELDOUT_QUERIES collect.samples_per_query=2 \
  collect.keep_attempts=1 run_dir="$OUT/heldout-failures"
stage "3. train reflections with GRPO (LoRA, dynamic sampling)"
$RRR train "${ARGS[@]}" train.failures="$OUT/failures" run_dir="$OUT/train"
stage "4. failure-eval: vanilla"
$RRR failure-eval "${ARGS[@]}" eval.failures="$OUT/heldout-failures" run_dir="$OUT/fe-vanilla"
stage "5. failure-eval: trained (same failures, same seeds)"
$RRR failure-eval "${ARGS[@]}" eval.failures="$OUT/heldout-failures" model.path="$OUT/train/checkpoints/final" \
  "eval.controls=[retry_no_reflection]" run_dir="$OUT/fe-trained"
stage "6. the pre-registered comparisons"
$RRR compare "$OUT/fe-vanilla" "$OUT/fe-trained" --out "$OUT/report"
printf '\nDone in %ds. Comparisons: %s/report/report.md (failure_eval.json); training curves: %s/train/metrics.jsonl\n' \
  $(( $(date +%s) - start )) "$OUT" "$OUT"
