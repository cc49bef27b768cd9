#!/usr/bin/env bash
# make demo: collect failures -> train (LoRA) -> evaluate vanilla -> evaluate trained -> compare.
# All settings: conf/experiment/demo.yaml (override any of them: `make demo ARGS="train.steps=5"`).
set -euo pipefail
cd "$(dirname "$0")/.."
RRR=${RRR:-.venv/bin/rrr}   # e.g. RRR="python -m rrr.cli" for another environment
EXP=${EXP:-demo}
OUT=${OUT:-outputs/$EXP/$(date +%Y%m%d-%H%M%S)}
ARGS=(experiment=$EXP model=qwen2.5-coder-0.5b task=function_calling ${ARGS:-})
start=$(date +%s)
stage() { printf '\n=== %s (%ds elapsed)\n' "$1" $(( $(date +%s) - start )); }

stage "collect failures on the training split"
$RRR collect-failures "${ARGS[@]}" data.split=train run_dir="$OUT/failures"
stage "train reflections with GRPO (LoRA)"
$RRR train "${ARGS[@]}" train.failures="$OUT/failures" run_dir="$OUT/train"
stage "evaluate the vanilla model on the test sets (BFCL simple_python, multiple)"
$RRR evaluate "${ARGS[@]}" run_dir="$OUT/eval-vanilla"
stage "evaluate the trained model on the same examples and seeds"
$RRR evaluate "${ARGS[@]}" model.path="$OUT/train/checkpoints/final" run_dir="$OUT/eval-trained"
stage "compare"
NOTE=""
if [ "$EXP" = demo ]; then
  NOTE="make demo is a pipeline demonstration: a few LoRA updates and a dozen test examples are far too small to measure an effect; the CIs say so. The science run is make cpu-experiment (docs/results.md)."
fi
$RRR compare "$OUT/eval-vanilla" "$OUT/eval-trained" --out "$OUT/report" --note "$NOTE"
printf '\nDone in %ds. Report: %s/report/report.md\n' $(( $(date +%s) - start )) "$OUT"
