#!/usr/bin/env bash
# make cpu-experiment: the demo pipeline with enough steps and test examples to measure an effect on
# CPU (conf/experiment/cpu-experiment.yaml; about 2 hours here). Same stages as the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread: immune to other work stalling an OpenMP barrier
EXP=cpu-experiment exec bash scripts/demo.sh
