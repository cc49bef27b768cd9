"""Data parallelism with torch's own launchers: `torchrun` / `accelerate launch` set RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous in the environment; this module is all the process-group plumbing.

nanoGPT's recipe: a run is distributed iff RANK is set; `init()` joins the group (gloo on CPU, nccl on
CUDA); every rank runs the same loop on its `shard()` of the step's work; `is_main()` guards every write.
With one process (no RANK) nothing here creates a group and every helper is the identity.

Gradients are summed by hand once per step (`all_reduce_grads`), not by wrapping the model in DDP: every
rank's loss is divided by the *global* normaliser (`all_reduce_sum` of the per-rank counts), so the sum of
the ranks' gradients is the single-process gradient exactly; there is no `no_sync` to get right across
micro-steps, and ranks with different numbers of micro-batches (or none) cannot deadlock.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def launched() -> bool:
    """True under torchrun / accelerate launch (they set RANK), even with one process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def init() -> None:
    """Join the process group the launcher describes; a no-op for a plain single process or when joined."""
    if active() or not launched():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = datetime.timedelta(seconds=float(os.environ.get("RRR_DIST_TIMEOUT_S", 1800)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)


def destroy() -> None:
    if active():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def device() -> torch.device:
    """Where collectives' tensors live: the rank's GPU under nccl, the CPU under gloo."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(items: Sequence[T]) -> list[T]:
    """This rank's contiguous share of `items` (sizes differ by at most one; concatenating the shards in
    rank order gives `items` back, so gathered results come back in single-process order)."""
    n, r, w = len(items), rank(), world()
    lo, hi = r * n // w, (r + 1) * n // w
    return list(items[lo:hi])


def gather(items: Sequence[T]) -> list[T]:
    """Every rank's list, concatenated in rank order, on every rank (the inverse of `shard`)."""
    if not active():
        return list(items)
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def map_shards(fn: Callable[[list[Any]], list[T]], items: Sequence[Any]) -> list[T]:
    """`fn` on this rank's shard of `items` (skipped when the shard is empty), gathered in item order:
    for one process just `fn(items)`."""
    mine = shard(items)
    return gather(fn(mine) if mine else [])


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over ranks (counts, and rates of ranks running side by side); ints stay ints."""
    if not active():
        return values
    sums = all_reduce_sum(torch.tensor([float(v) for v in values.values()], dtype=torch.float64)).tolist()
    return {k: type(v)(s) if isinstance(v, int) else s for (k, v), s in zip(values.items(), sums)}


def from_main(fn: Callable[[], T]) -> T:
    """`fn()` evaluated on rank 0 only (e.g. creating a run dir) and its result handed to every rank."""
    if not active():
        return fn()
    box = [fn() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(x: torch.Tensor | float) -> torch.Tensor | float:
    """Σ over ranks (a tensor keeps its device and dtype; a number comes back as a float)."""
    if not active():
        return x
    t = torch.as_tensor(x, dtype=torch.float64 if not torch.is_tensor(x) else None).clone().to(device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(x.device) if torch.is_tensor(x) else float(t)


def mean(value: float | None, count: int) -> float | None:
    """The mean over all ranks of per-rank means `value` of `count` items each; a rank with nothing to
    average passes None and still joins the all-reduce (skipping it would hang the others). None when no
    rank has any item."""
    if not active():
        return value
    mine = [value * count, count] if value is not None else [0.0, 0]
    total, n = all_reduce_sum(torch.tensor(mine, dtype=torch.float64)).tolist()
    return total / n if n else None


def all_reduce_max(x: float) -> float:
    if not active():
        return x
    t = torch.tensor(float(x), dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def all_reduce_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of replicated parameters over ranks, in one flat buffer per dtype. A rank with no
    gradient for a parameter (no episodes this step) contributes zeros. FSDP-sharded parameters (DTensors)
    are reduced by FSDP itself and are skipped."""
    if not active():
        return
    params = [p for p in params if not _is_dtensor(p)]
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device())
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)      # a parameter no rank reached keeps grad None,
    params = [p for p, h in zip(params, has_grad.tolist()) if h]          # as in one process
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group]).to(device())
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)
