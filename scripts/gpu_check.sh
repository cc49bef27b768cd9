#!/usr/bin/env bash
# One prepared check for a CUDA machine (issue #11), UNTESTED: no GPU was available when it was written.
# `rrr train model=tiny-random` (built from its config, no download) for 3 steps on CUDA in bf16 and fp32,
# a plain process and `torchrun --nproc_per_node=1`, then the metrics rows. Never used by tests or CI.
#
# Carry to the GPU machine: this tree, the converted tokenizer cache (RRR_CACHE, a few MB: run any
# tiny-random command once here to fill it) and, under wheels/, the pure-Python wheels it lacks
# (e.g. hydra-core, omegaconf, typer). Usage: bash scripts/gpu_check.sh   (PY=... to pick the python)
set -euo pipefail
PY=${PY:-python}
export RRR_CACHE=${RRR_CACHE:-$PWD/shared/rrr-cache} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if compgen -G "wheels/*.whl" > /dev/null; then $PY -m pip install -q --no-deps wheels/*.whl; fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.version.cuda)"

out=${OUT:-outputs}/gpu_check
common=(task=countdown model=tiny-random experiment=smoke log.progress=false)
$PY -m rrr collect-failures "${common[@]}" run_dir="$out/failures" data.limit=4
for dtype in bfloat16 float32; do
  /usr/bin/time -f "train $dtype: %e s wall" \
    $PY -m rrr train "${common[@]}" model.dtype=$dtype train.failures="$out/failures" train.steps=3 \
      train.save_every=3 run_dir="$out/train-$dtype"
done
/usr/bin/time -f "torchrun nproc=1 bf16: %e s wall" \
  $PY -m torch.distributed.run --nproc_per_node=1 -m rrr train "${common[@]}" model.dtype=bfloat16 \
    train.failures="$out/failures" train.steps=3 train.save_every=3 run_dir="$out/train-torchrun"
for run in "$out"/train-*; do
  echo "== $run ($(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['host'])" "$run/manifest.json" 2>/dev/null))"
  cut -c1-400 "$run/metrics.jsonl"
done
