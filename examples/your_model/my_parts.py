"""A model, a loss and a metric of your own, as examples/your_model/config.toml names them
(my_parts:two_inputs, my_parts:weighted_loss, my_parts:accuracy): docs/your-model.md."""

from __future__ import annotations

import torch
from torch import nn


class TwoInputs(nn.Module):
    """A tabular column and a sequence of ids: the ids' mean embedding beside the table."""

    def __init__(self, tab_width: int, vocab: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.head = nn.Sequential(nn.Linear(tab_width + 16, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, tab: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([tab, self.embed(ids).mean(dim=1)], dim=1))


def two_inputs(shapes: dict, classes: int) -> nn.Module:
    """raymb calls it as two_inputs({column: shape of one row}, classes)."""
    (tab_width,) = shapes["tab"]
    return TwoInputs(tab_width, vocab=50, classes=classes)


def weighted_loss(outputs: torch.Tensor, targets: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's cross-entropy times its weight, and the row's weight as its count: the
    step's loss is sum(weight * ce) / sum(weight) over all its rows, on every worker."""
    ce = nn.functional.cross_entropy(outputs, targets["label"], reduction="none")
    return ce * targets["weight"], targets["weight"]


def accuracy(outputs: torch.Tensor, targets: dict) -> dict:
    """Plain and weighted accuracy, as (sum, count): raymb sums both over the whole
    validation set on every worker before it divides."""
    right = (outputs.argmax(dim=1) == targets["label"]).float()
    weight = targets["weight"]
    return {"acc": (right.sum(), len(right)), "wacc": ((right * weight).sum(), weight.sum())}
