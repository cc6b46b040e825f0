"""What a model takes: one row's stored shape, the task, and how a batch of stored values
becomes the model's input.

The one description of a model's input: the plan carries it to the workers (as `to_dict`),
the workers build the model for its `model_shape`, and a checkpoint stores it (the same
dict) for raymb eval, predict, export and sample. The driver makes it from the data
(raymb.data.columns.input_shape); torch is imported only where a batch is collated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from raymb.core.batch import Columns
    from raymb.core.rng import RowKeys

TASKS = ("classify", "regress", "lm")


class RowTransforms(Protocol):
    """data.augment's transforms (raymb.data.augment.Augment), drawn from each row's keys."""

    def images(self, x: torch.Tensor, keys: RowKeys | None) -> torch.Tensor: ...
    def noise(self, x: torch.Tensor, keys: RowKeys | None) -> torch.Tensor: ...


@dataclass(frozen=True)
class InputShape:
    """What the model takes, and how a batch of stored values becomes it."""

    task: str
    """classify, regress or lm."""
    shape: tuple[int, ...]
    """One row's stored feature shape ((d,), (C, H, W), (T + 1,) for token blocks)."""
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    columns: tuple[tuple[str, tuple[int, ...]], ...] | None = None
    """data.inputs: each input column's name and one row's shape (() for a scalar); the model
    takes them by name, as stored."""

    @property
    def model_shape(self) -> tuple[int, ...] | dict[str, tuple[int, ...]]:
        """One row's shape as the model sees it: a block of T + 1 tokens feeds T; named
        inputs: {column: shape}."""
        if self.columns is not None:
            return dict(self.columns)
        return (self.shape[0] - 1,) if self.task == "lm" else self.shape

    @property
    def units_per_row(self) -> int:
        """What the loss is a mean over, per row: its T tokens for lm, else the row."""
        return self.shape[0] - 1 if self.task == "lm" else 1

    @property
    def in_features(self) -> int:
        return math.prod(self.shape)

    @property
    def classify(self) -> bool:
        """Integer targets (classes, or the next token for lm), not regression."""
        return self.task != "regress"

    def collate(
        self,
        x: Columns,
        y: Columns,
        augment: RowTransforms | None = None,
        keys: RowKeys | None = None,
    ) -> tuple[Columns, Columns]:
        """Stored values (already on the device) to the model's input and target; training
        rows with data.augment's transforms, drawn from their `keys` (raymb.data.augment)."""
        import torch

        if isinstance(x, dict):
            return x, y  # named columns reach the model as stored
        if self.task == "lm":
            tokens = x.long()
            return tokens[:, :-1], tokens[:, 1:]
        if x.dtype != torch.float32:
            x = x.float()
        if self.scale is not None:
            x = x * self.scale
        if augment is not None:
            x = augment.images(x, keys)  # before mean/std: zero padding is black
        if self.mean is not None:
            view = (1, -1) + (1,) * (x.dim() - 2)  # per channel: dim 1, channels first
            mean = torch.tensor(self.mean, device=x.device).view(view)
            std = torch.tensor(self.std, device=x.device).view(view)
            x = (x - mean) / std
        if augment is not None:
            x = augment.noise(x, keys)
        return x, y

    def to_dict(self) -> dict:
        """The stored form: a plan's `inputs`, a checkpoint's `inputs` (kept as it is, so
        that every checkpoint written so far still loads)."""
        stored = {
            "task": self.task,
            "shape": list(self.shape),
            "scale": self.scale,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
        }
        if self.columns is not None:
            stored["columns"] = [[name, list(shape)] for name, shape in self.columns]
        return stored

    @classmethod
    def from_dict(cls, d: dict) -> InputShape:
        return cls(
            task=d["task"],
            shape=tuple(d["shape"]),
            scale=d.get("scale"),
            mean=None if d.get("mean") is None else tuple(d["mean"]),
            std=None if d.get("std") is None else tuple(d["std"]),
            columns=None
            if d.get("columns") is None
            else tuple((name, tuple(shape)) for name, shape in d["columns"]),
        )
