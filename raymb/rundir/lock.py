"""A run directory's lock: the one driver that trains a run holds `<run dir>/.lock`.

A driver takes the lock (`lock_run`) from its first write to the run directory to its end:
a second driver on the same run is refused in one line naming the first (host, pid, start);
the lock of a driver that died on this machine is taken over. Locally the lock file is made
with O_EXCL; on an object store, which offers no create-if-absent, it is written and read back.

No Ray and no torch here: the driver's checks run before either is imported.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raymb.errors import StorageError
from raymb.files import InputError, kind_of, read_bounded
from raymb.storage import Location

LOCK_FILE = ".lock"
"""In a run directory while a driver trains it: {"host", "pid", "started", "token"}."""
REMOTE_LOCK_SETTLE_S = 0.5
"""How long a driver waits after writing an object-store lock before reading it back."""

LOCK_LIMIT = 64 << 10
"""The largest lock file read: a driver's record is under 200 bytes."""
MAX_START = 2.0**36
"""No lock starts after this (the year 4147): a larger start time is no driver's."""

_held: set[str] = set()  # the lock files this process holds


@dataclass(frozen=True)
class RunLock:
    """A driver's hold on its run directory; `created`: the directory did not exist before, so
    the run is new and a failure before anything worth keeping may delete it (`discard`)."""

    run_dir: Location
    record: dict[str, Any]
    created: bool

    def release(self) -> None:
        """Remove the lock file if it is still this driver's. A failure here is left unsaid:
        the next driver takes a dead driver's lock over, and the error at hand is the news."""
        lock = self.run_dir / LOCK_FILE
        _held.discard(lock.uri)
        try:
            if _read_lock(lock) == self.record:
                lock.remove()
        except (OSError, StorageError):
            pass

    def discard(self) -> str | None:
        """Delete the run directory this lock made, and only that one; a directory that existed
        before is kept. Returns why it is still there, or None."""
        if not self.created:
            return None
        _held.discard((self.run_dir / LOCK_FILE).uri)
        try:
            # Built by Location.child, so a direct child of the storage path; checked again
            # here because this path is deleted whole.
            self.run_dir.parent.child(self.run_dir.name)
            if self.run_dir.local and os.path.islink(self.run_dir.path):
                return "it is now a symbolic link"
            self.run_dir.remove()
        except (OSError, ValueError, StorageError) as e:
            return " ".join(str(e).split()) or type(e).__name__
        return None


def check_unlocked(run_dir: Location) -> None:
    """Refuse, in one line naming the driver, a run directory a live driver holds; only reads
    (a quick refusal before the data checks; `lock_run` takes the lock for good)."""
    held = _settled_lock(run_dir / LOCK_FILE)
    if held is not None and not _stale(held, run_dir / LOCK_FILE):
        raise _in_use(run_dir, held)


def lock_run(run_dir: Location) -> RunLock:
    """Take the run directory for this driver, making it when missing: the lock file holds this
    host, pid and start time. A live driver's lock is a one-line StorageError naming it; the
    lock of a driver gone from this machine is taken over."""
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": round(time.time(), 3),
        "token": secrets.token_hex(8),  # tells this lock from a later one of the same pid
    }
    lock = run_dir / LOCK_FILE
    created = _make_run_dir(run_dir)
    for _ in range(5):  # a lost race, or a dead driver's lock taken over: look again
        if _create_lock(lock, record):
            _held.add(lock.uri)
            return RunLock(run_dir, record, created)
        held = _settled_lock(lock)
        if held is None:  # released meanwhile
            continue
        if not _stale(held, lock):
            raise _in_use(run_dir, held)
        _take_over(run_dir, held)
    raise StorageError(run_dir.uri, f"could not take {LOCK_FILE}: other drivers keep taking it")


def _make_run_dir(run_dir: Location) -> bool:
    """Make the run directory; whether it was made here (False: it was there before)."""
    if not run_dir.local:
        created = not run_dir.exists()  # a prefix exists once an object lies under it
        run_dir.mkdir()
        return created
    path = Path(run_dir.path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir()
    except FileExistsError:
        return False
    except OSError as e:
        raise StorageError(run_dir.uri, f"cannot make the run directory ({e.strerror})") from None
    return True


def _create_lock(lock: Location, record: dict[str, Any]) -> bool:
    """Write the lock file unless there is one; whether it was written."""
    data = (json.dumps(record) + "\n").encode()
    if not lock.local:
        # An object store offers no create-if-absent through pyarrow.fs (S3's conditional PUT,
        # If-None-Match, is out of its reach): the best it allows is to write when no lock is
        # there, wait, and read back: of two drivers writing at once, the last write stands
        # and the other driver sees a lock that is not its own. Two that start within a
        # fraction of a second of each other may both miss it.
        if lock.exists():
            return False
        lock.write_bytes(data)
        time.sleep(REMOTE_LOCK_SETTLE_S)
        return _read_lock(lock) == record
    try:
        fd = os.open(lock.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    except OSError as e:
        raise StorageError(lock.uri, f"cannot write the lock file ({e.strerror})") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def _read_lock(lock: Location) -> dict[str, Any] | None:
    """The lock file's record; None when there is none, {} when it does not read (yet): not a
    JSON object, or larger than LOCK_LIMIT (its fields are _checked apart). A local lock that
    is not a regular file (a folder, a FIFO, a link) is a StorageError saying what it is: it is
    never opened (a FIFO would hang the open)."""
    if lock.local:
        try:
            mode = os.lstat(lock.path).st_mode
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError(lock.uri, f"cannot read the lock file ({e.strerror})") from None
        if not stat.S_ISREG(mode):
            raise StorageError(
                lock.uri,
                f"is {kind_of(mode)}, not a raymb driver's lock file: if no raymb driver trains "
                "this run, remove it",
            )
        try:
            data = read_bounded(lock.path, "lock file", LOCK_LIMIT)
        except InputError:
            return None if not os.path.lexists(lock.path) else {}
    else:
        try:
            data = lock.read_bytes()
        except FileNotFoundError:
            return None
    try:
        value = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _checked(held: dict[str, Any] | None) -> dict[str, Any] | None:
    """A lock record as _read_lock read it, or {} when its fields are not what lock_run
    writes: a host name, a pid a process can have (a C int above 0), a finite start time
    after 1970 that time.localtime can show (not a pid of 10**21, a start of 1e300 or NaN)."""
    if not held:
        return held
    pid, started = held.get("pid"), held.get("started")
    well_formed = (
        isinstance(held.get("host"), str)
        and isinstance(pid, int)
        and not isinstance(pid, bool)
        and 0 < pid < 2**31
        and isinstance(started, int | float)
        and not isinstance(started, bool)
        and math.isfinite(started)
        and 0 <= started < MAX_START
    )
    return held if well_formed else {}


def _settled_lock(lock: Location) -> dict[str, Any] | None:
    """_read_lock, waiting a moment for a lock that is being written (created, not yet full)."""
    for _ in range(10):
        held = _read_lock(lock)
        if held != {}:  # a whole JSON object is no lock half written: no wait for its fields
            return _checked(held)
        time.sleep(0.05)
    return held


def _stale(held: dict[str, Any], lock: Location) -> bool:
    """Whether the driver of a lock is gone: its pid is not alive on this host, or is this
    process, which does not hold it (a restarted container), or started after the lock."""
    pid = held.get("pid")
    if held.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False  # another machine's driver, or a lock that does not say: cannot tell
    if pid == os.getpid():
        return lock.uri not in _held
    if not is_alive(pid):
        return True
    started, since = _process_start(pid), held.get("started")
    # The clock of /proc is whole seconds: a margin keeps a live driver's own lock its own.
    return started is not None and isinstance(since, int | float) and started > since + 2


def _process_start(pid: int) -> float | None:
    """When a process started, in unix time (Linux's /proc); None where that is not known."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        # Field 22, starttime, counted after the name's ")" (a name may hold one itself).
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _take_over(run_dir: Location, stale: dict[str, Any]) -> None:
    """Move a dead driver's lock out of the way. Of two drivers taking over one stale lock at
    once, the second may move the first's new lock instead: it puts that one back and is
    refused."""
    lock = run_dir / LOCK_FILE
    if not lock.local:
        if _read_lock(lock) == stale:  # the store cannot compare and delete in one request
            lock.remove()
        return
    aside = f"{lock.path}.{secrets.token_hex(4)}.stale"
    try:
        os.rename(lock.path, aside)
    except FileNotFoundError:
        return  # another driver moved it first
    except OSError as e:
        raise StorageError(lock.uri, f"cannot move a dead driver's lock ({e.strerror})") from None
    moved = _checked(_read_lock(Location(lock.fs, aside, aside)))
    if moved == stale:
        os.unlink(aside)
        return
    os.replace(aside, lock.path)
    raise _in_use(run_dir, moved or {})


def _in_use(run_dir: Location, held: dict[str, Any]) -> StorageError:
    """The refusal of a second driver: who holds the run, and what to do."""
    lock = run_dir / LOCK_FILE
    if not held:
        return StorageError(
            run_dir.uri,
            f"{LOCK_FILE} does not read as a raymb driver's lock: if no driver trains this run, "
            f"delete {lock}",
        )
    host, pid, since = held.get("host", "?"), held.get("pid", "?"), held.get("started")
    when = (
        f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
        if isinstance(since, int | float)
        else ""
    )
    return StorageError(
        run_dir.uri,
        f"in use by another raymb driver (host {host}, pid {pid}{when}): wait for it to end or "
        f"use another run.name; if that driver is gone, delete {lock}",
    )


def is_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (maybe another user's). An id no
    process can have (0 or below, which os.kill takes for a process group, or past a C int:
    OverflowError) is no live process."""
    if isinstance(pid, bool) or not 0 < pid < 2**31:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
