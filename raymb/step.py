"""One optimizer step over k microbatches, with the exact loss weighting of DESIGN.md."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from raymb.models import summed_loss
from raymb.sync import Sync


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    microbatches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    rows: int,
    *,
    sync: Sync,
    classify: bool,
    grad_clip: float | None = None,
    bf16: bool = False,
) -> tuple[torch.Tensor, bool]:
    """Accumulate gradients over this worker's microbatches and take one optimizer step.

    `rows` is this worker's samples in the step. Each microbatch contributes
    sum(loss_i) / sync.step_samples(rows): the samples of the step on all workers under
    gradient all-reduce, this worker's own under local SGD. With the summing all-reduce the
    gradient is then the mean over exactly the samples in the step, whatever the split.

    Returns this worker's summed (unnormalised) loss, detached, on its device, and whether
    the step was taken: when any worker's gradient is not finite, no worker steps.
    """
    optimizer.zero_grad(set_to_none=True)
    divisor = sync.step_samples(rows)
    total = None
    last = len(microbatches) - 1
    for i, (x, y) in enumerate(microbatches):
        with sync.microbatch(model, last=i == last), _autocast(x.device, bf16):
            loss = summed_loss(model(x), y, classify).float()
            (loss / divisor).backward()
        total = loss.detach() if total is None else total + loss.detach()
    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip is not None:
        norm = nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = nn.utils.get_total_norm([p.grad for p in params])
    if not sync.finite(norm):
        optimizer.zero_grad(set_to_none=True)
        return total, False
    optimizer.step()
    sync.after_step(model, optimizer)
    return total, True


def _autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
