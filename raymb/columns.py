"""Arrow record batches to (features, label) tensors, without a copy where Arrow allows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch


def column_names(features: str | list[str], label: str) -> list[str]:
    """The columns a dataset is read for: the feature column(s), then the label."""
    return [*([features] if isinstance(features, str) else features), label]


def table_to_tensors(
    table: pa.Table, features: str | list[str], label: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features as float32 (rows, d); labels as int64 (classes) or float32 (regression)."""
    if isinstance(features, str):
        column = table.column(features).combine_chunks()
        flat = column.flatten().to_numpy(zero_copy_only=False)
        x = flat.reshape(len(column), -1)
    else:
        x = np.stack([table.column(c).to_numpy() for c in features], axis=1)
    y = table.column(label).to_numpy()
    y = y.astype(np.int64) if np.issubdtype(y.dtype, np.integer) else y.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y)
