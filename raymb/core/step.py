"""One optimizer step over k microbatches, with the exact loss weighting of docs/design.md."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from raymb.core import batch, rng
from raymb.core.batch import Columns
from raymb.core.objective import LossError, Objective
from raymb.core.optim import l1_step
from raymb.core.sync import Sync

Microbatch = tuple[Columns, Columns]
"""(the model's inputs, the loss's targets): tensors, or dicts of them by column name."""


class StepObserver(Protocol):
    """What watches a step's gradients and changes no number (train.noise_scale's NoiseProbe,
    raymb.core.noise_probe): `start` before the first microbatch, `after_microbatch` after
    each one's backward, `take` once the step's gradient is whole (all-reduced), before
    clipping."""

    def start(self) -> None: ...
    def after_microbatch(self, model: nn.Module, index: int, count: int, units: int) -> None: ...
    def take(self, model: nn.Module, units: int, divisor: float) -> None: ...


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    microbatches: Sequence[Microbatch],
    rows: int,
    *,
    sync: Sync,
    classify: bool = True,
    objective: Objective | None = None,
    grad_clip: float | None = None,
    bf16: bool = False,
    check_finite: bool = True,
    uneven: bool = False,
    l1: float = 0.0,
    observer: StepObserver | None = None,
) -> tuple[torch.Tensor, bool]:
    """Accumulate gradients over this worker's microbatches and take one optimizer step.

    `rows` is this worker's samples in the step (with `uneven`, the workers' may differ).
    Each microbatch contributes sum(loss_i) / sync.step_samples(rows): the samples of the
    step on all workers under gradient all-reduce, this worker's own under local SGD. With
    the summing all-reduce the gradient is then the mean over exactly the samples in the
    step, whatever the split.

    Returns this worker's summed (unnormalised) loss, detached, on its device, and whether
    the step was taken: with `check_finite`, when any worker's gradient is not finite, no
    worker steps (a gradient norm and a device sync each step; without it the caller checks
    the returned losses). `l1`: optim.l1's proximal step after the optimizer's, on this
    worker's parameters (before a param or diloco average). `observer` watches the step's
    gradients (not under L-BFGS). L-BFGS: lbfgs_step.

    `objective` (default: the built-in loss for `classify`) is what the step minimises
    (raymb.core.objective). A counted one returns its count with its loss: the gradients of
    the summed losses are divided once, after the last microbatch, by the step's count
    (all-reduced under gradient sync), and `objective.step_count` holds this worker's count.
    """
    objective = objective or Objective(classify=classify)
    if isinstance(optimizer, torch.optim.LBFGS):
        each = dict(sync=sync, objective=objective, bf16=bf16, uneven=uneven)
        return lbfgs_step(model, optimizer, microbatches, rows, **each)
    optimizer.zero_grad(set_to_none=True)
    divisor = None if objective.counted else sync.step_samples(rows, uneven=uneven)
    if observer is not None:
        observer.start()
    each = dict(sync=sync, objective=objective, bf16=bf16, observer=observer)
    total, divisor = accumulate(model, microbatches, divisor, **each)
    if observer is not None:  # before clipping; no number changes
        units = rows if not objective.counted else objective.step_count.item()
        observer.take(model, units, divisor, unscaled=objective.counted)
    norm = None
    if grad_clip is not None:
        norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    elif check_finite:
        norm = nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if check_finite and not sync.finite(norm):
        optimizer.zero_grad(set_to_none=True)
        return total, False
    optimizer.step()
    if l1:
        l1_step(optimizer, l1)
    sync.after_step(model, optimizer)
    return total, True


def lbfgs_step(
    model: nn.Module,
    optimizer: torch.optim.LBFGS,
    microbatches: Sequence[Microbatch],
    rows: int,
    *,
    sync: Sync,
    objective: Objective,
    bf16: bool = False,
    uneven: bool = False,
) -> tuple[torch.Tensor, bool]:
    """One L-BFGS step on the full batch (optim.name = "lbfgs", train.sync = "grad").

    Each evaluation of its closure is the loss and gradient over the step's rows on all
    workers: the gradient as train_step's (summed by the all-reduce, each loss divided by
    the step's rows), the mean loss all-reduced beside it. Every worker's line search sees
    the same numbers and takes the same decisions, so W workers take one process's step.
    Returns this worker's summed loss at the step's start (as train_step's) and True.
    """
    divisor = sync.step_samples(rows, uneven=uneven)
    first: list[torch.Tensor] = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        each = dict(sync=sync, objective=objective, bf16=bf16)
        total, _ = accumulate(model, microbatches, divisor, **each)
        if not first:
            first.append(total)
        mean = total / divisor
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(mean)  # this worker's part of the mean: their sum is the mean
        return mean

    optimizer.step(closure)
    sync.after_step(model, optimizer)
    return first[0], True


def accumulate(
    model: nn.Module,
    microbatches: Sequence[Microbatch],
    divisor: float | None,
    *,
    sync: Sync,
    objective: Objective,
    bf16: bool = False,
    observer: StepObserver | None = None,
) -> tuple[torch.Tensor, float]:
    """Forward and backward of every microbatch, the gradients accumulating; returns their
    summed loss, detached, and what the step's gradient was divided by.

    `divisor` known (the step's rows, or tokens): each loss's gradient is divided by it.
    None (a counted objective): the summed losses' gradients add up, then are divided once
    by the step's count (sync.step_count: all workers' under gradient sync), which is
    returned; `objective.step_count` is this worker's count. The row keys the loop set for
    the step's rows (raymb.core.rng) are narrowed to each microbatch's, so a row's dropout
    mask does not depend on the microbatch it falls in. `observer` is shown each
    microbatch's gradient (train_step's)."""
    total, count = None, None
    last = len(microbatches) - 1
    device = batch.device_of(microbatches[0][1])
    scale = _scale(1.0 if divisor is None else divisor, device)
    start = 0
    for i, (x, y) in enumerate(microbatches):
        n = batch.rows(y)
        with sync.microbatch(model, last=i == last), rng.microbatch(start, n):
            start += n
            if bf16:
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                    loss, counted = objective(batch.forward(model, x), y)
                loss = loss.float()
            else:
                loss, counted = objective(batch.forward(model, x), y)
            loss.backward(scale)  # the gradient of loss / divisor, without another op
        if counted is not None:
            counted = counted.detach().double()
            count = counted if count is None else count + counted
        if observer is not None:
            units = y.numel() if isinstance(y, torch.Tensor) else n
            units = units if counted is None else counted.item()
            observer.after_microbatch(model, i, last + 1, units)  # rows, tokens for lm
        total = loss.detach() if total is None else total + loss.detach()
    if divisor is None:
        objective.step_count = count
        divisor = sync.step_count(count)
        if not divisor > 0:
            raise LossError(
                f"loss.name {objective.loss_name!r}: a step's count is {divisor:g} over all its "
                "rows: count at least one element in every step"
            )
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads:
            torch._foreach_div_(grads, divisor)
    return total, divisor


@functools.lru_cache(maxsize=64)
def _scale(divisor: float, device: torch.device) -> torch.Tensor:
    """1 / divisor as a 0-d float32 tensor: the seed of backward(), made once per value."""
    return torch.full((), 1.0 / divisor, device=device)
