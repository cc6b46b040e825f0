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
import math
import os
import stat
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raymb import storage
from raymb.data.columns import ShapeError, feature_shape, flat_values
from raymb.errors import ConfigError, DataError, StorageError
from raymb.files import InputError, check_input

PARQUET_SUFFIX = ".parquet"
_GLOB_CHARS = frozenset("*?[")
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
    label_kind: str  # "int" (classification) or "float" (regression)
    num_classes: int | None  # max label + 1 for int labels, else None
    filesystem: pafs.FileSystem = field(repr=False)  # pass to readers for non-local paths
    file_rows: tuple[int, ...] = ()  # rows of each file, in the order of `files`
    bytes: int = 0  # uncompressed size of the files' columns, from their footers
    feature_shape: tuple[int, ...] = ()  # one row's features: (d,), (C, H, W), (T + 1,)
    feature_type: str = "float32"  # the stored value type of a list or tensor column
    value_range: tuple[int, int] | None = None  # integer features (token ids): (min, max)


def resolve_files(path: str, *, what: str = "data.train") -> tuple[list[str], pafs.FileSystem]:
    """Expand a file, directory, glob or URI into sorted parquet file paths and their filesystem."""
    # Local paths are made absolute: Ray workers run in another directory.
    try:
        location = storage.resolve(path, what=what)
        fs, root = location.fs, location.path
        info = fs.get_file_info(root)
    except StorageError as e:
        raise DataError(f"{what}: cannot open {path}: {e.reason}") from None
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{what}: cannot open {path}: {_one_line(e)}") from None

    if info.type == pafs.FileType.NotFound and _GLOB_CHARS & set(root):
        if location.local:
            candidates = _glob_local(root, what, path)
        else:
            candidates = _glob_remote(fs, root, what, path)
        if not candidates:
            raise DataError(f"{what}: no files match {path}")
    elif info.type == pafs.FileType.NotFound:
        if location.local and os.path.lexists(root):  # a link to nothing, or a loop: say so
            _check_regular(root, what)
        raise DataError(f"{what}: no such file or directory: {path}")
    elif info.type == pafs.FileType.Directory:
        if location.local and os.path.dirname(root) == root:
            raise DataError(f"{what}: {path} is the root of the filesystem; name the data's folder")
        candidates = _files_below(fs, root, location.local, what, path)
        if not candidates:
            raise DataError(f"{what}: no parquet files under {path}")
    else:
        candidates = [root]
        if location.local:  # a FIFO would hang the parquet reader's open, a device feed it
            _check_regular(root, what)

    for f in candidates:
        if not f.endswith(PARQUET_SUFFIX):
            raise DataError(f"{what}: not a parquet file: {f} (expected a *.parquet name)")
    return sorted(candidates), fs


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
    """The features as the schema check reports them: `image: uint8[3, 32, 32]`."""
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
        raise DataError(f"{prefix}: cannot read the file ({_one_line(e)})") from None
    return scans


def _widen(span: tuple[int, int] | None, lo: int, hi: int) -> tuple[int, int]:
    return (lo, hi) if span is None else (min(span[0], lo), max(span[1], hi))


def _files_below(fs: pafs.FileSystem, root: str, local: bool, what: str, path: str) -> list[str]:
    """The data files below a directory (hidden and `_` names skipped). Locally the walk stops
    at the first file that is not parquet, refused then, so a folder that is no dataset (a
    home directory, say) fails at once instead of after listing all of it."""
    if not local:
        selector = pafs.FileSelector(root, recursive=True)
        try:
            found = fs.get_file_info(selector)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{what}: cannot list {path}: {_one_line(e)}") from None
        return [
            f.path
            for f in found
            if f.type == pafs.FileType.File and not _is_metadata(f.path[len(root) :])
        ]

    return _walk_local(root, what)


def _walk_local(root: str, what: str, patterns: list[str] | None = None) -> list[str]:
    """The files below a local folder, in os.walk's order (a folder's files sorted, then its
    folders, depth first); hidden and `_` names skipped. With `patterns` (a glob's segments
    below `root`), only the files they match, and only the folders they can reach are walked.
    Links are followed, each folder and each file once:
    - a link back to a folder above it (a loop) is refused, naming the link;
    - a second way to a folder or file already listed (a link, or a hard link, to it) is
      refused naming both paths: counted twice its rows would weigh double;
    - an entry that is not a regular file (a FIFO, a device, a socket, a link to nothing) is
      refused naming it, never opened;
    - in a data folder (no `patterns`), the first file that is not *.parquet is refused, so a
      folder that is no dataset fails at once."""
    files: list[str] = []
    seen_dirs: dict[tuple[int, int], str] = {}
    seen_files: dict[tuple[int, int], str] = {}
    try:
        top = os.stat(root)
    except OSError as e:
        raise DataError(f"{what}: cannot list {root}: {e.strerror or e}") from None
    seen_dirs[_key(top)] = root
    # (folder, its parts below root, the keys of it and the folders above it)
    stack: list[tuple[str, list[str], tuple[tuple[int, int], ...]]] = [(root, [], (_key(top),))]
    while stack:
        folder, parts, above = stack.pop()
        try:
            with os.scandir(folder) as it:
                names = sorted(e.name for e in it)
        except OSError as e:
            where = e.filename or folder
            raise DataError(f"{what}: cannot list {where}: {e.strerror or e}") from None
        below = []
        for name in names:
            if _is_metadata(name):
                continue
            f = os.path.join(folder, name)
            rel = [*parts, name]
            wanted = patterns is None or _match(rel, patterns)
            try:
                st = os.stat(f)  # through links
            except OSError as e:
                if not wanted:
                    continue  # a glob's non-match: neither listed nor refused
                if os.path.islink(f) and isinstance(e, FileNotFoundError):
                    to = os.readlink(f)
                    raise DataError(f"{what}: {f} is a link to nothing ({to})") from None
                raise DataError(f"{what}: {f} cannot be read ({e.strerror or e})") from None
            key = _key(st)
            if stat.S_ISDIR(st.st_mode):
                if patterns is not None and not _may_match(rel, patterns):
                    continue  # no match can lie below it
                if key in above:
                    raise DataError(
                        f"{what}: {f} is a symbolic-link loop (it leads back to "
                        f"{seen_dirs[key]}); remove the link"
                    )
                if key in seen_dirs:
                    raise DataError(
                        f"{what}: {f} is the folder {seen_dirs[key]} again (through a link); "
                        "each file counts once: remove the link"
                    )
                seen_dirs[key] = f
                below.append((f, rel, (*above, key)))
                continue
            if not wanted:
                continue
            if not stat.S_ISREG(st.st_mode):
                _check_regular(f, what)  # refuses it, naming what it is
            if patterns is None and not name.endswith(PARQUET_SUFFIX):
                raise DataError(f"{what}: not a parquet file: {f} (expected a *.parquet name)")
            if key in seen_files:
                raise DataError(
                    f"{what}: {f} is the file {seen_files[key]} again (a link or a hard link); "
                    "each file counts once: remove one"
                )
            seen_files[key] = f
            files.append(f)
        stack.extend(reversed(below))
    return files


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _check_regular(path: str, what: str) -> None:
    """A DataError naming a local data path that is not a regular file; nothing is opened."""
    try:
        check_input(path, what)
    except InputError as e:
        raise DataError(str(e)) from None


def _glob_local(pattern: str, what: str, path: str) -> list[str]:
    """A glob on the local filesystem: the walk of _walk_local below the pattern's literal
    prefix (links followed once, loops refused), into the folders the pattern can reach; what
    it matches must be regular files."""
    parts = pattern.split("/")
    n = next(i for i, p in enumerate(parts) if _GLOB_CHARS & set(p))
    base = "/".join(parts[:n]) or "/"
    if os.path.dirname(base) == base:
        raise DataError(
            f"{what}: {path} would list the whole filesystem; start the pattern with the "
            "data's folder"
        )
    if not os.path.isdir(base):
        return []
    return sorted(_walk_local(base, what, parts[n:]))


def _glob_remote(fs: pafs.FileSystem, pattern: str, what: str, path: str) -> list[str]:
    # pyarrow filesystems have no glob: list below the longest literal prefix, then match
    # segment by segment ('*' stays inside one segment).
    parts = pattern.split("/")
    n = next(i for i, p in enumerate(parts) if _GLOB_CHARS & set(p))
    base = "/".join(parts[:n]) or "/"
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    try:
        found = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{what}: cannot list {path}: {_one_line(e)}") from None
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


def _may_match(segments: list[str], patterns: list[str]) -> bool:
    """Whether a path below these segments (a folder's) can match the patterns."""
    if not segments:
        return True
    if not patterns:
        return False
    if patterns[0] == "**":
        return True
    return fnmatch.fnmatchcase(segments[0], patterns[0]) and _may_match(segments[1:], patterns[1:])


def _is_metadata(relative: str) -> bool:
    # Hidden files and Spark/Hadoop markers (_SUCCESS, _metadata, .crc) are not data; as in
    # a shell glob, '*' does not pick them up either.
    return any(p.startswith((".", "_")) for p in relative.split("/") if p)


def _open(fs: pafs.FileSystem, f: str, what: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(f, filesystem=fs)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{what}: not a parquet file: {f} ({_one_line(e)})") from None


def read_file(path: str, columns: tuple[str, ...], filesystem, what: str) -> pa.Table:
    """One file of a cached dataset as a pyarrow Table: `columns` of it, whole. A Ray task of
    the driver (raymb.driver.cluster.data_spec) or a TorchSession's read; a file that cannot be
    read is a DataError naming it."""
    try:
        return pq.read_table(path, columns=list(columns), filesystem=filesystem)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{what}: could not read {path} ({_one_line(e)})") from None


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


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
