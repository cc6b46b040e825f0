"""Synchronisation strategies: how workers' updates are combined, behind one small interface.

The loop calls `wrap` once, enters `microbatch(last)` around each forward/backward, and calls
`after_step` after each optimizer step; it never branches on the strategy.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager as ContextManager
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class Sync(Protocol):
    bytes_allreduced: int
    """Bytes this worker has all-reduced for synchronisation so far."""
    allreduce_calls: int

    def wrap(self, model: nn.Module) -> nn.Module: ...
    def microbatch(self, model: nn.Module, last: bool) -> ContextManager: ...
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None: ...


class GradSync:
    """DDP: one gradient all-reduce per optimizer step, on the last microbatch's backward.

    The all-reduce sums instead of averaging: each worker's loss is already divided by the
    samples of the whole step (all workers), so the sum is the step's mean gradient.
    """

    def __init__(self, world_size: int, device: torch.device | None = None) -> None:
        self.world_size = world_size
        self.device = device
        self.bytes_allreduced = 0
        self.allreduce_calls = 0

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return model  # nothing to synchronise; skip DDP's bookkeeping
        on_gpu = self.device is not None and self.device.type == "cuda"
        ddp = DistributedDataParallel(model, device_ids=[self.device] if on_gpu else None)
        ddp.register_comm_hook(self, _sum_and_count)
        return ddp

    def microbatch(self, model: nn.Module, last: bool) -> ContextManager:
        if last or not isinstance(model, DistributedDataParallel):
            return contextlib.nullcontext()
        return model.no_sync()

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass


def _sum_and_count(state, bucket):  # unannotated: DDP rejects string annotations here
    """DDP comm hook: all-reduce the bucket with SUM, counting bytes and calls."""
    tensor = bucket.buffer()
    state.bytes_allreduced += tensor.numel() * tensor.element_size()
    state.allreduce_calls += 1
    work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def build_sync(name: str, world_size: int, device: torch.device | None = None) -> Sync:
    """The strategy named by train.sync."""
    strategies = {"grad": GradSync}
    return strategies[name](world_size, device)
