"""Where Ray's own lines go while raymb trains: the run's logs/ray.log, not the terminal.

The terminal keeps raymb's lines (the progress, `raymb: ...` messages, the result table) and
what the user's own code prints in the training workers (a custom model or factory). Ray's
logging from the driver, the controller and the workers, and Ray Data's progress, go to
`<run dir>/logs/ray.log` as they come; for a run in an object store to a local file that is
uploaded there when the run ends. The few Ray lines a user must know about (a worker died, a
node was lost, memory ran out) become one raymb line each. `raymb train --verbose` leaves
Ray's lines on the terminal, as Ray prints them.

raymb.driver.cluster hooks `RayLog` into Ray; this module does not import Ray.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TextIO

from raymb.errors import StorageError
from raymb.storage import Location

RAY_LOG = "logs/ray.log"
"""Ray's lines of a run, under its run directory."""

TRAIN_WORKER = "RayTrainWorker"
"""The actor class of Ray Train's workers: their stdout is the user's code printing."""

FAILURE = re.compile(r"\[FailurePolicy\] (\w+)")
"""Ray Train's controller deciding on a failure (RETRY or RAISE); the lines after it say what
failed and how often."""

NOTICES: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"running low on memory|killed due to memory pressure|OutOfMemoryError"),
        "Ray killed a process: its node ran out of memory",
    ),
    (
        re.compile(r"has been marked dead because|Node is dead because"),
        "Ray lost a node of the cluster",
    ),
)
"""Other Ray lines that name something the user must know, and the raymb line each begins."""

# What a failed worker's error snippet says, most telling first.
_CAUSES = (
    (re.compile(r"memory pressure|low on memory|OutOfMemoryError"), "was killed: out of memory"),
    (re.compile(r"node has died|node died|node .* dead"), "was lost with its node"),
    (re.compile(r"worker process has died|died unexpectedly"), "died"),
    (re.compile(r"health check failed"), "stopped answering"),
)


class RayLog:
    """The run's ray.log, and the routing of each Ray line: to the file, and the raymb lines
    and the user's prints on to the terminal through `say` (the progress display's, which
    keeps its bar whole; by default a plain print). Thread-safe: Ray forwards lines from its
    own threads."""

    current: ClassVar[RayLog | None] = None
    """Where Ray's lines go now; None: to the terminal, as Ray prints them. The latest run's
    log stays current after it ends, for the lines of Ray's shutdown."""

    def __init__(self, run_dir: Location, *, say: Callable[[str], None] | None = None) -> None:
        self.run_dir = run_dir
        self.say = say
        if run_dir.local:
            self.path = Path(run_dir.path) / RAY_LOG
            self.path.parent.mkdir(parents=True, exist_ok=True)
        else:  # an object cannot be appended to: a local file, uploaded by close()
            fd, name = tempfile.mkstemp(prefix=f"raymb-{run_dir.name}-", suffix="-ray.log")
            os.close(fd)
            self.path = Path(name)
        # Line-buffered: the file is readable (tail -f) while the run goes on.
        self.file: TextIO = open(self.path, "a", encoding="utf-8", buffering=1)
        self.lock = threading.Lock()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        self._write(f"==== raymb driver pid {os.getpid()}, {started} ====")  # a resume appends

    def announce(self) -> None:
        """Say where Ray's lines go, once Ray is up."""
        self._show(f"raymb: Ray's own messages go to {self.shown} (--verbose shows them here)")

    @property
    def shown(self) -> str:
        """Where the log is, for a message: the run's path (a bucket run's is uploaded)."""
        return str(self.run_dir / RAY_LOG)

    def forwarded(self, data: dict[str, Any]) -> None:
        """A batch of lines Ray forwards from one of its processes (Ray's dict: lines, pid,
        ip, is_err, actor_name or task_name)."""
        source = data.get("actor_name") or data.get("task_name") or ""
        pid = data.get("pid")
        ip = data.get("ip")
        where = f", ip={ip}" if ip and ip != data.get("localhost") else ""
        prefix = f"({source} pid={pid}{where}) " if source else f"({pid}{where}) "
        users = source == TRAIN_WORKER and not data.get("is_err")
        lines = [_plain(line) for line in data.get("lines", [])]
        with self.lock:
            for line in lines:
                self._write(prefix + line)
                if line.startswith("raymb:"):  # raymb's own, from a worker
                    self._show(line)
                elif users:
                    self._show(prefix + line)
            if not users:
                for line in notices(lines):
                    self._show(line)

    def record(self, text: str) -> None:
        """A line of the driver's own Ray logging, formatted."""
        lines = text.splitlines() or [""]
        with self.lock:
            for line in lines:
                self._write(line)
            for line in notices(lines):
                self._show(line)

    def close(self) -> None:
        """Flush; upload a bucket run's log. Lines that Ray still sends (its shutdown) go on
        to the local file."""
        with self.lock:
            self.file.flush()
        if self.run_dir.local:
            return
        try:
            if self.run_dir.exists():  # not a new run its failure discarded
                (self.run_dir / RAY_LOG).write_bytes(self.path.read_bytes())
        except (OSError, StorageError) as e:
            self._show(f"raymb: Ray's log stays in {self.path} ({e})")

    def _write(self, line: str) -> None:
        try:
            self.file.write(line + "\n")
        except (OSError, ValueError):  # a full disk, a closed file: the run goes on
            pass

    def _show(self, line: str) -> None:
        try:
            if self.say is not None:
                self.say(line)
                return
            if _isatty(sys.stderr):  # blank a progress bar's line; it is redrawn at its tick
                sys.stderr.write("\r\x1b[K")
                sys.stderr.flush()
            print(line, flush=True)
        except (OSError, ValueError):
            pass


def notices(lines: list[str]) -> list[str]:
    """The raymb lines for those of Ray's `lines` (one batch from one process) that matter."""
    out = []
    for i, line in enumerate(lines):
        if FAILURE.search(line):
            out.append(failure_notice(lines[i : i + 60]))
            continue
        for pattern, text in NOTICES:
            if pattern.search(line):
                out.append(f"raymb: {text}: {line.strip()[:200]}")
                break
    return out


def failure_notice(block: list[str]) -> str:
    """One raymb line for Ray Train's failure-policy block: what failed, and what Ray Train
    does next."""
    text = "\n".join(block)
    decision = FAILURE.search(text)
    source = re.search(r"Source: (.+)", text)
    count = re.search(r"Error count: (\d+) \(max allowed: ([\w.]+)\)", text)
    ranks = sorted(set(re.findall(r"\[Rank (\d+) Error Snippet\]", text)), key=int)
    kind = source.group(1).strip() if source else ""
    if kind == "preemption":
        what = "a node of the training workers was preempted"
    elif kind == "controller":
        what = "Ray Train's controller failed"
    elif ranks:
        cause = next((c for pattern, c in _CAUSES if pattern.search(text)), "failed")
        pids = re.findall(r"\bpid[=:] ?(\d+)", text)
        pid = f" (pid {pids[0]})" if len(ranks) == 1 and pids else ""
        many = len(ranks) > 1
        what = f"training worker{'s' if many else ''} rank {', '.join(ranks)}"
        what += f"{pid} {cause}"
    else:
        what = "a training worker failed"
    if decision is not None and decision.group(1) == "RETRY":
        then = "restarting from the latest checkpoint"
    else:
        then = "no restart left"
    if count:
        then += f" (failure {count.group(1)}; scale.max_failures = {count.group(2)})"
    return f"raymb: {what}; {then}"


def close_log(ray_log: RayLog | None) -> None:
    """RayLog.close, for a run that may have none (--verbose)."""
    if ray_log is not None:
        ray_log.close()


class ToRayLog(logging.Filter):
    """On a Ray logger's console handler: sends the record to RayLog.current instead of the
    console (the record passes on when there is none)."""

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        sink = RayLog.current
        if sink is None:
            return True
        try:
            sink.record(self.handler.format(record))
        except Exception:  # a record that does not format must not break Ray's caller
            return True
        return False


def divert(logger: logging.Logger) -> None:
    """Put ToRayLog on each handler of `logger` that writes to a console stream."""
    for handler in logger.handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        )
        if console and not any(isinstance(f, ToRayLog) for f in handler.filters):
            handler.addFilter(ToRayLog(handler))


_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def _plain(line: str) -> str:
    return _COLOUR.sub("", line)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False
