"""Data parallelism with torch's own launchers: `torchrun` / `accelerate launch` set RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous in the environment; this module is all the process-group plumbing.

nanoGPT's recipe: a run is distributed iff RANK is set; `init()` joins the group (gloo on CPU, nccl on
CUDA); every rank runs the same loop on its `shard()` of the step's work; `is_main()` guards every write.
With one process (no RANK) nothing here creates a group and every helper is the identity.

Gradients are summed by hand once per step (`all_reduce_grads`), not by wrapping the model in DDP: every
rank's loss is divided by the *global* normaliser (`all_reduce_sum` of the per-rank counts), so the sum of
the ranks' gradients is the single-process gradient exactly; there is no `no_sync` to get right across
micro-steps, and ranks with different numbers of micro-batches (or none) cannot deadlock.

A collective that a rank never joins fails after `dist.timeout_s` (default 600 s, not torch's 30 min):
the loop records its step (`at_step`), and the timeout becomes one line naming this rank, the step and
the collective (`CollectiveTimeout`), on the rank that waited.
"""

from __future__ import annotations

import datetime
import functools
import os
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from rrr.config import ConfigError, UserError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 600.0
_state: dict[str, Any] = {"step": None, "timeout_s": DEFAULT_TIMEOUT_S}


class CollectiveTimeout(UserError):
    """A collective waited `dist.timeout_s` for a rank that never joined it."""


def launched() -> bool:
    """True under torchrun / accelerate launch (they set RANK), even with one process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def init(timeout_s: float | None = None) -> None:
    """Join the process group the launcher describes; a no-op for a plain single process or when joined.
    `timeout_s` (config `dist.timeout_s`; else RRR_DIST_TIMEOUT_S, else 600) bounds every collective."""
    if active() or not launched():
        return
    if timeout_s is None:
        timeout_s = os.environ.get("RRR_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)
    try:
        seconds = float(timeout_s)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"dist.timeout_s={timeout_s!r} must be a number of seconds > 0 (default 600)")
    _state["timeout_s"] = seconds
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=seconds))


def at_step(step: int | None) -> None:
    """Record the step the loop is in, for the message of a collective that times out."""
    _state["step"] = step


def is_timeout(e: BaseException) -> bool:
    """gloo raises RuntimeError('... Timed out waiting Nms ...'); NCCL (blocking wait) a DistBackendError."""
    return isinstance(e, RuntimeError) and "timed out" in str(e).lower()


def timeout_message(op: str = "a collective") -> str:
    step = _state["step"]
    where = f"at step {step}" if step is not None else "before the first step"
    return (f"rank {rank()} of {world()}: {op} {where} timed out after {_state['timeout_s']:g} s: another rank "
            "never joined it (it crashed, hangs, or took another path: its own log says which); "
            "dist.timeout_s sets the wait")


def collective(fn: Callable[..., T]) -> Callable[..., T]:
    """A collective of this module whose timeout is reported as one line naming the rank and the step."""
    @functools.wraps(fn)
    def named(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:
            if isinstance(e, CollectiveTimeout) or not is_timeout(e):
                raise
            raise CollectiveTimeout(timeout_message(fn.__name__)) from None
    return named


def destroy() -> None:
    if active():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


@collective
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


@collective
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


@collective
def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over ranks (counts, and rates of ranks running side by side); ints stay ints."""
    if not active():
        return values
    sums = all_reduce_sum(torch.tensor([float(v) for v in values.values()], dtype=torch.float64)).tolist()
    return {k: type(v)(s) if isinstance(v, int) else s for (k, v), s in zip(values.items(), sums)}


@collective
def from_main(fn: Callable[[], T]) -> T:
    """`fn()` evaluated on rank 0 only (e.g. creating a run dir) and its result handed to every rank."""
    if not active():
        return fn()
    box = [fn() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@collective
def all_reduce_sum(x: torch.Tensor | float) -> torch.Tensor | float:
    """Σ over ranks (a tensor keeps its device and dtype; a number comes back as a float)."""
    if not active():
        return x
    t = torch.as_tensor(x, dtype=torch.float64 if not torch.is_tensor(x) else None).clone().to(device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(x.device) if torch.is_tensor(x) else float(t)


@collective
def mean(value: float | None, count: int) -> float | None:
    """The mean over all ranks of per-rank means `value` of `count` items each; a rank with nothing to
    average passes None and still joins the all-reduce (skipping it would hang the others). None when no
    rank has any item."""
    if not active():
        return value
    mine = [value * count, count] if value is not None else [0.0, 0]
    total, n = all_reduce_sum(torch.tensor(mine, dtype=torch.float64)).tolist()
    return total / n if n else None


@collective
def all_reduce_max(x: float) -> float:
    if not active():
        return x
    t = torch.tensor(float(x), dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


@collective
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
