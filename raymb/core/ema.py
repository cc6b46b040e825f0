"""An exponential moving average of the weights (train.ema_decay), kept in float32.

After every optimizer step taken, each floating parameter's average moves towards it:
ema <- d_t * ema + (1 - d_t) * theta, with d_t = ema_decay, or during train.ema_warmup_steps
a decay ramped linearly from 0 (the t-th update, t = 0, 1, ..., uses
ema_decay * t / warmup_steps), so the first updates are not held at the initial weights. The
average starts at the weights training starts from. Under gradient sync every worker holds
the same weights after a step, so every worker's average is the same, and W x k is one
process's. Validation and the saved model (a checkpoint's model.pt) use the average
(`swapped`); buffers (BatchNorm's statistics) are the model's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class EMA:
    """The averages of `model`'s floating parameters, by name."""

    def __init__(self, decay: float, warmup_steps: int = 0) -> None:
        self.decay, self.warmup_steps = decay, warmup_steps
        self.updates = 0
        """Updates so far (the warm-up's clock; a checkpoint carries it)."""
        self.shadow: dict[str, torch.Tensor] = {}

    def start(self, model: nn.Module) -> None:
        """The average of a run that has taken no step: the weights it starts from."""
        self.shadow = {
            name: p.detach().float().clone() for name, p in _floating(model) if p.requires_grad
        }

    def decay_at(self, update: int) -> float:
        """d_t of the `update`-th update (0-based)."""
        if update < self.warmup_steps:
            return self.decay * update / self.warmup_steps
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average, after an optimizer step."""
        d = self.decay_at(self.updates)
        params = dict(_floating(model))
        names = list(self.shadow)
        averages = [self.shadow[n] for n in names]
        torch._foreach_mul_(averages, d)
        torch._foreach_add_(averages, [params[n].float() for n in names], alpha=1 - d)
        self.updates += 1

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[None]:
        """The model holding the averages for the block (validation, a checkpoint's model.pt),
        its own weights back after it."""
        params = dict(_floating(model))
        own = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, average in self.shadow.items():
                params[n].copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, weights in own.items():
                    params[n].copy_(weights)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "shadow": {n: t.cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.updates = state["updates"]
        self.shadow = {n: t.to(device) for n, t in state["shadow"].items()}


def _floating(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    return ((n, p) for n, p in model.named_parameters() if p.is_floating_point())
