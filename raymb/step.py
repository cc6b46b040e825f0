"""One optimizer step over k microbatches, with the exact loss weighting of DESIGN.md."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from raymb.models import summed_loss
from raymb.sync import Sync


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    microbatches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    step_samples: int,
    *,
    sync: Sync,
    classify: bool,
    grad_clip: float | None = None,
) -> torch.Tensor:
    """Accumulate gradients over this worker's microbatches and take one optimizer step.

    Each microbatch contributes sum(loss_i) / step_samples, where step_samples counts the
    samples of the step on all workers; with the summing all-reduce the gradient is the
    mean over exactly the samples in the step, whatever the split. Returns this worker's
    summed (unnormalised) loss, detached, on its device
    (no host sync here: the loop reads it only when it reports).
    """
    optimizer.zero_grad(set_to_none=True)
    total = None
    last = len(microbatches) - 1
    for i, (x, y) in enumerate(microbatches):
        with sync.microbatch(model, last=i == last):
            loss = summed_loss(model(x), y, classify)
            (loss / step_samples).backward()
        total = loss.detach() if total is None else total + loss.detach()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    sync.after_step(model, optimizer)
    return total
