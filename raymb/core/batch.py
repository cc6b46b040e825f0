"""A batch's columns: one tensor (data.features, the label), or a dict of tensors by name
(data.inputs, data.targets). The few operations the loop needs, for either form."""

from __future__ import annotations

from typing import Any

import torch

Columns = torch.Tensor | dict[str, torch.Tensor]
"""One tensor, or named tensors that share their first dimension (the rows)."""


def rows(columns: Columns) -> int:
    if isinstance(columns, dict):
        return len(next(iter(columns.values())))
    return len(columns)


def index(columns: Columns, at: torch.Tensor) -> Columns:
    """The rows at `at` (index_select)."""
    if isinstance(columns, dict):
        return {k: v.index_select(0, at) for k, v in columns.items()}
    return columns.index_select(0, at)


def part(columns: Columns, start: int, stop: int) -> Columns:
    """Rows start..stop, as views."""
    if isinstance(columns, dict):
        return {k: v[start:stop] for k, v in columns.items()}
    return columns[start:stop]


def every(columns: Columns, start: int, step: int) -> Columns:
    """Rows start, start + step, ... (a worker's share of the validation set)."""
    if isinstance(columns, dict):
        return {k: v[start::step] for k, v in columns.items()}
    return columns[start::step]


def to(columns: Columns, device: torch.device) -> Columns:
    if isinstance(columns, dict):
        return {k: v.to(device, non_blocking=True) for k, v in columns.items()}
    return columns.to(device, non_blocking=True)


def device_of(columns: Columns) -> torch.device:
    if isinstance(columns, dict):
        return next(iter(columns.values())).device
    return columns.device


def forward(model: torch.nn.Module, inputs: Columns) -> Any:
    """The model's output: model(x) for one tensor, model(**inputs) for named columns."""
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def logits(output: Any) -> torch.Tensor:
    """The tensor the built-in losses read of a model's output: the output itself, or a
    Hugging Face ModelOutput's (or a dict's) `logits`."""
    if isinstance(output, torch.Tensor):
        return output
    found = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if not isinstance(found, torch.Tensor):
        raise TypeError(
            f"the model returned {type(output).__name__}: return a tensor, or an output with "
            "`logits` (a Hugging Face ModelOutput), or use a loss of your own (loss.name)"
        )
    return found
