"""Checkpoint file sizes of an FSDP full fine-tune of tiny-random on 2 gloo ranks (4 steps, save_every=2),
the figures in docs/cluster.md ("Sharded FSDP checkpoints").

    PYTHONPATH=$PWD:$PWD/tests OMP_NUM_THREADS=1 python scripts/checkpoint_sizes.py /tmp/sizes

Runs the test suite's 2-rank harness (tests/fakes/dist_workers.py) with the trainer fakes; a few minutes on CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(out: Path) -> None:
    from fakes import dist_workers
    from fakes import trainer as trainer_fakes
    from rrr.models import load_tokenizer_only
    from test_distributed import train_overrides

    failures = trainer_fakes.write_failures(out / "failures", load_tokenizer_only("smollm2-135m"))
    run = out / "run"
    dist_workers.spawn(dist_workers.train, 2, train_overrides(failures, run, "train.finetune=full",
                                                              "train.parallel=fsdp"))
    for checkpoint in sorted((run / "checkpoints").iterdir()):
        files = sorted(p for p in checkpoint.rglob("*") if p.is_file())
        print(f"{checkpoint.name}: {sum(p.stat().st_size for p in files) / 1e6:.2f} MB")
        for p in files:
            if p.stat().st_size > 10_000:
                print(f"   {p.relative_to(checkpoint)}: {p.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
