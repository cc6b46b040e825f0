"""Files arriving in a followed folder (`raymb train --follow DIR`): listing DIR, reading a
file's rows, and checking a file against the model the first one fixed. The driver calls them
before Ray starts (raymb.driver.preflight), rank 0 while the run goes (raymb.worker.follow).

Only regular files directly in DIR are taken. A name that is a FIFO, a device or a socket
(or a link to one) is skipped, with one warning, and never opened: a FIFO would block the
open, a device such as /dev/zero would be read until memory runs out. Locally a file is opened
without blocking and checked again once open, so a name swapped for a FIFO after the listing
cannot hold the run either. The producer contract is raymb.worker.follow's.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Protocol

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raymb import storage
from raymb.data.checks import DatasetInfo
from raymb.data.listing import PARQUET_SUFFIX
from raymb.errors import DataError, StorageError
from raymb.files import kind_of


class Widths(Protocol):
    """What a file must fit: the model's (raymb.worker.spec.Shape)."""

    @property
    def in_features(self) -> int: ...
    @property
    def classify(self) -> bool: ...
    @property
    def out_features(self) -> int: ...


def open_directory(directory: str | Path) -> tuple[pafs.FileSystem, str]:
    """DIR as (filesystem, path on it): a local path or any URI raymb.storage resolves."""
    text = str(directory)
    try:
        location = storage.resolve(text, what="--follow")
        is_dir = location.is_dir()
    except StorageError as e:
        raise DataError(str(e)) from None
    if not is_dir:
        raise DataError(f"--follow {text}: not a directory")
    return location.fs, location.path


def next_file(
    fs: pafs.FileSystem, root: str, consumed: set[str], warned: set[str] | None = None
) -> tuple[str, int] | None:
    """(name, rows) of the first complete file in DIR not yet consumed, by name; or None."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    names = []
    for i in infos:
        if not is_data_name(i.base_name) or i.base_name in consumed:
            continue
        if i.type == pafs.FileType.File:
            names.append(i.base_name)
        elif i.type != pafs.FileType.Directory:  # a FIFO, a device, a socket: never opened
            _warn(warned, i.base_name, _not_regular(fs, f"{root}/{i.base_name}"))
    for name in sorted(names):
        try:
            with open_arrival(fs, root, name) as (source, filesystem):
                rows = pq.ParquetFile(source, filesystem=filesystem).metadata.num_rows
        except NotRegular as e:
            _warn(warned, name, str(e))
            continue
        except Exception:  # half-written or corrupt: its footer does not read (yet)
            _warn(
                warned,
                name,
                "its parquet footer does not read (a producer should write a .tmp name and "
                "rename it)",
            )
            continue
        return name, rows
    return None


def read_arrival(fs: pafs.FileSystem, root: str, name: str, columns: list[str]) -> pa.Table:
    """The file's `columns`, opened as next_file opens it (a FIFO is refused, not read)."""
    try:
        with open_arrival(fs, root, name) as (source, filesystem):
            return pq.read_table(source, filesystem=filesystem, columns=columns)
    except NotRegular as e:
        raise DataError(f"--follow: {name}: {e}") from None


def is_data_name(name: str) -> bool:
    """Names a producer renames into place; hidden, `_` and `.tmp` names are work in progress."""
    return name.endswith(PARQUET_SUFFIX) and not name.startswith((".", "_"))


def check_fits(info: DatasetInfo, shape: Widths, *, what: str) -> None:
    """A set (a file in DIR, data.val) against the model the first file fixed."""
    kind = "int" if shape.classify else "float"
    if (info.num_features, info.label_kind) != (shape.in_features, kind):
        raise DataError(
            f"{what} has {info.num_features} features and {info.label_kind} labels; the run "
            f"has {shape.in_features} and {kind}"
        )
    if shape.classify and info.num_classes > shape.out_features:
        raise DataError(
            f"{what} has labels up to {info.num_classes - 1}, but model.num_classes="
            f"{shape.out_features}"
        )


class NotRegular(Exception):
    """A name in DIR that is not a regular file (its message says what it is)."""


@contextmanager
def open_arrival(
    fs: pafs.FileSystem, root: str, name: str
) -> Iterator[tuple[str | IO[bytes], pafs.FileSystem | None]]:
    """(source, filesystem) for pyarrow to read the file from. Locally the file is opened
    without blocking and checked once open (NotRegular if it is not a regular file), so
    neither a FIFO nor a device is read; in an object store every name is a file."""
    path = f"{root}/{name}"
    if not isinstance(fs, pafs.LocalFileSystem):
        yield path, fs
        return
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegular(f"it is {kind_of(mode)}, not a regular file")
        yield f, None


def _not_regular(fs: pafs.FileSystem, path: str) -> str:
    """Why a listed name is skipped, looked up with stat: nothing is opened."""
    if isinstance(fs, pafs.LocalFileSystem):
        try:
            return f"it is {kind_of(os.stat(path).st_mode)}, not a regular file"
        except OSError as e:
            return f"it cannot be read ({e.strerror or e})"
    return "it is not a regular file"


def _warn(warned: set[str] | None, name: str, why: str) -> None:
    """Say once per name (where the caller keeps `warned`) why a file is skipped for now."""
    if warned is None or name in warned:
        return
    warned.add(name)
    print(f"raymb: skipping {name} for now: {why}", file=sys.stderr, flush=True)
