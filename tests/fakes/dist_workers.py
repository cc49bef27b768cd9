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


def join(rank: int, world: int, port: int, timeout_s: float | None = 300) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from rrr import distributed

    distributed.init(timeout_s)


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


def skip_collective(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1 skips the all-reduce of step 3 (and waits past the timeout); rank 0 waits for it in vain."""
    import time

    from rrr import distributed

    os.environ["RRR_DIST_TIMEOUT_S"] = "5"
    join(rank, world, port, timeout_s=None)
    try:
        distributed.at_step(3)
        if rank == 1:
            time.sleep(8)
            return
        t0 = time.time()
        try:
            distributed.all_reduce_sum(1.0)
            message = "no timeout"
        except distributed.CollectiveTimeout as e:
            message = str(e)
        with open(out, "w") as f:
            f.write(f"{time.time() - t0:.1f}\n{message}\n")
    finally:
        distributed.destroy()


def preempt_one(rank: int, world: int, port: int, out: str) -> None:
    """Only rank 1 is signalled: both ranks must agree to stop at the same poll."""
    import json
    import signal

    from rrr import distributed, preemption

    join(rank, world, port)
    try:
        preemption.install()
        before = preemption.requested_everywhere()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        after = preemption.requested_everywhere()
        with open(f"{out}.{rank}", "w") as f:
            json.dump([before, after, preemption.requested()], f)
    finally:
        preemption.uninstall()
        distributed.destroy()


def sharded_checkpoint(rank: int, world: int, port: int, root: str, mode: str) -> None:
    """FSDP2 on a tiny Llama: `save` takes one AdamW step and writes step_00001 (shards) and final (+ HF
    weights); `load` (on any rank count) reads step_00001 into a fresh sharded model and optimizer. Both
    dump the gathered weights and optimizer state to compare."""
    import json
    from pathlib import Path

    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from transformers import LlamaConfig, LlamaForCausalLM

    from rrr import checkpoint, distributed, fsdp

    join(rank, world, port)
    try:
        torch.manual_seed(0 if mode == "save" else 5)
        model = fsdp.shard(LlamaForCausalLM(LlamaConfig(      # tied: lm_head = embed_tokens, saved once
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        if mode == "save":
            ids = torch.arange(8).reshape(1, 8)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            for name in ("step_00001", "final"):
                checkpoint.save_checkpoint(root, name, model=model, tokenizer=None, optimizer=opt, scheduler=sched,
                                           step=1, cursor={"index": 1}, wandb_run_id=None)
        else:
            resume = checkpoint.load_checkpoint(Path(root) / "checkpoints" / "step_00001", model=model,
                                                optimizer=opt, scheduler=sched)
            assert resume.step == 1 and resume.cursor == {"index": 1}
        weights, optim = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save({"weights": weights, "optim": optim["state"]}, Path(root) / f"{mode}-{world}.pt")
    finally:
        distributed.destroy()


def gathered_copy(rank: int, world: int, port: int, out: str) -> None:
    """fsdp.GatheredEngine.load_weights fills the sampler's full copy from the shards, one parameter at a
    time: never through a full state dict (get_model_state_dict would raise here)."""
    import torch
    import torch.distributed.checkpoint.state_dict as dcp_state

    from rrr import distributed, fsdp
    from rrr.config import compose
    from rrr.models import load_model

    join(rank, world, port)
    try:
        def no_full_state_dict(*a, **k):
            raise AssertionError("a full state dict was built")

        dcp_state.get_model_state_dict = no_full_state_dict
        cfg = compose(["model=tiny-random", "model.device=cpu"])
        model, tok = load_model(cfg.model, for_training=True)
        expected = {k: 2 * v.detach().clone() + 1 for k, v in model.named_parameters()}
        model = fsdp.shard(model)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(2).add_(1)                      # the policy moved; the sampler must follow
        loaded = []

        class Engine:
            def load_weights(self, m):
                loaded.append(m)

        engine = fsdp.GatheredEngine(cfg, tok, lambda cfg, m, t: Engine())
        engine.load_weights(model)
        got = dict(engine.copy.named_parameters())
        ok = loaded == [engine.copy] and got.keys() == expected.keys() and \
            all(torch.equal(got[k], v) for k, v in expected.items())
        with open(f"{out}.{rank}", "w") as f:
            f.write(str(ok))
    finally:
        distributed.destroy()
