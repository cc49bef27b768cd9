#!/usr/bin/env bash
# make cpu-experiment: the demo pipeline with enough steps and test examples to measure an effect on
# CPU (conf/experiment/cpu-experiment.yaml; about 2 hours on 2 cores). Same stages as the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
EXP=cpu-experiment exec bash scripts/demo.sh
