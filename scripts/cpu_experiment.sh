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
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/cpu-experiment/$(date +%Y%m%d-%H%M%S)}
HELDOUT_QUERIES=${HELDOUT_QUERIES:-64}     # test queries sampled twice; ~58% hold a failure at pass@1 0.65
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread: immune to other work stalling an OpenMP barrier
ARGS=(experiment=cpu-experiment model=qwen2.5-coder-0.5b task=function_calling ${ARGS:-})
start=$(date +%s)
stage() { printf '\n=== %s (%ds elapsed)\n' "$1" $(( $(date +%s) - start )); }

# The stages form two independent chains: A = 1 -> 3 (training) and B = 2 -> 4 (the vanilla evaluation needs
# no training). With 2+ cores (PARALLEL=1, the default there) A and B run at once, each on its own core
# (taskset), each logging to $OUT/logs/; stage 5 needs both. Critical path 1 + 3 + 5 instead of 1..5 in a row.
collect_train() {
stage "1. collect failures on the training split"
$RRR collect-failures "${ARGS[@]}" data.split=train run_dir="$OUT/failures"
}
collect_heldout() {
stage "2. collect the vanilla model's held-out failures (test split, 2 samples per query)"
$RRR collect-failures "${ARGS[@]}" data.split=test data.limit=$HELDOUT_QUERIES collect.samples_per_query=2 \
  collect.keep_attempts=1 run_dir="$OUT/heldout-failures"
}
train() {
stage "3. train reflections with GRPO (LoRA, dynamic sampling)"
$RRR train "${ARGS[@]}" train.failures="$OUT/failures" run_dir="$OUT/train"
}
eval_vanilla() {
stage "4. failure-eval: vanilla"
$RRR failure-eval "${ARGS[@]}" eval.failures="$OUT/heldout-failures" run_dir="$OUT/fe-vanilla"
}
eval_trained() {
stage "5. failure-eval: trained (same failures, same seeds)"
$RRR failure-eval "${ARGS[@]}" eval.failures="$OUT/heldout-failures" model.path="$OUT/train/checkpoints/final" \
  "eval.controls=[retry_no_reflection]" run_dir="$OUT/fe-trained"
}
chain_a() { collect_train && train; }
chain_b() { collect_heldout && eval_vanilla; }

stage "0. the embedded model, converted from its GGUF parts once (cached; both chains load it)"
$PY -c "from rrr.models import embedded_dir; print(embedded_dir('qwen2.5-coder-0.5b'))"
PARALLEL=${PARALLEL:-$([ "$(getconf _NPROCESSORS_ONLN)" -ge 2 ] && command -v taskset >/dev/null && echo 1 || echo 0)}
if [ "$PARALLEL" = 1 ]; then
  mkdir -p "$OUT/logs"
  echo "chains A (stages 1, 3) and B (stages 2, 4) in parallel on cores 0 and 1: $OUT/logs/chain-{a,b}.log"
  # a subshell pins itself (its commands inherit the core) and keeps the functions and ARGS
  (taskset -cp 0 $BASHPID >/dev/null; chain_a) > "$OUT/logs/chain-a.log" 2>&1 & a=$!
  (taskset -cp 1 $BASHPID >/dev/null; chain_b) > "$OUT/logs/chain-b.log" 2>&1 & b=$!
  wait $b || { echo "chain B failed: $OUT/logs/chain-b.log"; kill $a 2>/dev/null; exit 1; }
  wait $a || { echo "chain A failed: $OUT/logs/chain-a.log"; exit 1; }
  grep -h "^=== " "$OUT/logs/chain-a.log" "$OUT/logs/chain-b.log"
else
  chain_a
  chain_b
fi
eval_trained
stage "6. the pre-registered comparisons"
$RRR compare "$OUT/fe-vanilla" "$OUT/fe-trained" --out "$OUT/report"
printf '\nDone in %ds. Comparisons: %s/report/report.md (failure_eval.json); training curves: %s/train/metrics.jsonl\n' \
  $(( $(date +%s) - start )) "$OUT" "$OUT"
