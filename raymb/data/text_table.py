"""A table of texts and their labels (CSV, JSON lines or parquet, chosen by the file's suffix)
read for `raymb prepare text --text-column ... --label-column ...`.

Labels become class ids:
- integers (a CSV cell of digits, a JSON or parquet integer, a whole float, a boolean) are the
  ids themselves when none is negative;
- anything else (strings, or integers some of which are negative) is mapped to 0..C-1 in
  sorted order (numbers numerically, strings as Python sorts them), the names kept in order.
A missing or blank label is refused, as is a fractional number: classes are not measurements.
Rows count from 1, a CSV's header not counted.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from raymb.errors import ConfigError, DataError, one_line
from raymb.files import check_input, kind_of

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class TextTable:
    """The rows of a text table: each row's text and class id, and the class names in id
    order (None when the labels were class ids already)."""

    texts: list[str]
    labels: np.ndarray  # int64, >= 0
    names: list[str] | None
    format: str

    @property
    def num_classes(self) -> int:
        return len(self.names) if self.names is not None else int(self.labels.max()) + 1


def table_format(path: str | Path) -> str:
    """The format of a text table by its suffix; a ConfigError naming the suffixes read."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"{path}: a table of texts and labels is read by its suffix: "
            f"{', '.join(FORMATS)} (rename the file, or convert it)"
        )
    return fmt


def check_table(path: str | Path) -> str:
    """The format of the text table at `path`, a regular file that is not empty (stat only)."""
    size = check_input(path, "text table").st_size  # a FIFO or device first, whatever its name
    fmt = table_format(path)
    if size == 0:
        raise DataError(f"{path}: is empty; expected a {fmt} file with a header and rows")
    return fmt


def read_text_table(path: str | Path, text_column: str, label_column: str) -> TextTable:
    """The texts and class ids of the file at `path` (see the module's docstring)."""
    fmt = check_table(path)
    with _open_regular(path) as f:
        if fmt == "csv":
            columns = _read_csv(f, path, text_column, label_column)
        elif fmt == "parquet":
            columns = _read_parquet(f, path, text_column, label_column)
        else:
            columns = _read_json(f.read(), path, fmt)
    return _rows(path, fmt, columns, text_column, label_column)


def _rows(
    path: str | Path, fmt: str, columns: dict[str, list], text_column: str, label_column: str
) -> TextTable:
    found = ", ".join(map(repr, columns)) or "none"
    if not any(columns.values()):
        raise DataError(f"{path}: has no rows (columns found: {found})")
    for flag, name in (("--text-column", text_column), ("--label-column", label_column)):
        if name not in columns:
            raise DataError(f"{path}: no column {name!r} ({flag}); columns found: {found}")
    texts, labels = columns[text_column], columns[label_column]
    _check_texts(path, text_column, texts)
    ids, names = label_ids(path, label_column, labels)
    return TextTable(texts=texts, labels=ids, names=names, format=fmt)


def _check_texts(path: str | Path, column: str, texts: list) -> None:
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        value = texts[bad[0]]
        what = "no text" if value is None else f"{value!r} ({type(value).__name__}), not a string"
        raise DataError(
            f"{path}: text column {column!r}: {len(bad)} row(s) hold no string, e.g. row "
            f"{bad[0] + 1}: {what}; fill them in or drop the rows"
        )


def label_ids(path: str | Path, column: str, labels: list) -> tuple[np.ndarray, list[str] | None]:
    """(class ids, class names or None) of a label column's values."""
    empty = [i for i, v in enumerate(labels) if v is None or (isinstance(v, str) and not v.strip())]
    if empty:
        raise DataError(
            f"{path}: label column {column!r}: {len(empty)} row(s) have an empty label, e.g. "
            f"row {empty[0] + 1}; fill them in or drop the rows"
        )
    numbers = [_as_integer(v) for v in labels]
    for i, v in enumerate(labels):
        if isinstance(v, float) and numbers[i] is None:
            raise DataError(
                f"{path}: label column {column!r}: row {i + 1} holds {v!r}, a fraction; "
                "class labels are integers or strings (is this a regression target?)"
            )
    if all(n is not None for n in numbers):
        ids = np.asarray(numbers, dtype=np.int64)
        if ids.min() >= 0:
            return ids, None
        classes = sorted(set(numbers))
        names = [str(c) for c in classes]
    else:
        as_text = [v if isinstance(v, str) else json.dumps(v) for v in labels]
        classes = names = sorted(set(as_text))
        numbers = as_text
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index[n] for n in numbers], dtype=np.int64), names


def _as_integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value)
    return None


def _open_regular(path: str | Path) -> BinaryIO:
    """The file opened for reading without blocking, and checked again once open: a FIFO put
    in its place after the stat cannot hold the command."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DataError(f"text table {path}: cannot be read ({e.strerror or e})") from None
    f = os.fdopen(fd, "rb")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        f.close()
        raise DataError(f"text table {path}: is {kind_of(mode)}, not a regular file")
    return f


def _read_csv(f: BinaryIO, path: str | Path, *names: str) -> dict[str, list]:
    import pyarrow as pa
    from pyarrow import csv

    # Both columns as strings: a cell of digits becomes a class id in label_ids, and a text
    # of digits stays text; an empty cell is the empty string, not null.
    convert = csv.ConvertOptions(column_types={n: pa.string() for n in names})
    try:
        table = csv.read_csv(f, convert_options=convert)
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a CSV file pyarrow reads ({one_line(e, 200)})") from None
    return {name: table.column(name).to_pylist() for name in table.column_names}


def _read_parquet(f: BinaryIO, path: str | Path, text: str, label: str) -> dict[str, list]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
        found = pf.schema_arrow.names
        table = pf.read(columns=[n for n in (text, label) if n in found])
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a parquet file pyarrow reads ({one_line(e, 200)})") from None
    kind = table.schema.field(text).type if text in table.column_names else pa.string()
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: text column {text!r} holds {kind}, not strings")
    read = {name: table.column(name).to_pylist() for name in table.column_names}
    return {name: read.get(name, []) for name in found}


def _read_json(data: bytes, path: str | Path, fmt: str) -> dict[str, list]:
    """JSON lines (one object a line, blank lines skipped); a .json file may also be one array
    of objects."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 (byte {e.start}); save it as UTF-8") from None
    if fmt == "json" and text.lstrip().startswith("["):
        rows = _loads(text, path, "")
    else:
        numbered = enumerate(text.splitlines(), 1)
        rows = [_loads(line, path, f" line {n}:") for n, line in numbered if line.strip()]
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected JSON lines or an array of objects")
    columns: dict[str, list] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i + 1} is {type(row).__name__}, not a JSON object")
        for key in row:
            columns.setdefault(key, [])
    for name, values in columns.items():
        values.extend(row.get(name) for row in rows)
    return columns


def _loads(text: str, path: str | Path, where: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path}:{where} not JSON ({one_line(e, 200)})") from None
