"""Running under ``torchrun``: every process (rank) works on its shard, and the results combine exactly.

lowbit starts no process and chooses no rank count: it uses the process group that the user's
launcher describes (``torchrun``, or ``accelerate launch`` which wraps it) and runs as one process
when there is none. Everything here is a no-op for a single process.

A rank that fails must not leave the others waiting forever in their next collective call, so the
local work before each exchange runs inside :func:`together`: if it raises on any rank, it raises
on every rank, naming the rank and its error.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

__all__ = ["DistributedError", "all_gather", "first_rank_only", "is_distributed", "launched", "map_sharded", "rank", "shard",
           "to_device", "together", "world_size"]

T = TypeVar("T")
R = TypeVar("R")


class DistributedError(RuntimeError):
    """Raised on every rank when the local work of some other rank failed."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def to_device(value: T, device: torch.device | str) -> T:
    """``value`` with every tensor in it (through lists, tuples and dicts) on ``device``."""
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, value)


def all_gather(value: object) -> list:
    """Every rank's ``value``, in rank order. Values must hold CPU tensors only (see :func:`to_device`):
    a CUDA tensor would arrive on the sender's device index, which the receiver may not have."""
    if not is_distributed():
        return [value]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def together(work: Callable[[], R]) -> R:
    """``work()`` on every rank; if it raised on any rank, raise on every rank. The failing rank raises its
    own error (with its traceback), the others a :class:`DistributedError` that names it."""
    try:
        result, error = work(), None
    except Exception as err:  # noqa: BLE001 - any failure must reach the other ranks
        result, error = None, err
    failures = all_gather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, text) for r, text in enumerate(failures) if text is not None]
    if failed:
        raise DistributedError("; ".join(f"rank {r} of {world_size()} failed: {text}" for r, text in failed))
    return result


def first_rank_only(work: Callable[[], R]) -> R:
    """``work()`` run on rank 0 alone (a check of the output folder, which other machines may not see);
    every rank returns its result or raises its error."""
    outcome: list = [None]
    if rank() == 0:
        try:
            outcome = [(work(), None)]
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            outcome = [(None, err)]
    if is_distributed():
        dist.broadcast_object_list(outcome, src=0)
    result, error = outcome[0]
    if error is not None:
        raise error
    return result


def shard(items: Sequence[T], what: str) -> list[T]:
    """This rank's items: every ``world_size()``-th from ``rank()``, so that the shards of consecutive
    items are balanced. Refused, on every rank alike, when a rank would get nothing."""
    if len(items) < world_size():
        raise ValueError(f"{len(items)} {what} cannot be split over {world_size()} processes: each needs at least one; "
                         f"give more {what} or launch fewer processes (torchrun --nproc-per-node)")
    return list(items[rank()::world_size()])


def map_sharded(work: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[work(x) for x in items]``, each rank computing every ``world_size()``-th item and every rank
    receiving all results in order (their tensors on the CPU)."""
    if not is_distributed():
        return [work(x) for x in items]
    mine = range(rank(), len(items), world_size())
    local = together(lambda: [work(items[i]) for i in mine])
    results: list = [None] * len(items)
    for r, part in enumerate(all_gather(to_device(local, "cpu"))):
        results[r::world_size()] = part
    return results


@contextmanager
def launched() -> Iterator[None]:
    """The process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1), for the
    block's duration: gloo for CPU tensors and NCCL for CUDA tensors where there is a GPU. Nothing when
    not launched by torchrun or when a group already exists (the caller's)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()
