"""The named columns (data.inputs, data.targets) checked before a run: every column there, in
every file, numeric, one fixed shape a row; the label as raymb.data.checks checks it.

Rows of different lengths are padded once, by `raymb prepare text` (fixed-length input_ids
and an attention_mask): a column of ragged lists is refused here, naming it.
"""

from __future__ import annotations

import dataclasses

from raymb.config.data import Named
from raymb.data.checks import DatasetInfo, check_dataset
from raymb.errors import DataError


def check_named(
    path: str,
    named: Named,
    *,
    what: str = "data.train",
    max_classes: int | None = None,
    read_label: bool = True,
) -> DatasetInfo:
    """check_dataset for named columns: the returned info's `columns` holds each input's
    (name, one row's shape, value type); its label fields are data.label's (when a target).
    A missing column, a ragged or nested one, nulls in the label: one-line DataErrors."""
    label = named.label if read_label and named.label in named.targets else None
    others = [c for c in named.columns if c != label]
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    info = None
    for column in others:
        try:  # a list or tensor column
            one = check_dataset(path, column, None, what=what, scan_features=False)
            shapes[column] = (one.feature_shape, one.feature_type)
        except DataError as list_error:  # a scalar column: checked as one of scalar features
            try:
                one = check_dataset(path, [column], None, what=what, scan_features=False)
            except DataError:
                raise list_error from None
            shapes[column] = ((), "scalar")
        info = info or one
    if label is not None and others:
        first = others[0]
        form = first if shapes[first][0] else [first]
        info = check_dataset(
            path, form, label, what=what, scan_features=False, max_classes=max_classes
        )
    columns = tuple((c, *shapes[c]) for c in named.inputs if c in shapes)
    if label in named.inputs:
        columns = (*columns, (label, (), "label"))
    return dataclasses.replace(info, columns=columns, feature_shape=(), num_features=0)
