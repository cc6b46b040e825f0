"""Check a parquet dataset before training, so a bad column fails in one line, not mid-run.

A dataset's files are found by raymb.data.listing (a file, a directory, a glob or a URI).
Features are either one list column (fixed_size_list, or list/large_list of equal-length
rows) or several numeric scalar columns; the label is an integer (classification) or
floating (regression) column.
Each file's footer answers the column types; the feature and label columns are then read
once, a batch at a time, and scanned with pyarrow.compute for nulls, NaN and inf, list
lengths and the range of integer labels. Training defers the feature scan to the workers'
own read of the data (`check_values`), so a large set is not read an extra time up front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raymb.data.columns import ShapeError, feature_shape, flat_values
from raymb.data.listing import resolve_files
from raymb.errors import ConfigError, DataError, one_line

_SCAN_ROWS = 1 << 16  # rows per batch when scanning a file's columns
# Classes inferred from the labels (max label + 1) above this are refused unless
# model.num_classes says so: one stray label of 10**12 would otherwise size the model.
MAX_CLASSES = 100_000


@dataclass(frozen=True)
class DatasetInfo:
    """What training needs to know about a checked dataset."""

    files: tuple[str, ...]  # parquet files as paths on `filesystem`, sorted
    num_rows: int
    num_features: int  # d: list length, or number of scalar feature columns
    label_kind: str  # "int" (classification), "float" (regression), "multi" (a 0/1 list)
    num_classes: int | None  # max label + 1 for int labels, the list's length for multi
    filesystem: pafs.FileSystem = field(repr=False)  # pass to readers for non-local paths
    file_rows: tuple[int, ...] = ()  # rows of each file, in the order of `files`
    bytes: int = 0  # uncompressed size of the files' columns, from their footers
    feature_shape: tuple[int, ...] = ()  # one row's features: (d,), (C, H, W), (T + 1,)
    feature_type: str = "float32"  # the stored value type of a list or tensor column
    value_range: tuple[int, int] | None = None  # integer features (token ids): (min, max)
    columns: tuple[tuple[str, tuple[int, ...], str], ...] = ()  # data.inputs: name, shape, type


def check_dataset(
    path: str,
    features: str | list[str],
    label: str | None,
    *,
    what: str = "data.train",
    scan_features: bool = True,
    task: str = "auto",
    max_classes: int | None = None,
) -> DatasetInfo:
    """Resolve `path` and check every file's features and label columns; raise DataError.

    A feature column is a list of numbers (fixed-size, or of equal length in every row) or a
    fixed-shape tensor (see raymb.data.columns); `label` None (data.task = "lm") reads no label.
    With `scan_features=False` the feature values (nulls, NaN, inf) are left to whoever
    reads them next (the training workers' first pass, `check_values`): only the footers and
    the label column are read here, list columns of variable length for their widths, and
    token ids (lm) for their range. `max_classes`: integer labels at or above it are refused
    (pass MAX_CLASSES where the class count is inferred from them, no model.num_classes).
    """
    if isinstance(features, str):
        feature_cols = [features]
    else:
        feature_cols = list(features)
        if not feature_cols or not all(isinstance(c, str) for c in feature_cols):
            raise ConfigError(
                f"data.features: expected a column name or a list of names, got {features!r}"
            )
        if len(set(feature_cols)) != len(feature_cols):
            raise ConfigError(f"data.features: duplicate column names in {feature_cols}")
    if label is not None and label in feature_cols:
        raise ConfigError(f"data.label: column {label!r} is also listed in data.features")

    files, fs = resolve_files(path, what=what)
    num_rows = 0
    dims: tuple[tuple[int, ...], str] | None = None  # (shape, first file) to compare against
    kind: tuple[str, str] | None = None
    max_label: int | None = None
    value_range: tuple[int, int] | None = None
    value_type = "float32"
    file_rows: list[int] = []
    size = 0
    for f in files:
        pf = _open(fs, f, what)
        schema, meta = pf.schema_arrow, pf.metadata
        prefix = f"{what}: {f}"
        num_rows += meta.num_rows
        file_rows.append(meta.num_rows)
        size += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))

        # The footer answers the types; one read of the columns answers the rest.
        if label is not None:
            label_field = _field(schema, label, prefix, "label")
            label_type = label_field.type
            file_kind = _label_kind(label_type)
            if file_kind == "multi":  # multi-label: a fixed length of 0/1 targets
                width, _ = _feature_layout(label_field, prefix)
                max_label = None if width is None else width[0] - 1
            if file_kind is None:
                raise DataError(
                    f"{prefix}: label column {label!r} has type {label_type}, "
                    "expected an integer (classification) or floating (regression) type, or "
                    "a fixed-length list of 0/1 (multi-label)"
                )
            if kind is not None and file_kind != kind[0]:
                raise DataError(
                    f"{prefix}: label column {label!r} has type {label_type}, "
                    f"expected {'an integer' if kind[0] == 'int' else 'a floating'} type "
                    f"as in {kind[1]}"
                )
            kind = kind or (file_kind, f)
        shape: tuple[int, ...] | None = (len(feature_cols),)
        if isinstance(features, str):
            shape, leaf = _feature_layout(_field(schema, features, prefix, "feature"), prefix)
            value_type = str(leaf)
            if task == "lm" and not pa.types.is_integer(leaf):
                raise DataError(
                    f'{prefix}: data.task = "lm" needs integer token ids, but column '
                    f"{features!r} holds {leaf}"
                )
        else:
            for c in feature_cols:
                t = _field(schema, c, prefix, "feature").type
                if not _is_number(t):
                    raise DataError(
                        f"{prefix}: feature column {c!r} has type {t}, expected a numeric scalar "
                        "(a list of names means one scalar column each)"
                    )

        reread = shape is None or task == "lm"  # for the widths, or the token ids' range
        scanned = [*(feature_cols if scan_features or reread else []), *_opt(label)]
        scans = _scan(pf, scanned, prefix)
        for c in scanned:
            scans[c].check(c, prefix, values=scan_features or c == label)

        if shape is None:  # a list of variable length: the rows tell
            width = _list_width(scans[features], features, prefix)
            shape = None if width is None else (width,)
        if shape is not None and dims is not None and shape != dims[0]:
            raise DataError(
                f"{prefix}: column {features!r} has {_width(shape)}, expected "
                f"{_width(dims[0])} as in {dims[1]}"
            )
        if shape is not None:
            dims = dims or (shape, f)
        if task == "lm" and scans[features].range is not None:
            lo, hi = scans[features].range
            if lo < 0:
                raise DataError(f"{prefix}: column {features!r} has negative token id {lo}")
            value_range = _widen(value_range, lo, hi)

        if label is not None and file_kind == "int" and scans[label].range is not None:
            lo, hi = scans[label].range
            if lo < 0:
                raise DataError(
                    f"{prefix}: label column {label!r} has negative value {lo}, "
                    "expected class indices 0..C-1"
                )
            if max_classes is not None and hi >= max_classes:
                raise DataError(
                    f"{prefix}: label column {label!r} holds {hi}, which makes {hi + 1} "
                    f"classes, over the {max_classes} raymb infers from labels; set "
                    "model.num_classes if the data has that many, else fix the label"
                )
            max_label = hi if max_label is None else max(max_label, hi)

    if num_rows == 0:
        n = len(files)
        raise DataError(
            f"{what}: {path} is empty (0 rows in {n} parquet file{'s' if n != 1 else ''})"
        )
    assert dims is not None
    return DatasetInfo(
        files=tuple(files),
        num_rows=num_rows,
        num_features=math.prod(dims[0]),
        label_kind="none" if kind is None else kind[0],
        num_classes=None if max_label is None else max_label + 1,
        filesystem=fs,
        file_rows=tuple(file_rows),
        bytes=size,
        feature_shape=dims[0],
        feature_type=value_type,
        value_range=value_range,
    )


def describe_shape(info: DatasetInfo, features: str | list[str]) -> str:
    """The features as the schema check reports them: `image: uint8[3, 32, 32]`; named
    inputs: `input_ids: int64[128], attention_mask: int64[128]`."""
    if info.columns:
        return ", ".join(f"{n}: {t}{_shape(s) if s else ''}" for n, s, t in info.columns)
    if not isinstance(features, str):
        return f"{len(features)} scalar columns"
    return f"{features}: {info.feature_type}{_shape(info.feature_shape)}"


def _feature_layout(field: pa.Field, prefix: str) -> tuple[tuple[int, ...] | None, pa.DataType]:
    try:
        shape, leaf = feature_shape(field)
    except ShapeError as e:
        hint = " (for scalar columns give a list of names)" if _is_number(field.type) else ""
        raise DataError(
            f"{prefix}: feature column {field.name!r} is {e}, expected a list of numbers or a "
            f"fixed-shape tensor{hint}"
        ) from None
    if not _is_number(leaf):
        raise DataError(
            f"{prefix}: feature column {field.name!r} has type {field.type}, expected a list "
            "of numbers or a fixed-shape tensor of numbers"
        )
    if shape is not None and math.prod(shape) < 1:
        raise DataError(f"{prefix}: feature column {field.name!r} has 0 values per row")
    return shape, leaf


def _opt(label: str | None) -> list[str]:
    return [] if label is None else [label]


def _width(shape: tuple[int, ...]) -> str:
    return f"{shape[0]} features per row" if len(shape) == 1 else f"rows of shape {_shape(shape)}"


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


@dataclass
class _ColumnScan:
    """What one read of a column tells: nulls, rows with NaN or inf, list lengths, range."""

    nulls: int = 0
    nonfinite_rows: int = 0
    lengths: tuple[int, int] | None = None  # list columns: (min, max) values per row
    range: tuple[int, int] | None = None  # integer columns: (min, max)

    def add(self, values: pa.Array) -> None:
        t = values.type
        if isinstance(t, pa.ExtensionType):
            values, t = values.storage, t.storage_type
        if _is_list(t):
            self.nulls += values.null_count
            if pa.types.is_list(t) or pa.types.is_large_list(t):
                lengths = pc.list_value_length(values)
                lo, hi = (v.as_py() for v in pc.min_max(lengths).values())
                if lo is not None:
                    self.lengths = _widen(self.lengths, lo, hi)
            flat = flat_values(values)
            self.nulls += flat.null_count
            if pa.types.is_floating(flat.type) and not values.null_count and len(flat):
                # A row counts once however many of its values are NaN or inf.
                bad = np.flatnonzero(~np.isfinite(flat.to_numpy(zero_copy_only=False)))
                if len(bad):
                    self.nonfinite_rows += len(np.unique(_row_of(values, bad)))
            elif pa.types.is_integer(flat.type) and len(flat):
                lo, hi = (v.as_py() for v in pc.min_max(flat).values())
                if lo is not None:
                    self.range = _widen(self.range, lo, hi)
            return
        self.nulls += values.null_count
        if pa.types.is_floating(t):
            self.nonfinite_rows += pc.sum(pc.invert(pc.is_finite(values))).as_py() or 0
        elif pa.types.is_integer(t):
            lo, hi = (v.as_py() for v in pc.min_max(values).values())
            if lo is not None:
                self.range = _widen(self.range, lo, hi)

    def check(self, col: str, prefix: str, *, values: bool = True) -> None:
        if not values:
            return  # read for its lengths only
        if self.nulls:
            raise DataError(f"{prefix}: column {col!r} has {self.nulls} null values, expected none")
        if self.nonfinite_rows:
            n = self.nonfinite_rows
            raise DataError(
                f"{prefix}: {n} row{'s' if n != 1 else ''} with NaN or inf in {col!r}, "
                "expected finite numbers"
            )


def check_values(table: pa.Table, columns: list[str], prefix: str) -> None:
    """The nulls, NaN and inf check of check_dataset, on rows already read (one file's, or
    a batch of them): a DataError naming `prefix` and the column."""
    for c in columns:
        scan = _ColumnScan()
        for chunk in table.column(c).chunks:
            scan.add(chunk)
        scan.check(c, prefix)


def _scan(pf: pq.ParquetFile, cols: list[str], prefix: str) -> dict[str, _ColumnScan]:
    """Read `cols` of one file a batch at a time (memory stays bounded) and scan them."""
    scans = {c: _ColumnScan() for c in cols}
    try:
        for batch in pf.iter_batches(batch_size=_SCAN_ROWS, columns=cols):
            for c in cols:
                scans[c].add(batch.column(c))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{prefix}: cannot read the file ({one_line(e)})") from None
    return scans


def _widen(span: tuple[int, int] | None, lo: int, hi: int) -> tuple[int, int]:
    return (lo, hi) if span is None else (min(span[0], lo), max(span[1], hi))


def _open(fs: pafs.FileSystem, f: str, what: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(f, filesystem=fs)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{what}: not a parquet file: {f} ({one_line(e)})") from None


def read_file(path: str, columns: tuple[str, ...], filesystem, what: str) -> pa.Table:
    """One file of a cached dataset as a pyarrow Table: `columns` of it, whole. A Ray task of
    the driver (raymb.driver.cluster.data_spec) or a TorchSession's read; a file that cannot be
    read is a DataError naming it."""
    try:
        return pq.read_table(path, columns=list(columns), filesystem=filesystem)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{what}: could not read {path} ({one_line(e)})") from None


def read_blocks(
    files: tuple[str, ...], columns: tuple[str, ...], filesystem, what: str
) -> tuple[pa.Table, ...]:
    """A cached dataset's files as pyarrow Tables, in file order."""
    return tuple(read_file(f, columns, filesystem, what) for f in files)


def _field(schema: pa.Schema, name: str, prefix: str, role: str) -> pa.Field:
    if schema.get_field_index(name) < 0:
        names = ", ".join(schema.names) or "none"
        raise DataError(f"{prefix}: no {role} column {name!r} (columns: {names})")
    return schema.field(name)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _label_kind(t: pa.DataType) -> str | None:
    if _is_list(t) and _is_number(t.value_type):
        return "multi"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    return None


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _list_width(scan: _ColumnScan, col: str, prefix: str) -> int | None:
    """Values per row of a variable-length list column (all rows equal); None for an empty
    file's lists."""
    if scan.lengths is None:
        return None  # no rows to measure; other files decide the width
    lo, width = scan.lengths
    if lo != width:
        raise DataError(
            f"{prefix}: column {col!r} is ragged: lengths {lo}..{width}, expected a fixed length"
        )
    if width < 1:
        raise DataError(f"{prefix}: feature column {col!r} has 0 values per row")
    return width


def _row_of(values: pa.Array, flat_index: np.ndarray) -> np.ndarray:
    """The rows that values at these positions of flat_values(values) belong to."""
    if pa.types.is_fixed_size_list(values.type):
        return flat_index // (len(flat_values(values)) // max(len(values), 1))
    parents = pc.list_parent_indices(values).to_numpy()
    return parents[flat_index]
