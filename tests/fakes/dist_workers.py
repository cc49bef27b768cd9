"""What each rank runs in the multi-process tests (torch.multiprocessing.spawn: a top-level function of an
importable module). Each worker joins a gloo group through the same environment variables torchrun sets,
then calls the command's pipeline function like `rrr.cli` does."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, world: int, port: int) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RRR_DIST_TIMEOUT_S": "300"})
    from rrr import distributed

    distributed.init()


def train(rank: int, world: int, port: int, overrides: list[str]) -> None:
    """`rrr train` on the trainer fakes (random-stop engine, parity verifier). The fake engine replaces
    `rrr.engines.build_engine`, so the trainer's own engine set-up (FSDP's gathered copy) still runs."""
    import rrr.engines
    from fakes import trainer as trainer_fakes
    from rrr import distributed, trainer
    from rrr.config import compose

    join(rank, world, port)
    rrr.engines.build_engine = lambda cfg, model, tok: trainer_fakes.RandomStopEngine(tok.convert_tokens_to_ids("<|im_end|>"))
    trainer.get_task = lambda name: trainer_fakes.ParityTask()
    trainer.sync.check_logprob_diff = lambda step, diff, limit: None   # the fake's log-probs are no model's
    try:
        trainer.run(compose(overrides))
    finally:
        distributed.destroy()


def pipelines(rank: int, world: int, port: int, runs: list[tuple[str, list[str]]]) -> None:
    """`rrr collect-failures` / `rrr evaluate` (module, overrides) in turn, real engine and task."""
    from importlib import import_module

    from rrr import distributed
    from rrr.config import compose

    join(rank, world, port)
    try:
        for module, overrides in runs:
            import_module(f"rrr.{module}").run(compose(overrides))
    finally:
        distributed.destroy()


def spawn(fn, world: int, *args) -> None:
    import torch.multiprocessing as mp

    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)


def means(rank: int, world: int, port: int, out: str) -> None:
    """`distributed.mean` where rank 1 has nothing to average (None): it must still join the all-reduce."""
    import json

    from rrr import distributed

    join(rank, world, port)
    try:
        got = [distributed.mean(0.5 if rank == 0 else None, 4 if rank == 0 else 0),   # one rank has items
               distributed.mean(None, 0),                                            # none has
               distributed.mean([0.25, 1.0][rank], [4, 2][rank])]                   # weighted by counts
        if rank == 0:
            with open(out, "w") as f:
                json.dump(got, f)
    finally:
        distributed.destroy()


def train_runs(rank: int, world: int, port: int, runs: list[list[str]]) -> None:
    """Several `rrr train` runs (overrides each) on the trainer fakes in one process group: one spawn's
    start-up (~10 s per rank here) serves them all."""
    import rrr.engines
    from fakes import trainer as trainer_fakes
    from rrr import distributed, trainer
    from rrr.config import compose

    join(rank, world, port)
    rrr.engines.build_engine = lambda cfg, model, tok: trainer_fakes.RandomStopEngine(tok.convert_tokens_to_ids("<|im_end|>"))
    trainer.get_task = lambda name: trainer_fakes.ParityTask()
    trainer.sync.check_logprob_diff = lambda step, diff, limit: None   # the fake's log-probs are no model's
    try:
        for overrides in runs:
            trainer.run(compose(overrides))
    finally:
        distributed.destroy()
