#!/usr/bin/env bash
# What a first GPU run must show (issue #22, item 8), in one prepared call, ending with one table:
#   bf16 and fp32 × full and LoRA × engine hf (and vllm when `import vllm` works), each under
#   `torchrun --nproc_per_node=1`, then bf16 full (FSDP2) and bf16 LoRA (DDP-style) on all GPUs.
# Each run: `rrr train` for a few steps with the sync canary at its per-dtype default and token TIS on, so
# the table shows the sampler/trainer gap (sync/logprob_diff), the TIS ratio and capped share, the loss,
# the gradient norm and the step time of every configuration; a run that fails shows its exit code.
#
# UNTESTED ON A GPU (none was available when it was written); `--cpu` runs the same matrix on CPU (tiny-random,
# 2 steps, 2 gloo ranks for "all") and is what was tested (tests/test_gpu_check.py, slow).
#
#   bash scripts/gpu_check.sh            # CUDA: MODEL (default smollm2-135m, embedded: carry RRR_CACHE), STEPS=3
#   bash scripts/gpu_check.sh --cpu      # CPU: tiny-random, 2 steps (~5 min on 2 busy cores)
# Env: PY (python), MODEL, STEPS, OUT (outputs dir), ENGINES ("hf vllm" to force), NGPU (ranks for "all").
set -uo pipefail
CPU=0
[[ "${1:-}" == "--cpu" ]] && CPU=1
PY=${PY:-python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
out=${OUT:-outputs}/gpu_check-$(date +%Y%m%d-%H%M%S)
mkdir -p "$out"

if (( CPU )); then
  MODEL=${MODEL:-tiny-random} STEPS=${STEPS:-2} NGPU=${NGPU:-2} DEVICE=cpu
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  MODEL=${MODEL:-smollm2-135m} STEPS=${STEPS:-3} DEVICE=cuda
  NGPU=${NGPU:-$($PY -c "import torch; print(torch.cuda.device_count())")}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  if [[ "$NGPU" -lt 1 ]]; then echo "no CUDA device: run with --cpu" >&2; exit 2; fi
fi
ENGINES=${ENGINES:-hf$($PY -c "import vllm" 2>/dev/null && echo " vllm")}
$PY - <<'EOF' | tee "$out/versions.txt"
import importlib, torch
v = {m: getattr(importlib.import_module(m), "__version__", "?") for m in ("torch", "transformers", "peft")}
try:
    import vllm; v["vllm"] = vllm.__version__
except ImportError:
    v["vllm"] = "absent"
print(" ".join(f"{k}={x}" for k, x in v.items()), "cuda", torch.version.cuda, "devices", torch.cuda.device_count())
EOF

common=(task=countdown "model=$MODEL" "model.device=$DEVICE" experiment=smoke log.progress=false logger=none
        "train.steps=$STEPS" "train.save_every=$STEPS" train.is_correction=token_tis engine.max_logprob_diff=auto)
$PY -m rrr collect-failures "${common[@]}" model.dtype=float32 engine=hf run_dir="$out/failures" data.limit=4 \
  > "$out/failures.log" 2>&1 || { echo "collect-failures failed: $out/failures.log" >&2; tail -5 "$out/failures.log"; exit 1; }

run() {  # run NAME NPROC OVERRIDES...
  local name=$1 nproc=$2; shift 2
  local t0=$SECONDS
  $PY -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m rrr train "${common[@]}" \
    train.failures="$out/failures" run_dir="$out/$name" "$@" > "$out/$name.log" 2>&1
  echo "$? $((SECONDS - t0))" > "$out/$name.status"
  echo "$name: rc $(cut -d' ' -f1 "$out/$name.status"), $((SECONDS - t0)) s"
}

for engine in $ENGINES; do
  for dtype in bfloat16 float32; do
    for finetune in full lora; do
      run "$engine-$dtype-$finetune-1" 1 engine=$engine model.dtype=$dtype train.finetune=$finetune
    done
  done
done
run "hf-bfloat16-full-fsdp-$NGPU" "$NGPU" engine=hf model.dtype=bfloat16 train.finetune=full train.parallel=fsdp
run "hf-bfloat16-lora-ddp-$NGPU" "$NGPU" engine=hf model.dtype=bfloat16 train.finetune=lora train.parallel=ddp

$PY - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
cols = ["run", "rc", "wall_s", "steps", "loss", "grad_norm", "logprob_diff_max", "is_ratio_mean", "is_capped_frac",
        "step_s", "rss_gb"]
rows = []
for status in sorted(out.glob("*.status")):
    name = status.stem
    rc, wall = status.read_text().split()
    metrics = out / name / "metrics.jsonl"
    m = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    last = m[-1] if m else {}
    rows.append([name, rc, wall, len(m), f"{last.get('loss', float('nan')):.4g}",
                 f"{last.get('grad_norm', float('nan')):.3g}",
                 f"{max((r['sync/logprob_diff'] for r in m), default=float('nan')):.4g}",
                 f"{last.get('is_ratio_mean', float('nan')):.4f}", f"{last.get('is_capped_frac', float('nan')):.3f}",
                 f"{sum(r['step_time_s'] for r in m) / max(len(m), 1):.1f}", f"{last.get('peak_rss_gb', float('nan')):.2f}"])
width = [max(len(str(r[i])) for r in rows + [cols]) for i in range(len(cols))]
lines = [" | ".join(str(c).ljust(w) for c, w in zip(r, width)) for r in [cols] + rows]
lines.insert(1, "-+-".join("-" * w for w in width))
table = "\n".join(lines)
(out / "table.txt").write_text(table + "\n")
print(table)
failed = [r[0] for r in rows if r[1] != "0"]
print(f"\n{len(rows) - len(failed)} of {len(rows)} runs passed" + (f"; failed: {', '.join(failed)} (see {out}/<run>.log)" if failed else ""))
sys.exit(1 if failed else 0)
EOF
