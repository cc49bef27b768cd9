"""scripts/gpu_check.sh --cpu: the first-GPU check's matrix on CPU (tiny-random, 2 steps, 2 gloo ranks for
"all GPUs") ends with one table in which every run passed. On a GPU the script is untested."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow   # 6 `rrr train` runs of 2 steps (~3 min on 2 busy cores)
def test_gpu_check_runs_its_matrix_on_cpu_and_prints_one_table(tmp_path):
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path), "ENGINES": "hf"}
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (table,) = tmp_path.glob("gpu_check-*/table.txt")
    rows = [line.split(" | ") for line in table.read_text().splitlines()[2:]]
    names = {r[0].strip() for r in rows}
    assert names == {f"hf-{d}-{f}-1" for d in ("bfloat16", "float32") for f in ("full", "lora")} | \
        {"hf-bfloat16-full-fsdp-2", "hf-bfloat16-lora-ddp-2"}
    assert all(r[1].strip() == "0" and r[3].strip() == "2" for r in rows)     # exit code 0, 2 steps logged
    assert "6 of 6 runs passed" in done.stdout
