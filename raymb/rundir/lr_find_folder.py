"""An lr-find's folder, <run.storage_path>/<run.name>-lr-find/ (raymb.driver.lr_find): what
an lr-find writes there, lr_find.json that marks the folder as its output, and the rule that
lr-find clears only a folder that is provably its own.

A folder holding anything an lr-find does not write (run.json, checkpoints, summary.json, ...),
or an lr_find.json that is not an lr-find's, is refused in one line; an older lr-find's folder
(no lr_find.json) is recognised when it holds nothing but what lr-find writes, its lr_find.csv
with lr-find's header. Clearing removes each known file by name; the folder itself never.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from typing import Any

from raymb.core.lr_find import CSV_COLUMNS, CSV_FILE
from raymb.errors import StorageError
from raymb.rundir.lock import LOCK_FILE
from raymb.storage import Location

PNG_FILE = "lr_find.png"
MARKER_FILE = "lr_find.json"
"""Names a folder as an lr-find's output: {"raymb": "lr-find", "status", "run", "min", "max",
"steps", "host", "pid", "started", "updated"} and, once known, "steps_done", "suggested",
"error". status: running, finished, interrupted (a partial curve: no rate suggested) or
failed."""
KIND = "lr-find"
STOP_FILE = "STOP"  # raymb.worker.worker.STOP_FILE; not imported from there (torch)
RAY_MARKER = ".validate_storage_marker"
"""An empty file Ray Train's storage check leaves in the folder it writes to."""
LOGS, RAY_LOG = "logs", "ray.log"  # raymb.driver.logs.RAY_LOG, split
OWN_FILES = frozenset({MARKER_FILE, CSV_FILE, PNG_FILE, RAY_MARKER, STOP_FILE})
"""The files an lr-find writes at the top of its folder (with logs/ray.log, and the lock)."""
_LEFTOVER = re.compile(r"\.lr_find\.(json|csv|png)(\.[0-9a-f]{8})?\.tmp|\.lock\.[0-9a-f]{8}\.stale")
"""What an lr-find killed mid-write leaves: an atomic write's temporary file, or a dead
driver's lock moved aside (raymb.storage.temp_sibling, raymb.rundir.lock)."""


def check_own_folder(out_dir: Location) -> None:
    """Refuse, in one line naming it, a folder that is not provably an lr-find's output: one
    holding anything an lr-find does not write, or whose lr_find.json is not an lr-find's.
    A missing or empty folder is fine. Only reads."""
    listing = out_dir.listing()
    if not listing:
        return
    foreign = [
        name for name, info in sorted(listing.items()) if not _own_entry(out_dir, name, info)
    ]
    if foreign:
        shown = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        raise _not_own(out_dir, f"it holds {shown}, which lr-find does not write")
    if MARKER_FILE in listing:
        if read_marker(out_dir).get("raymb") != KIND:
            raise _not_own(out_dir, f"its {MARKER_FILE} is not an lr-find's")
        return
    # An lr-find from before lr_find.json: its curve, if it got that far, has lr-find's header.
    if CSV_FILE in listing:
        header = (out_dir / CSV_FILE).read_bytes()[:200].decode(errors="replace")
        if header.split("\n", 1)[0].strip() != ",".join(CSV_COLUMNS):
            raise _not_own(out_dir, f"its {CSV_FILE} is not an lr-find's curve")


def _own_entry(out_dir: Location, name: str, info) -> bool:
    """Whether a folder entry is one an lr-find writes: a known file, logs/ holding only
    ray.log, the lock. A link is not (what it points at is not the folder's)."""
    import pyarrow.fs as pafs

    entry = out_dir / name
    if out_dir.local and os.path.islink(entry.path):
        return False
    if name == LOGS:
        if info.type != pafs.FileType.Directory:
            return False
        inside = entry.listing()
        return all(
            n == RAY_LOG
            and i.type == pafs.FileType.File
            and not (entry.local and os.path.islink((entry / n).path))
            for n, i in inside.items()
        )
    if info.type != pafs.FileType.File:
        return False
    return name in OWN_FILES or name == LOCK_FILE or _LEFTOVER.fullmatch(name) is not None


def _not_own(out_dir: Location, why: str) -> StorageError:
    return StorageError(
        out_dir.uri,
        f"not an lr-find's output folder ({why}), so lr-find will not clear it: move it "
        "away or choose another run.name",
    )


def clear_own_folder(out_dir: Location) -> None:
    """Remove, file by file, what an earlier lr-find left (check_own_folder has passed); the
    folder itself and the lock stay."""
    for name in sorted(out_dir.listing()):
        if name == LOCK_FILE:
            continue
        if name == LOGS:
            (out_dir / LOGS / RAY_LOG).remove()
            if out_dir.local:
                os.rmdir((out_dir / LOGS).path)  # empty now; an object store has no folders
            continue
        (out_dir / name).remove()


def read_marker(out_dir: Location) -> dict[str, Any]:
    """lr_find.json's record; {} when there is none or it does not read as one."""
    try:
        value = json.loads((out_dir / MARKER_FILE).read_bytes()[: 1 << 16])
    except (FileNotFoundError, UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def mark(
    out_dir: Location,
    status: str,
    record: dict[str, Any],
    *,
    quiet: bool = False,
    **fields: Any,
) -> None:
    """Write lr_find.json: the marker that names the folder an lr-find's, and its status.
    `quiet`: a store that fails is no news beside the error or the stop at hand."""
    now = round(time.time(), 3)
    started = now if status == "running" else read_marker(out_dir).get("started", now)
    value = {
        "raymb": KIND,
        "status": status,
        **record,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": started,
        "updated": now,
        **fields,
    }
    try:
        (out_dir / MARKER_FILE).write_text(json.dumps(value, indent=2) + "\n")
    except (OSError, StorageError):
        if not quiet:
            raise
