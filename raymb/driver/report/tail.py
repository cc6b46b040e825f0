"""metrics.csv's rows as they land, for the progress display (raymb.driver.report.progress).

Rank 0 appends the rows it gathers to a local metrics.csv, about once a second; in an object
store it rewrites the file whole. Either way a reader gets only the complete rows past those
it has seen, and starts over when a resume has rewritten the file without the rows past the
resumed step.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from raymb.storage import Location


class Tail:
    """Complete rows appended to a CSV file since the last call; starts over if it is replaced.

    A reader must never see half a row (the writer may be mid-line), so only text up to the
    last newline is consumed.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.reset()

    def reset(self) -> None:
        self.identity: tuple[int, int] | None = None  # (device, inode) of the file being read
        self.offset = 0
        self.pending = b""
        self.header: list[str] | None = None

    def read(self) -> tuple[list[dict[str, str]], bool]:
        """(new rows, whether the file was replaced or truncated since the last read)."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return [], False
        with f:
            st = os.fstat(f.fileno())  # of the file opened: the name may be replaced meanwhile
            restarted = self.identity not in (None, (st.st_dev, st.st_ino))
            if restarted or st.st_size < self.offset:
                self.reset()
                restarted = True
            self.identity = (st.st_dev, st.st_ino)
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        complete, _, self.pending = (self.pending + chunk).rpartition(b"\n")
        if not complete:
            return [], restarted
        lines = complete.decode().split("\n")
        if self.header is None:
            self.header = next(csv.reader([lines[0]]))
            lines = lines[1:]
        rows = [dict(zip(self.header, values)) for values in csv.reader(lines) if values]
        return rows, restarted


class RemoteTail:
    """Tail's contract for a metrics.csv in an object store, which rank 0 rewrites whole (an
    object cannot be appended to): the rows past those already seen, or all of them when the
    file no longer starts with what was seen (a resume truncated it)."""

    def __init__(self, location: Location) -> None:
        self.location = location
        self.seen = ""

    def read(self) -> tuple[list[dict[str, str]], bool]:
        try:
            text = self.location.read_text()
        except FileNotFoundError:
            return [], False
        text = text[: text.rfind("\n") + 1]  # whole rows only
        restarted = not text.startswith(self.seen)
        old = 0 if restarted else self.seen.count("\n")  # lines read before, header included
        self.seen = text
        lines = text.splitlines()
        if not lines:
            return [], restarted
        header = next(csv.reader(lines[:1]))
        rows = [dict(zip(header, v)) for v in csv.reader(lines[max(old, 1) :]) if v]
        return rows, restarted
