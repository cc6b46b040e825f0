"""Dropout whose mask belongs to the row, not to the worker: the same under any W and k.

`RowDropout(p, stream)` drops element j of row b when the row-keyed uniform of (train.seed,
stream, epoch, row b's id, j) is below p (raymb.core.rng), so a row loses the same units
whichever worker trains on it, in whichever microbatch, and after a resume. Each dropout
site of a model takes its own stream (0 <= stream < 2**32; the built-in models number
theirs 1, 2, ...). A model of your own uses it like torch.nn.Dropout:

    from raymb.models.dropout import RowDropout
    self.drop = RowDropout(0.1, stream=1)   # another stream for each site

In eval mode it passes its input through. Outside raymb's training loop (no row keys set,
raymb.core.rng.row_keys) it falls back to torch's dropout.
"""

from __future__ import annotations

import torch
from torch import nn

from raymb.core import rng


class RowDropout(nn.Module):
    def __init__(self, p: float, stream: int) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout rate must be in [0, 1), not {p}")
        if not 0 <= stream < rng.AUGMENT_STREAMS:
            raise ValueError(f"a model's dropout stream must be in [0, 2**32), not {stream}")
        self.p, self.stream = p, stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rng.dropout(x, self.p, self.stream, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}, stream={self.stream}"
