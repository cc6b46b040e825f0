"""Arrow columns to tensors, and the collate that turns stored values into the model's input.

A feature column holds a number per row (several scalar columns), a list of numbers, or a
fixed-shape tensor: the Arrow fixed-shape tensor extension type, Ray Data's tensor types
(read with or without Ray imported), or nested fixed-size lists. Values keep their stored
type (uint8 images stay uint8 in a cache, four times smaller than float32); the collate
(raymb.core.shape.InputShape, made here by `input_shape`) makes floats of them (data.scale,
data.mean, data.std) or, for language modelling, splits a token block into input and target,
on the worker's device.
"""

from __future__ import annotations

import json
import warnings
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from raymb.config.data import Named
from raymb.core.shape import InputShape
from raymb.errors import ConfigError

_RAY_TENSOR = b"ray.data.arrow_tensor"  # ray.data.arrow_tensor and ..._v2 (fixed shapes)
_RAY_RAGGED = b"ray.data.arrow_variable_shaped_tensor"
_EXT_NAME, _EXT_META = b"ARROW:extension:name", b"ARROW:extension:metadata"

if TYPE_CHECKING:  # torch is imported where tensors are made: the checks before a
    import torch  # run (raymb.data.checks) read only Arrow

    from raymb.config import DataSection
    from raymb.core.batch import Columns


class ShapeError(ValueError):
    """A column whose rows cannot have one fixed shape (the schema check names the file)."""


def column_names(features: str | list[str] | Named, label: str | None) -> list[str]:
    """The columns a dataset is read for: the feature column(s), then the label (if any);
    or data.inputs and data.targets, each once."""
    if isinstance(features, Named):
        return list(features.columns)
    names = [features] if isinstance(features, str) else list(features)
    return names if label is None else [*names, label]


def feature_shape(field: pa.Field) -> tuple[tuple[int, ...] | None, pa.DataType]:
    """(one row's shape, value type) of a list or tensor column; the shape is None for a
    variable-length list, whose length only the rows tell. ShapeError for other nestings."""
    t = field.type
    meta = field.metadata or {}
    if isinstance(t, pa.FixedShapeTensorType):
        return tuple(t.shape), t.value_type
    if isinstance(t, pa.ExtensionType) and hasattr(t, "shape"):  # Ray's, with Ray imported
        shape = getattr(t, "shape", None)
        if shape is None or any(s is None for s in shape):
            raise ShapeError("a variable-shaped (ragged) tensor column")
        return tuple(shape), _leaf_type(t.storage_type)
    name = meta.get(_EXT_NAME, b"")
    if name.startswith(_RAY_RAGGED):
        raise ShapeError("a variable-shaped (ragged) tensor column")
    if name.startswith(_RAY_TENSOR):  # Ray's tensor type, read without Ray: shape in metadata
        return tuple(json.loads(meta[_EXT_META])), _leaf_type(t)
    if pa.types.is_fixed_size_list(t):
        inner = t.value_type
        if pa.types.is_fixed_size_list(inner):
            rest, leaf = feature_shape(pa.field("item", inner))
            return (t.list_size, *rest), leaf
        if _is_list(inner):
            raise ShapeError("lists of variable length inside a fixed-size list")
        return (t.list_size,), inner
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        if _is_list(t.value_type):
            raise ShapeError(
                "nested lists of variable length (use fixed-size lists or a tensor type)"
            )
        return None, t.value_type
    raise ShapeError(f"type {t}")


def flat_values(array: pa.Array) -> pa.Array:
    """Every value of a list or tensor column's rows, in row-major order (slices respected)."""
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    while _is_list(array.type):
        array = array.flatten()
    return array


def column_array(column: pa.ChunkedArray | pa.Array, shape: tuple[int, ...] | None) -> np.ndarray:
    """A list or tensor column as a (rows, *shape) array of its stored type (shape None: the
    rows' common length)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    rows = len(column)
    values = flat_values(column).to_numpy(zero_copy_only=False)
    return values.reshape(rows, *(shape if shape is not None else (-1,)))


def table_to_tensors(
    table: pa.Table, features: str | list[str] | Named, label: str | None
) -> tuple[Columns, Columns]:
    """(features, label) as tensors; for named columns (data.inputs) ({input: tensor},
    {target: tensor}), see `named_tensors`. Features: (rows, *shape), integers as stored, floats as
    float32; several scalar columns as float32 (rows, d). Label: int64 (classes) or float32
    (regression); no label (language modelling): an empty (rows, 0) tensor."""
    if isinstance(features, Named):
        return named_tensors(table, features)
    if isinstance(features, str):
        field = table.schema.field(features)
        shape, _ = feature_shape(field)
        x = column_array(table.column(features), shape)
        if np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32, copy=False)
    else:
        x = np.stack([table.column(c).to_numpy() for c in features], axis=1).astype(np.float32)
    if label is None:
        y = np.zeros((table.num_rows, 0), np.int64)
    else:
        y = _values(table, label)
    return _tensor(x), _tensor(y)


def named_tensors(table: pa.Table, named: Named) -> tuple[dict, dict]:
    """data.inputs and data.targets as {column: tensor}: (rows,) for a scalar column, (rows,
    *shape) for a list or tensor column; integers as int64 (token ids, labels), floats as
    float32, booleans as bool. A column in both shares one tensor."""
    tensors = {c: _tensor(_values(table, c)) for c in named.columns}
    return {c: tensors[c] for c in named.inputs}, {c: tensors[c] for c in named.targets}


def _values(table: pa.Table, name: str) -> np.ndarray:
    """One column as an array: integers as int64, floats as float32, lists stacked."""
    field = table.schema.field(name)
    if _is_list(field.type) or isinstance(field.type, pa.ExtensionType):
        shape, _ = feature_shape(field)
        v = column_array(table.column(name), shape)
    else:
        v = table.column(name).to_numpy()
    if np.issubdtype(v.dtype, np.integer):
        return v.astype(np.int64, copy=False)
    if np.issubdtype(v.dtype, np.floating):
        return v.astype(np.float32, copy=False)
    return v


def _tensor(values: np.ndarray) -> torch.Tensor:
    # Arrow's buffers are read-only; nothing writes to these tensors in place (the collate
    # and index_select make new ones), so torch's warning about that does not apply.
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(values))


def input_shape(data: DataSection, task: str, shape: tuple[int, ...]) -> InputShape:
    """A run's inputs: its resolved task, the rows' shape, data.scale/mean/std; a
    data.augment the rows cannot take is a ConfigError."""
    check_augment(data.augment, task, shape)
    return InputShape(
        task=task,
        shape=shape,
        scale=data.scale,
        mean=None if data.mean is None else tuple(data.mean),
        std=None if data.std is None else tuple(data.std),
    )


def check_augment(augment, task: str, shape: tuple[int, ...]) -> None:
    """data.augment against the rows (a ConfigError naming the key): image transforms need
    image rows [C, H, W], reflect padding a smaller padding than the image, and no key
    applies to token blocks."""
    keys = ("hflip", "crop_padding", "rotate_degrees", "noise_std")
    on = [k for k in keys if getattr(augment, k)]
    if not on:
        return
    if task == "lm":
        raise ConfigError(
            f'data.augment.{on[0]} does not apply to token blocks (data.task = "lm"): unset it'
        )
    images = [k for k in on if k != "noise_std"]
    if images and len(shape) != 3:
        raise ConfigError(
            f"data.augment.{images[0]} needs image rows [C, H, W], but the rows have shape "
            f"{list(shape)}: unset it (data.augment.noise_std is the one for flat features)"
        )
    P = augment.crop_padding
    if P and augment.padding_mode == "reflect" and P >= min(shape[1:]):
        raise ConfigError(
            f'data.augment.crop_padding={P} with padding_mode = "reflect" must be smaller '
            f"than the images' {shape[1]}x{shape[2]} pixels: lower it or use padding_mode = "
            '"zero"'
        )


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _leaf_type(t: pa.DataType) -> pa.DataType:
    while _is_list(t):
        t = t.value_type
    return t
