"""Issue 34, the inputs: nothing a command reads can hang it or fill its memory, and nothing is
counted twice. A config, a dataset manifest, a tokenizer file, a data file and a run's .lock
that is a FIFO, a device (made here, like /dev/zero: character device 1, 5), a folder or a
link loop is refused in one line naming it, before Ray starts and before it is opened; so are
a zero padding larger than the images and more folds than rows.

Every case runs `raymb train` in a new process in a folder of its own (`assert_refused`: exit
2, one line holding the words, the folder unchanged, under 2 s).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import assert_refused

from raymb import storage
from raymb.data.listing import resolve_files
from raymb.data.manifest import write_manifest
from raymb.driver.preflight import check_zero_padding
from raymb.errors import ConfigError, DataError
from raymb.rundir.lock import LOCK_FILE, _settled_lock, is_alive

ROWS = 8


@contextmanager
def no_hang(seconds: int = 10) -> Iterator[None]:
    """Fail, instead of hanging the suite, if the block blocks (a FIFO opened)."""

    def stop(*_):
        raise TimeoutError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _parquet(path: Path, n: int = ROWS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(2 * n, dtype=np.float32)), 2)
    pq.write_table(pa.table({"features": x, "label": pa.array(np.zeros(n, np.float32))}), path)


def _fifo(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)


def _zero(path: Path) -> None:
    """A character device like /dev/zero (1, 5): read without a bound, it never ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 5))
    except PermissionError:
        pytest.skip("this user may not make device nodes")


def _train(*sets: str, config: str | None = None) -> list[str]:
    args = ["train"] if config is None else ["train", "--config", config]
    for s in sets:
        args += ["--set", s]
    return args


# --- each case makes its inputs under d and returns the arguments ----------------------------


def _config_fifo(d: Path) -> list[str]:
    _fifo(d / "c.toml")
    return _train(config="c.toml")


def _config_zero(d: Path) -> list[str]:
    _zero(d / "zero.toml")
    return _train(config="zero.toml")


def _config_link_to_zero(d: Path) -> list[str]:
    _zero(d / "zero")
    (d / "l.toml").symlink_to("zero")
    return _train(config="l.toml")


def _config_huge(d: Path) -> list[str]:
    with open(d / "big.toml", "wb") as f:
        f.truncate(17 << 20)  # sparse: 17 MiB of NULs on no disk
    return _train(config="big.toml")


def _manifest(d: Path, make: Callable[[Path], None]) -> list[str]:
    _parquet(d / "set" / "train" / "a.parquet")
    make(d / "set" / "raymb-data.json")
    return _train("data.train=set/train", "data.val=")


def _tokenizer_fifo(d: Path) -> list[str]:
    _parquet(d / "set" / "train" / "a.parquet")
    tokenizer = {"kind": "bpe", "file": "tokenizer.json"}
    write_manifest(d / "set", {"task": "lm", "features": "tokens", "tokenizer": tokenizer})
    _fifo(d / "set" / "tokenizer.json")
    return _train("data.train=set/train", "data.val=", "model.name=gpt")


def _data(d: Path, make: Callable[[Path], None], name: str = "b.parquet") -> list[str]:
    _parquet(d / "data" / "a.parquet")
    make(d / "data" / name)
    return _train("data.train=data", "data.val=")


def _train_fifo(d: Path) -> list[str]:
    _fifo(d / "x.parquet")
    return _train("data.train=x.parquet", "data.val=")


def _val_fifo(d: Path) -> list[str]:
    _parquet(d / "data" / "a.parquet")
    _fifo(d / "v.parquet")
    return _train("data.train=data", "data.val=v.parquet")


def _glob_fifo(d: Path) -> list[str]:
    _data(d, _fifo)
    return _train("data.train=data/*.parquet", "data.val=")


def _loop(d: Path) -> list[str]:
    _parquet(d / "data" / "a.parquet")
    (d / "data" / "sub").symlink_to("..")  # data/sub/data/sub/... : 40 levels of a.parquet
    (d / "data" / "same").symlink_to(".")
    return _train("data.train=data", "data.val=")


def _glob_loop(d: Path) -> list[str]:
    _loop(d)
    return _train("data.train=data/**/*.parquet", "data.val=")


def _folder_twice(d: Path) -> list[str]:
    _parquet(d / "data" / "a" / "x.parquet")
    (d / "data" / "b").symlink_to("a")
    return _train("data.train=data", "data.val=")


def _file_twice(d: Path) -> list[str]:
    _parquet(d / "data" / "a.parquet")
    os.link(d / "data" / "a.parquet", d / "data" / "b.parquet")
    return _train("data.train=data", "data.val=")


def _dangling(d: Path) -> list[str]:
    return _data(d, lambda p: p.symlink_to("nowhere.parquet"))


RUN = ("run.storage_path=runs", "run.name=r")


def _lock(d: Path, make: Callable[[Path], None]) -> list[str]:
    (d / "runs" / "r").mkdir(parents=True)
    make(d / "runs" / "r" / LOCK_FILE)
    return _train(*RUN)


def _record(**fields) -> Callable[[Path], None]:
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": 1.0, "token": "t"}
    record.update(fields)
    return lambda p: p.write_text(json.dumps(record))  # NaN is written as NaN: json reads it


def _augment(d: Path, padding: int) -> list[str]:
    from raymb.data.synthetic import generate

    generate("images", d / "img", rows=ROWS, shards=1, classes=2, seed=1)
    sets = (f"data.augment.crop_padding={padding}", "data.augment.padding_mode=zero")
    return _train("data.train=img/train", "data.val=", "model.name=cnn", *sets)


def _folds(d: Path) -> list[str]:
    _parquet(d / "data" / "a.parquet")
    return _train("data.train=data", "data.val=", "data.folds=10", "scale.workers=1")


@dataclass(frozen=True)
class Case:
    make: Callable[[Path], list[str]]
    words: tuple[str, ...]


NOT_A_LOCK = (LOCK_FILE, "does not read as a raymb driver's lock", "delete")

CASES = {
    # 1. the config and the small files it leads to
    "config-fifo": Case(_config_fifo, ("config file c.toml", "is a FIFO")),
    "config-device": Case(_config_zero, ("config file zero.toml", "a character device")),
    "config-link-to-device": Case(_config_link_to_zero, ("l.toml", "a character device")),
    "config-huge": Case(_config_huge, ("config file big.toml", "larger than 16 MiB")),
    "manifest-fifo": Case(lambda d: _manifest(d, _fifo), ("raymb-data.json", "a FIFO")),
    "manifest-device": Case(
        lambda d: _manifest(d, _zero), ("raymb-data.json", "a character device")
    ),
    "manifest-folder": Case(lambda d: _manifest(d, Path.mkdir), ("raymb-data.json", "a folder")),
    "tokenizer-fifo": Case(_tokenizer_fifo, ("tokenizer file", "tokenizer.json", "a FIFO")),
    # 2. data that is not a regular file
    "train-fifo": Case(_train_fifo, ("data.train", "x.parquet", "a FIFO")),
    "val-fifo": Case(_val_fifo, ("data.val", "v.parquet", "a FIFO")),
    "fifo-in-folder": Case(lambda d: _data(d, _fifo), ("data.train", "b.parquet", "a FIFO")),
    "device-in-folder": Case(
        lambda d: _data(d, _zero), ("data.train", "b.parquet", "a character device")
    ),
    "fifo-by-glob": Case(_glob_fifo, ("data.train", "b.parquet", "a FIFO")),
    "dangling-link": Case(_dangling, ("data.train", "b.parquet", "a link to nothing")),
    # 3. links: none followed twice
    "link-loop": Case(_loop, ("data.train", "data/same", "symbolic-link loop")),
    "link-loop-by-glob": Case(_glob_loop, ("data.train", "data/same", "symbolic-link loop")),
    "folder-twice": Case(_folder_twice, ("data.train", "data/b is the folder", "again")),
    "file-twice": Case(_file_twice, ("data.train", "b.parquet is the file", "a.parquet again")),
    # 4. the run lock
    "lock-fifo": Case(lambda d: _lock(d, _fifo), (LOCK_FILE, "is a FIFO", "remove it")),
    "lock-folder": Case(lambda d: _lock(d, Path.mkdir), (LOCK_FILE, "is a folder")),
    "lock-device": Case(lambda d: _lock(d, _zero), (LOCK_FILE, "a character device")),
    "lock-huge-pid": Case(lambda d: _lock(d, _record(pid=10**21)), NOT_A_LOCK),
    "lock-start-1e300": Case(lambda d: _lock(d, _record(started=1e300)), NOT_A_LOCK),
    "lock-start-nan": Case(lambda d: _lock(d, _record(started=float("nan"))), NOT_A_LOCK),
    # 5. zero padding, bounded as reflect padding is
    "zero-padding-1e9": Case(
        lambda d: _augment(d, 10**9),
        ("data.augment.crop_padding=1000000000", '"zero"', "16x16"),
    ),
    # 6. more folds than rows
    "folds-over-rows": Case(_folds, ("data.folds=10", "8 rows", "at most 8")),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_refused_in_one_line(tmp_path: Path, case: Case) -> None:
    args = case.make(tmp_path)
    assert_refused(args, tmp_path, *case.words)


# --- what is still read, and the parts one by one ---------------------------------------------


def test_a_linked_folder_of_shards_is_read_once(tmp_path: Path) -> None:
    _parquet(tmp_path / "elsewhere" / "s.parquet")
    _parquet(tmp_path / "data" / "a.parquet")
    (tmp_path / "data" / "more").symlink_to(tmp_path / "elsewhere")  # followed, as before
    files, _ = resolve_files(str(tmp_path / "data"))
    assert files == [str(tmp_path / "data" / "a.parquet"), str(tmp_path / "data/more/s.parquet")]


def test_a_glob_lists_what_it_matches_and_leaves_the_rest(tmp_path: Path) -> None:
    _parquet(tmp_path / "data" / "a.parquet")
    _parquet(tmp_path / "data" / "deep" / "b.parquet")
    _fifo(tmp_path / "data" / "pipe")  # matched by no pattern below: never looked into
    (tmp_path / "data" / "notes.md").write_text("not data")
    (tmp_path / "data" / "loop").symlink_to(".")  # '*.parquet' reaches no folder: not walked
    with no_hang():
        files, _ = resolve_files(str(tmp_path / "data" / "*.parquet"))
        assert files == [str(tmp_path / "data" / "a.parquet")]
        with pytest.raises(DataError, match="symbolic-link loop"):
            resolve_files(str(tmp_path / "data" / "**" / "*.parquet"))
    (tmp_path / "data" / "loop").unlink()
    files, _ = resolve_files(str(tmp_path / "data" / "**" / "*.parquet"))
    assert [Path(f).name for f in files] == ["a.parquet", "b.parquet"]


def test_a_malformed_lock_reads_as_no_lock_of_a_driver(tmp_path: Path) -> None:
    lock = storage.resolve(tmp_path / LOCK_FILE)
    assert _settled_lock(lock) is None
    good = {"host": "h", "pid": 12, "started": 1700000000.5, "token": "t"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(good))
    assert _settled_lock(lock) == good
    for bad in (
        {"pid": 10**21},
        {"pid": 0},
        {"pid": True},
        {"pid": "12"},
        {"started": 1e300},
        {"started": float("nan")},
        {"started": float("inf")},
        {"started": -5},
        {"host": 3},
    ):
        (tmp_path / LOCK_FILE).write_text(json.dumps({**good, **bad}))
        assert _settled_lock(lock) == {}, bad
    (tmp_path / LOCK_FILE).write_bytes(b"{" * 100_000)  # deeper than json's recursion
    assert _settled_lock(lock) == {}
    # raymb runs asks too, of a status.json's pid
    assert not any(is_alive(pid) for pid in (10**21, -(10**21), 0, -1, True))
    assert is_alive(os.getpid())


def test_zero_padding_is_bounded_by_the_image() -> None:
    from raymb.config.data import AugmentSection

    check_zero_padding(AugmentSection(crop_padding=15, padding_mode="zero"), (3, 16, 20))
    check_zero_padding(AugmentSection(crop_padding=10**9), (3, 16, 16))  # reflect: checked apart
    with pytest.raises(ConfigError, match=r"crop_padding=16 .*16x20"):
        check_zero_padding(AugmentSection(crop_padding=16, padding_mode="zero"), (3, 16, 20))


def test_a_tokenizer_file_that_is_a_fifo_is_never_opened(tmp_path: Path) -> None:
    from raymb.data.tokenizer import load_tokenizer

    write_manifest(tmp_path, {"task": "lm", "tokenizer": {"kind": "bpe", "file": "t.json"}})
    _fifo(tmp_path / "t.json")
    with no_hang(), pytest.raises(DataError, match="t.json: is a FIFO"):
        load_tokenizer(tmp_path)
