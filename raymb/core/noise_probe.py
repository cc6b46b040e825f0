"""train.noise_scale's probe: what it measures of each step's gradients, without changing a
number. It observes the step (raymb.core.step.train_step's `observer`); the arithmetic that
turns its numbers into the estimate is raymb.core.noise's, which stays free of torch for the
driver's report."""

from __future__ import annotations

import torch
from torch import nn

Measured = tuple[torch.Tensor, tuple[float, float, float]]
"""One step's numbers: a float64 tensor [sum over parts of |G_part|^2, |G_big|^2] and the floats
(parts, sum over parts of 1/B_part, 1/B_big)."""


class NoiseProbe:
    """What train.noise_scale measures of one step, on one worker, without changing a number.

    W >= 2: the squared norm of this worker's accumulated gradient as the DDP comm hook sees
    each bucket before its all-reduce (`add_local`, which GradSync's `before_all_reduce`
    calls). W = 1 with k >= 2 microbatches: the step's two halves (the first k // 2
    microbatches and the rest) play two workers: a copy of the gradient after the first half,
    and its difference from the final one (one copy, one subtraction and two norms a step,
    whatever k). Then the squared norm of the step's gradient. `take` keeps them as one
    float64 vector that the metrics' gather all-reduces with the losses
    (raymb.worker.metrics): no message of its own; `pop` hands them on.
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.measured: Measured | None = None
        """The last step's numbers, until `pop`."""
        self.start()

    @property
    def per_microbatch(self) -> bool:
        return self.world_size == 1

    def start(self) -> None:
        """Before the step's first microbatch."""
        self.local_sq: torch.Tensor | None = None
        self.half: list[torch.Tensor] | None = None
        """W = 1: the gradient after the first half of the step's microbatches."""
        self.units = [0, 0]

    def add_local(self, bucket: torch.Tensor) -> None:
        """W >= 2: a bucket of this worker's own gradient, before its all-reduce."""
        sq = torch.linalg.vector_norm(bucket, dtype=torch.float64).square()
        self.local_sq = sq if self.local_sq is None else self.local_sq + sq

    def after_microbatch(self, model: nn.Module, index: int, count: int, units: int) -> None:
        """Microbatch `index` of `count`, of `units`, has added its gradient; only W = 1 with
        k >= 2 looks (at the first half's end)."""
        if not self.per_microbatch or count < 2:
            return
        self.units[0 if index < count // 2 else 1] += units
        if index == count // 2 - 1:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            self.half = torch._foreach_mul(grads, 1.0)  # a copy, in one call

    def take(self, model: nn.Module, units: float, divisor: float, unscaled: bool = False) -> None:
        """Keep the step's numbers in `measured` (None when nothing was measured), in units
        (rows, tokens for lm). A part is a worker (W >= 2) or a half of the step (W = 1);
        |G_part|^2 is its mean gradient's: its summed gradient / N_step, scaled by
        N_step / B_part. Called after the all-reduce, before clipping. `unscaled`: a counted
        loss's step divided its gradient by `divisor` only after the parts were seen, so
        they are divided here."""
        if unscaled:
            if self.half is not None:
                torch._foreach_div_(self.half, divisor)
            if self.local_sq is not None:
                self.local_sq = self.local_sq / divisor**2
        self.measured = self._measure(model, units, divisor)
        self.start()

    def pop(self) -> Measured | None:
        """The last step's numbers, once."""
        measured, self.measured = self.measured, None
        return measured

    def _measure(self, model: nn.Module, units: int, divisor: float) -> Measured | None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if self.per_microbatch:
            if self.half is None:
                return None
            first = _squared(self.half)
            torch._foreach_sub_(self.half, grads)  # minus the second half's own gradient
            parts = [(first, self.units[0]), (_squared(self.half), self.units[1])]
        elif self.local_sq is None:
            return None
        else:
            parts = [(self.local_sq, units)]
        parts = [(sq, b) for sq, b in parts if b]
        big_sq = _squared(grads)
        small = sum((sq * (divisor / b) ** 2 for sq, b in parts), torch.zeros_like(big_sq))
        floats = (float(len(parts)), sum(1.0 / b for _, b in parts), 1.0 / divisor)
        return torch.stack([small, big_sq]), floats


def _squared(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The squared norm of all the tensors together, as float64."""
    norms = torch._foreach_norm(tensors)
    return torch.linalg.vector_norm(torch.stack(norms), dtype=torch.float64).square()
