"""Synchronisation strategies: how workers' updates are combined, behind one small interface.

The loop calls `wrap` once, asks `step_samples` what a step's loss is divided by, enters
`microbatch(last)` around each forward/backward, asks `finite` whether every worker may take
the step, calls `after_step` after each step and `consolidate` before it validates, saves a
checkpoint or ends; it never branches on the strategy.

- grad: DDP, one gradient all-reduce per optimizer step.
- param: local SGD; every H steps the workers' parameters and floating buffers are replaced
  by their mean (optionally the optimizer state too), in one flat all-reduce per dtype.
  Unlike torch's PeriodicModelAverager this includes buffers (BatchNorm statistics) and
  parameters without gradients. Optional post-local-SGD warm-up: S steps of grad first.
- diloco: the inner optimizer runs H local steps; then the mean pseudo-gradient
  theta_global - theta_local is handed to an outer optimizer (SGD, Nesterov) that steps
  theta_global, which every worker then continues from.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from raymb.config import Config


@dataclass
class Comm:
    """What a worker has sent through all-reduces for synchronisation (gradients, parameters,
    optimizer state; not the one-time initial broadcast or one-number agreement flags)."""

    bytes: int = 0
    calls: int = 0

    def all_reduce_mean(self, tensors: Iterable[torch.Tensor], world: int) -> None:
        """Replace each tensor by its mean over workers: one flat all-reduce per dtype."""
        groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for t in tensors:
            groups[(t.dtype, t.device)].append(t)
        for group in groups.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            self.bytes += flat.numel() * flat.element_size()
            self.calls += 1
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= world
            for t, part in zip(group, flat.split([t.numel() for t in group])):
                t.detach().copy_(part.view_as(t))


class Sync(Protocol):
    comm: Comm
    per_worker_optimizer: bool
    """True when workers' optimizer states differ, so each worker checkpoints its own."""

    def wrap(self, model: nn.Module) -> nn.Module: ...
    def step_samples(self, rows: int, *, uneven: bool = False) -> int: ...
    def step_count(self, count: torch.Tensor) -> float: ...
    def microbatch(self, model: nn.Module, last: bool) -> ContextManager: ...
    def finite(self, grad_norm: torch.Tensor) -> bool: ...
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None: ...
    def consolidate(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class GradSync:
    """DDP: one gradient all-reduce per optimizer step, on the last microbatch's backward.

    The all-reduce sums instead of averaging: each worker's loss is already divided by the
    samples of the whole step (all workers), so the sum is the step's mean gradient.
    """

    per_worker_optimizer = False

    def __init__(
        self,
        world_size: int,
        device: torch.device | None = None,
        comm: Comm | None = None,
        *,
        before_all_reduce: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        """`before_all_reduce`: called with each bucket of this worker's own gradient before
        its all-reduce, from the DDP comm hook (W >= 2), reading it only: train.noise_scale's
        NoiseProbe.add_local (raymb.core.noise_probe)."""
        self.world_size = world_size
        self.device = device
        self.comm = comm or Comm()
        self.before_all_reduce = before_all_reduce

    def wrap(self, model: nn.Module, *, sync_buffers: bool = True) -> nn.Module:
        """DDP around `model`; `sync_buffers`: rank 0's buffers replace the others' at each
        forward (False: ParamSync averages them instead)."""
        if self.world_size == 1:
            return model  # nothing to synchronise; skip DDP's bookkeeping
        on_gpu = self.device is not None and self.device.type == "cuda"
        ddp = DistributedDataParallel(
            model,
            device_ids=[self.device] if on_gpu else None,
            **_buffer_sync(sync_buffers),
        )
        if self.before_all_reduce is None:
            ddp.register_comm_hook(self.comm, _sum_and_count)
        else:
            ddp.register_comm_hook((self.comm, self.before_all_reduce), _watch_sum_and_count)
        return ddp

    def step_samples(self, rows: int, *, uneven: bool = False) -> int:
        """The step's rows on all workers: W x rows, or all-reduced when they may differ."""
        if not uneven or self.world_size == 1:
            return rows * self.world_size
        total = torch.tensor([float(rows)], device=self.device)
        dist.all_reduce(total)
        return int(total.item())

    def step_count(self, count: torch.Tensor) -> float:
        """A counted loss's divisor: this worker's count summed over the workers."""
        if self.world_size == 1:
            return float(count.item())
        total = count.detach().double().reshape(1).clone()
        dist.all_reduce(total)
        return float(total.item())

    def microbatch(self, model: nn.Module, last: bool) -> ContextManager:
        if last or not isinstance(model, DistributedDataParallel):
            return contextlib.nullcontext()
        return model.no_sync()

    def finite(self, grad_norm: torch.Tensor) -> bool:
        # The all-reduced gradients are identical on every worker, and so is their norm:
        # every worker reaches the same verdict without another message.
        return bool(torch.isfinite(grad_norm))

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass

    def consolidate(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _sum_and_count(state, bucket):  # unannotated: DDP rejects string annotations here
    """DDP comm hook: all-reduce the bucket with SUM, counting bytes and calls."""
    tensor = bucket.buffer()
    state.bytes += tensor.numel() * tensor.element_size()
    state.calls += 1
    work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _watch_sum_and_count(state, bucket):
    """_sum_and_count, after showing the bucket (the gradient of this worker's own rows,
    before the all-reduce) to GradSync's `before_all_reduce`, which changes nothing."""
    comm, watch = state
    watch(bucket.buffer())
    return _sum_and_count(comm, bucket)


class ParamSync:
    """Local SGD: each worker steps on its own samples; every `every` steps (after `warmup`
    steps of gradient all-reduce) parameters and floating buffers become their mean."""

    per_worker_optimizer = True

    def __init__(
        self,
        world_size: int,
        device: torch.device | None = None,
        *,
        every: int,
        warmup: int = 0,
        average_optimizer_state: bool = False,
    ) -> None:
        self.world_size = world_size
        self.every, self.warmup = every, warmup
        self.average_optimizer_state = average_optimizer_state
        self.comm = Comm()
        self.grad = GradSync(world_size, device, self.comm)
        self.steps = 0
        self.local_steps = 0
        """Steps taken since the workers last held the same parameters."""

    @property
    def in_warmup(self) -> bool:
        return self.steps < self.warmup

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return model
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)  # same start on every worker, whatever the init
        if self.warmup == 0:
            return model
        # Buffers are averaged, not copied from rank 0 at each forward.
        return self.grad.wrap(model, sync_buffers=False)

    def step_samples(self, rows: int, *, uneven: bool = False) -> int:
        if self.in_warmup:
            return self.grad.step_samples(rows, uneven=uneven)
        return max(rows, 1)  # a worker with no row in a step steps on zero gradients

    def step_count(self, count: torch.Tensor) -> float:
        """A counted loss's divisor: all workers' count in the warm-up, else this worker's
        own (1 when it counted nothing: it steps on zero gradients)."""
        if self.in_warmup:
            return self.grad.step_count(count)
        return float(count.item()) or 1.0

    def microbatch(self, model: nn.Module, last: bool) -> ContextManager:
        if self.in_warmup:
            return self.grad.microbatch(model, last)
        if isinstance(model, DistributedDataParallel):
            return model.no_sync()  # the warm-up's DDP wrapper must not all-reduce any more
        return contextlib.nullcontext()

    def finite(self, grad_norm: torch.Tensor) -> bool:
        if self.in_warmup or self.world_size == 1:
            return self.grad.finite(grad_norm)
        bad = (~torch.isfinite(grad_norm)).float().reshape(1)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # all skip or abort together
        return not bool(bad.item())

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        warm = self.in_warmup
        self.steps += 1
        if warm:
            return
        self.local_steps += 1
        if (self.steps - self.warmup) % self.every == 0:
            self.average(model, optimizer)

    def consolidate(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        # Mid-period (a checkpoint, validation, the end): one model, the mean of the workers';
        # the period's phase (and DiLoCo's outer state) are left as they are.
        if self.local_steps:
            self.mean_of_workers(model, optimizer)

    def average(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """What ends a period: the mean of the workers' models."""
        self.mean_of_workers(model, optimizer)

    def mean_of_workers(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.local_steps = 0
        if self.world_size == 1:
            return
        tensors = list(_floating(_unwrap(model).state_dict().values()))
        if self.average_optimizer_state:
            tensors += _optimizer_tensors(optimizer)
        self.comm.all_reduce_mean(tensors, self.world_size)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "local_steps": self.local_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.local_steps = state["steps"], state["local_steps"]


class DiLoCoSync(ParamSync):
    """DiLoCo: every `every` steps an outer optimizer steps the global parameters with the
    mean pseudo-gradient theta_global - theta_local; buffers are averaged alongside."""

    def __init__(
        self,
        world_size: int,
        device: torch.device | None = None,
        *,
        every: int,
        warmup: int = 0,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
    ) -> None:
        super().__init__(world_size, device, every=every, warmup=warmup)
        self.outer_args = dict(lr=outer_lr, momentum=outer_momentum, nesterov=nesterov)
        self.globals: list[torch.Tensor] = []
        self.outer: torch.optim.Optimizer | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        net = super().wrap(model)
        self._start_outer(model)
        return net

    def _start_outer(self, model: nn.Module) -> None:
        self.globals = [p.detach().clone() for p in model.parameters()]
        self.outer = torch.optim.SGD(self.globals, **self.outer_args)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        warm = self.in_warmup
        super().after_step(model, optimizer)
        if warm and not self.in_warmup:
            self._start_outer(_unwrap(model))  # the outer loop starts where the warm-up ended

    def average(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """The outer step, when a period ends."""
        self.local_steps = 0
        model = _unwrap(model)
        params = list(model.parameters())
        deltas = [g - p.detach() for g, p in zip(self.globals, params)]
        buffers = list(_floating(model.buffers()))
        if self.world_size > 1:
            self.comm.all_reduce_mean(deltas + buffers, self.world_size)
        for g, d in zip(self.globals, deltas):
            g.grad = d
        self.outer.step()
        with torch.no_grad():
            for g, p in zip(self.globals, params):
                p.copy_(g)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "globals": [g.detach().cpu() for g in self.globals],
            "outer": self.outer.state_dict() if self.outer is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            for g, saved in zip(self.globals, state["globals"]):
                g.copy_(saved)
        if state["outer"] is not None:
            self.outer.load_state_dict(state["outer"])


def _buffer_sync(at_forward: bool) -> dict[str, bool]:
    """DDP's argument for syncing buffers at each forward. torch 2.13 renamed
    broadcast_buffers to forward_sync_buffers (the old name warns); the new one always
    broadcasts the buffers once at construction, as the old one did when True, and which is
    no change after False here: ParamSync.wrap has just broadcast all of rank 0's state."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return {"forward_sync_buffers": at_forward}
    return {"broadcast_buffers": at_forward}


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _floating(tensors: Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    return (t for t in tensors if t.is_floating_point())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Momentum buffers and Adam moments (not step counters, which agree anyway)."""
    return [
        v
        for state in optimizer.state.values()
        for k, v in state.items()
        if k != "step" and torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0
    ]


def build_sync(
    config: Config | str,
    world_size: int,
    device: torch.device | None = None,
    *,
    before_all_reduce: Callable[[torch.Tensor], None] | None = None,
) -> Sync:
    """The strategy of a Config's train.sync, or a strategy by name with default settings.
    `before_all_reduce`: GradSync's (the config allows train.noise_scale only with grad)."""
    if isinstance(config, str):
        config = Config.from_dict({"train": {"sync": config}})
    train = config.train
    if train.sync == "grad":
        return GradSync(world_size, device, before_all_reduce=before_all_reduce)
    if train.sync == "param":
        return ParamSync(
            world_size,
            device,
            every=train.average_every,
            warmup=train.local_sgd_warmup,
            average_optimizer_state=train.average_optimizer_state,
        )
    outer = config.outer
    return DiLoCoSync(
        world_size,
        device,
        every=train.average_every,
        warmup=train.local_sgd_warmup,
        outer_lr=outer.lr,
        outer_momentum=outer.momentum,
        nesterov=outer.nesterov,
    )
