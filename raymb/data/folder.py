"""Writing a prepared dataset folder (DIR/train, DIR/val, DIR/raymb-data.json): shared by
`raymb prepare images|text` and `raymb gen-data images|tokens`.

The folder is written into a hidden temporary sibling and renamed into place at the end,
so a failed run leaves nothing; rows are split train/val by a seeded permutation and cut
into shards of nearly equal size.
"""

from __future__ import annotations

import math
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymb.errors import ConfigError, DataError
from raymb.files import check_apart, kind_of
from raymb.storage import temp_sibling

TARGET_FILE_BYTES = 256 * 2**20  # the default --shards keeps files below about this


def check_new_folder(out: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """`out` as an absolute path, if it is new or an empty folder, and is not, holds no and
    lies inside none of `inputs` (the files and folders a command reads), however spelled: a
    file, a link, a device, a folder with anything in it, or an input's place is refused in
    one line, before any work, so nothing is overwritten and no input is written into."""
    given = Path(out).expanduser()
    path = Path(os.path.abspath(given))
    check_apart(out, "--out", inputs)
    if given.is_symlink() or path.is_symlink():
        raise DataError(f"--out {out}: a symbolic link; name a new folder, not a link")
    if os.path.lexists(path) and not path.is_dir():
        mode = os.stat(path).st_mode
        kind = "a file" if stat.S_ISREG(mode) else kind_of(mode)  # a FIFO, a device, ...
        raise DataError(f"--out {out}: exists and is {kind}; choose a new folder")
    if path.is_dir() and any(path.iterdir()):
        raise DataError(f"--out {out}: exists and is not an empty folder; choose a new one")
    return path


@contextmanager
def new_folder(out: str | Path, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """A temporary sibling of `out` to write into: renamed to `out` when the block ends,
    removed when it raises, so a failed run leaves nothing behind. An `out` that
    check_new_folder refuses (given the command's `inputs`) is refused before any work."""
    out = check_new_folder(out, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out, folder=True)  # the umask's mode, not mkdtemp's private 0700
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def leaves(path: Path, root: Path) -> bool:
    """Whether `path`, its links followed, lies outside `root` (a resolved folder)."""
    return not path.resolve().is_relative_to(root)


def skip_or_refuse_link(path: Path, root: Path, strict: bool, skipped: list[str]) -> None:
    """Note a link that leaves `root` in `skipped`, or, with `strict`, refuse it in one line."""
    if strict:
        raise DataError(
            f"{path}: a link to {path.resolve()}, outside {root}; --strict refuses links that "
            "leave the folder (without it they are skipped)"
        )
    skipped.append(str(path))


def check_split_options(val_fraction: float, seed: int, shards: int | None) -> None:
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1) (got {val_fraction!r})")
    if seed < 0:
        raise ConfigError(f"--seed must be an integer >= 0 (got {seed!r})")
    if shards is not None and shards < 1:
        raise ConfigError(f"--shards must be >= 1 (got {shards!r})")


def split_rows(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of train and val, each in a seeded random order: val gets
    max(1, round(n * val_fraction)) rows when val_fraction > 0, train the rest."""
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    if n - n_val < 1:
        raise DataError(
            f"only {n} row{'s' * (n != 1)}: too few for a train split beside "
            f"--val-fraction {val_fraction:g} (add data or pass --val-fraction 0)"
        )
    order = np.random.default_rng(seed).permutation(n)
    return order[n_val:], order[:n_val]


def split_shards(shards: int | None, rows: int, row_bytes: int, *, val: bool = False) -> int:
    """Files for a split: --shards for train (default 4, or more to keep files under
    TARGET_FILE_BYTES), half as many for val, never more than its rows."""
    if shards is None:
        shards = max(4, math.ceil(rows * row_bytes / TARGET_FILE_BYTES))
    if val:
        shards = max(1, shards // 2)
    return max(1, min(shards, rows))


def shard_bounds(rows: int, shards: int) -> list[tuple[int, int]]:
    """[lo, hi) row ranges of `shards` files whose sizes differ by at most one row."""
    base, extra = divmod(rows, shards)
    bounds, lo = [], 0
    for i in range(shards):
        hi = lo + base + (i < extra)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def flat_array(values: np.ndarray) -> pa.Array:
    """A numpy array, flattened, as an Arrow array without a copy (pa.array and pa.table
    import pandas, which costs `raymb prepare` over a second)."""
    values = np.ascontiguousarray(values).reshape(-1)
    dtype = pa.from_numpy_dtype(values.dtype)
    return pa.Array.from_buffers(dtype, len(values), [None, pa.py_buffer(values)])


def write_split(split_dir: Path, tables: Iterable[pa.Table]) -> dict[str, int]:
    """Write each non-empty table as split_dir/part-NNNNN.parquet; the split's rows and files."""
    split_dir.mkdir(parents=True, exist_ok=True)
    rows = files = 0
    for table in tables:
        if table.num_rows:
            pq.write_table(table, split_dir / f"part-{files:05d}.parquet")
            rows, files = rows + table.num_rows, files + 1
    return {"rows": rows, "files": files}
