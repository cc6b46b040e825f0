"""Check a parquet dataset before training, so a bad column fails in one line, not mid-run.

A dataset is a file, a directory (every `*.parquet` below it), a glob, or a URI that
`pyarrow.fs.FileSystem.from_uri` understands. Features are either one list column
(fixed_size_list, or list/large_list of equal-length rows) or several numeric scalar
columns; the label is an integer (classification) or floating (regression) column.
Each file's footer answers the column types; the feature and label columns are then read
once, a batch at a time, and scanned with pyarrow.compute for nulls, NaN and inf, list
lengths and the range of integer labels. Training defers the feature scan to the workers'
own read of the data (`check_values`), so a large set is not read an extra time up front.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raymb.errors import ConfigError, DataError

PARQUET_SUFFIX = ".parquet"
_GLOB_CHARS = frozenset("*?[")
_SCAN_ROWS = 1 << 16  # rows per batch when scanning a file's columns


@dataclass(frozen=True)
class DatasetInfo:
    """What training needs to know about a checked dataset."""

    files: tuple[str, ...]  # parquet files as paths on `filesystem`, sorted
    num_rows: int
    num_features: int  # d: list length, or number of scalar feature columns
    label_kind: str  # "int" (classification) or "float" (regression)
    num_classes: int | None  # max label + 1 for int labels, else None
    filesystem: pafs.FileSystem = field(repr=False)  # pass to readers for non-local paths
    file_rows: tuple[int, ...] = ()  # rows of each file, in the order of `files`
    bytes: int = 0  # uncompressed size of the files' columns, from their footers


def resolve_files(path: str, *, what: str = "data.train") -> tuple[list[str], pafs.FileSystem]:
    """Expand a file, directory, glob or URI into sorted parquet file paths and their filesystem."""
    if "://" in path:
        try:
            fs, root = pafs.FileSystem.from_uri(path)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise DataError(f"{what}: cannot open {path}: {_one_line(e)}") from None
    else:
        # Absolute paths keep working when Ray workers run in another directory.
        fs, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))

    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound and _GLOB_CHARS & set(root):
        candidates = _glob(fs, root)
        if not candidates:
            raise DataError(f"{what}: no files match {path}")
    elif info.type == pafs.FileType.NotFound:
        raise DataError(f"{what}: no such file or directory: {path}")
    elif info.type == pafs.FileType.Directory:
        selector = pafs.FileSelector(root, recursive=True)
        candidates = [
            f.path
            for f in fs.get_file_info(selector)
            if f.type == pafs.FileType.File and not _is_metadata(f.path[len(root) :])
        ]
        if not candidates:
            raise DataError(f"{what}: no parquet files under {path}")
    else:
        candidates = [root]

    for f in candidates:
        if not f.endswith(PARQUET_SUFFIX):
            raise DataError(f"{what}: not a parquet file: {f} (expected a *.parquet name)")
    return sorted(candidates), fs


def check_dataset(
    path: str,
    features: str | list[str],
    label: str,
    *,
    what: str = "data.train",
    scan_features: bool = True,
) -> DatasetInfo:
    """Resolve `path` and check every file's features and label columns; raise DataError.

    With `scan_features=False` the feature values (nulls, NaN, inf) are left to whoever
    reads them next (the training workers' first pass, `check_values`): only the footers and
    the label column are read here, and list columns of variable length for their widths.
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
    if label in feature_cols:
        raise ConfigError(f"data.label: column {label!r} is also listed in data.features")

    files, fs = resolve_files(path, what=what)
    num_rows = 0
    dims: tuple[int, str] | None = None  # (d, first file) to compare later files against
    kind: tuple[str, str] | None = None
    max_label: int | None = None
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
        label_type = _field(schema, label, prefix, "label").type
        file_kind = _label_kind(label_type)
        if file_kind is None:
            raise DataError(
                f"{prefix}: label column {label!r} has type {label_type}, "
                "expected an integer (classification) or floating (regression) type"
            )
        if kind is not None and file_kind != kind[0]:
            raise DataError(
                f"{prefix}: label column {label!r} has type {label_type}, "
                f"expected {'an integer' if kind[0] == 'int' else 'a floating'} type "
                f"as in {kind[1]}"
            )
        kind = kind or (file_kind, f)
        if isinstance(features, str):
            _check_list_type(_field(schema, features, prefix, "feature").type, features, prefix)
        else:
            for c in feature_cols:
                t = _field(schema, c, prefix, "feature").type
                if not _is_number(t):
                    raise DataError(
                        f"{prefix}: feature column {c!r} has type {t}, expected a numeric scalar "
                        "(a list of names means one scalar column each)"
                    )

        variable = isinstance(features, str) and not pa.types.is_fixed_size_list(
            schema.field(features).type
        )
        scanned = [*(feature_cols if scan_features or variable else []), label]
        scans = _scan(pf, scanned, prefix)
        for c in scanned:
            scans[c].check(c, prefix, values=scan_features or c == label)

        if isinstance(features, str):
            scan = scans.get(features, _ColumnScan())  # a fixed-size list: the type says
            d = _list_width(schema.field(features).type, scan, features, prefix)
        else:
            d = len(feature_cols)
        if d is not None and dims is not None and d != dims[0]:
            raise DataError(
                f"{prefix}: column {features!r} has {d} features per row, "
                f"expected {dims[0]} as in {dims[1]}"
            )
        if d is not None:
            dims = dims or (d, f)

        if file_kind == "int" and scans[label].range is not None:
            lo, hi = scans[label].range
            if lo < 0:
                raise DataError(
                    f"{prefix}: label column {label!r} has negative value {lo}, "
                    "expected class indices 0..C-1"
                )
            max_label = hi if max_label is None else max(max_label, hi)

    if num_rows == 0:
        n = len(files)
        raise DataError(
            f"{what}: {path} is empty (0 rows in {n} parquet file{'s' if n != 1 else ''})"
        )
    assert dims is not None
    assert kind is not None
    return DatasetInfo(
        files=tuple(files),
        num_rows=num_rows,
        num_features=dims[0],
        label_kind=kind[0],
        num_classes=None if max_label is None else max_label + 1,
        filesystem=fs,
        file_rows=tuple(file_rows),
        bytes=size,
    )


@dataclass
class _ColumnScan:
    """What one read of a column tells: nulls, rows with NaN or inf, list lengths, range."""

    nulls: int = 0
    nonfinite_rows: int = 0
    lengths: tuple[int, int] | None = None  # list columns: (min, max) values per row
    range: tuple[int, int] | None = None  # integer columns: (min, max)

    def add(self, values: pa.Array) -> None:
        t = values.type
        if _is_list(t):
            self.nulls += values.null_count
            flat = pc.list_flatten(values)
            self.nulls += flat.null_count
            lo, hi = (v.as_py() for v in pc.min_max(pc.list_value_length(values)).values())
            if lo is not None:
                self.lengths = _widen(self.lengths, lo, hi)
            if pa.types.is_floating(t.value_type) and not values.null_count:
                # A row counts once however many of its values are NaN or inf.
                bad = pc.invert(pc.is_finite(flat))
                rows = pc.filter(pc.list_parent_indices(values), bad)
                self.nonfinite_rows += pc.count_distinct(rows).as_py()
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
        raise DataError(f"{prefix}: cannot read the file ({_one_line(e)})") from None
    return scans


def _widen(span: tuple[int, int] | None, lo: int, hi: int) -> tuple[int, int]:
    return (lo, hi) if span is None else (min(span[0], lo), max(span[1], hi))


def _glob(fs: pafs.FileSystem, pattern: str) -> list[str]:
    # pyarrow filesystems have no glob, and remote ones must be matched too: list below the
    # longest literal prefix, then match segment by segment ('*' stays inside one segment).
    parts = pattern.split("/")
    n = next(i for i, p in enumerate(parts) if _GLOB_CHARS & set(p))
    base = "/".join(parts[:n]) or "/"
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    found = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return [
        f.path
        for f in found
        if f.type == pafs.FileType.File
        and not _is_metadata(rel := f.path[len(base) :].strip("/"))
        and _match(rel.split("/"), parts[n:])
    ]


def _match(segments: list[str], patterns: list[str]) -> bool:
    if not patterns:
        return not segments
    if patterns[0] == "**":
        return any(_match(segments[i:], patterns[1:]) for i in range(len(segments) + 1))
    return (
        bool(segments)
        and fnmatch.fnmatchcase(segments[0], patterns[0])
        and _match(segments[1:], patterns[1:])
    )


def _is_metadata(relative: str) -> bool:
    # Hidden files and Spark/Hadoop markers (_SUCCESS, _metadata, .crc) are not data; as in
    # a shell glob, '*' does not pick them up either.
    return any(p.startswith((".", "_")) for p in relative.split("/") if p)


def _open(fs: pafs.FileSystem, f: str, what: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(f, filesystem=fs)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{what}: not a parquet file: {f} ({_one_line(e)})") from None


def _field(schema: pa.Schema, name: str, prefix: str, role: str) -> pa.Field:
    if schema.get_field_index(name) < 0:
        names = ", ".join(schema.names) or "none"
        raise DataError(f"{prefix}: no {role} column {name!r} (columns: {names})")
    return schema.field(name)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _label_kind(t: pa.DataType) -> str | None:
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    return None


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _check_list_type(t: pa.DataType, col: str, prefix: str) -> None:
    if not _is_list(t) or not _is_number(t.value_type):
        hint = " (for scalar columns give a list of names)" if _is_number(t) else ""
        raise DataError(
            f"{prefix}: feature column {col!r} has type {t}, expected a list of numbers{hint}"
        )


def _list_width(t: pa.DataType, scan: _ColumnScan, col: str, prefix: str) -> int | None:
    """Values per row of a list column (all rows equal); None for an empty file's lists."""
    if pa.types.is_fixed_size_list(t):
        width = t.list_size
    elif scan.lengths is None:
        return None  # no rows to measure; other files decide the width
    else:
        lo, width = scan.lengths
        if lo != width:
            raise DataError(
                f"{prefix}: column {col!r} is ragged: lengths {lo}..{width}, "
                "expected a fixed length"
            )
    if width < 1:
        raise DataError(f"{prefix}: feature column {col!r} has 0 values per row")
    return width


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
