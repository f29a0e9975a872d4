"""Which process this is, and the few collectives that code below the training layer needs (the data set-up
waits for the node's first rank; the metrics sum over ranks). No-ops in a single process; process groups are
made by the training engine (train/engine.py)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import torch

T = TypeVar("T")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes on this node

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> DistInfo:
    """The launcher's view (deepspeed, torchrun): RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE (all on one node
    when the launcher does not say); one process without them."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    return DistInfo(int(os.environ.get("RANK", 0)), world, int(os.environ.get("LOCAL_RANK", 0)),
                    int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op.upper()))
    return t


def all_gather_stacked(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` stacked in rank order (world, *t.shape); (1, *t.shape) in one process. `t` lives on the
    process group's device (NCCL: the rank's GPU)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, t)
        return torch.stack(parts)
    return t.unsqueeze(0)


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def node_first(first: Callable[[], T], then: Optional[Callable[[], T]] = None, together: bool = True) -> T:
    """Work whose result a node's ranks share on its disk (file checks, a copy of shards): `first()` on each node's
    first rank while the node's other ranks wait, then `then()` (default: `first`) on those, which read its result.
    One process, or together=False: first()."""
    joint = together and torch.distributed.is_available() and torch.distributed.is_initialized()
    if joint and dist_from_env().local_rank != 0:
        barrier()  # the node's first rank is at work
        return (then or first)()
    out = first()
    if joint:
        barrier()
    return out
