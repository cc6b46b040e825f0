"""What the driver shows while a run trains: a progress bar, or plain lines.

A `Watch` shows the start-up as phases the driver names ("starting Ray", "reading data",
"starting 2 workers"), then tails metrics.csv (rank 0 appends the rows it gathers, about once
a second; raymb.driver.report.tail) in a background thread. On a terminal it redraws one line
with `\\r`; elsewhere (a log file, a Ray job's output) it prints a line for each phase and then
a plain line at most every `line_every` seconds, and only when a new row has arrived. After a
resume rank 0 rewrites metrics.csv without the rows past the resumed step: the tail notices the
new file and starts over. The result table at the end is raymb.driver.report.summary's.

The ETA divides the steps left by the step rate over a moving window (RATE_WINDOW_S) of the
reads that brought new rows, from the first of them on: the start-up, and the steps taken
before the first read, are not in it, nor are rows that came in one read timed as one.
"""

from __future__ import annotations

import io
import math
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from raymb.driver.report.tail import RemoteTail, Tail
from raymb.errors import RaymbError
from raymb.storage import Location

BAR_WIDTH = 20
RATE_WINDOW_S = 30.0
"""The ETA's step rate is measured over about this many seconds of the latest reads."""
BUILT_IN_VAL = ("val_loss", "val_accuracy", "val_perplexity", "val_bits_per_byte")
"""The validation columns every run may have; the others are metrics.name's val_<metric>."""


@dataclass
class Row:
    """The columns of a metrics.csv row that the progress line shows."""

    step: int
    train_loss: float | None
    val_loss: float | None
    val_accuracy: float | None
    samples_per_s: float | None
    own: dict[str, float | None] = field(default_factory=dict)
    """metrics.name's val_<metric> columns, in metrics.csv's order."""


class Display:
    """Turns phases and rows into a bar (terminal) or plain lines, and times the ETA.
    `clock` gives seconds (time.monotonic; a test passes its own)."""

    def __init__(
        self,
        stream: TextIO,
        total_steps: int | None,
        *,
        line_every: float,
        tty: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.total = total_steps if total_steps and total_steps > 0 else None
        self.line_every = line_every
        self.tty = tty
        self.clock = clock
        self.started = clock()
        self.phase: str | None = None
        """What the run is doing before its first step, as the driver says."""
        self.last: Row | None = None
        self.val: tuple[float | None, float | None] = (None, None)
        self.own: dict[str, float | None] = {}
        """metrics.name's metrics at the last validation."""
        self.reads = 0
        self.samples: deque[tuple[float, int]] = deque()  # (time, step) of reads with new rows
        self.printed_at = -math.inf
        self.unprinted = False
        self.width = 0  # of the bar last drawn, to blank what a shorter one leaves

    def set_phase(self, text: str) -> None:
        """Show `text` until the first new rows: at once as a line, or on the bar."""
        self.phase = text
        if self.tty:
            self.tick()
        else:
            self.stream.write(f"raymb: {text}\n")
            self.stream.flush()

    def say(self, line: str) -> None:
        """A line of the driver's own on stdout; on a terminal the bar is blanked first and
        drawn again below it."""
        drawn = self.tty and self.width
        if drawn:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0
        print(line, flush=True)
        if drawn:
            self.tick()

    def add(self, rows: list[dict[str, str]], restarted: bool) -> None:
        """The rows of one read. Those of the first read were there before the run started
        (a resumed run's): they show where it stands, but neither end the start-up phase
        nor time the step rate."""
        now = self.clock()
        history = self.reads == 0
        self.reads += 1
        if restarted:  # a resume rewrote the file: the step rate starts over too
            self.samples.clear()
        parsed = [r for r in map(_row, rows) if r is not None]
        for row in parsed:
            if row.val_loss is not None:
                self.val, self.own = (row.val_loss, row.val_accuracy), row.own
            self.last = row
            self.unprinted = True
        if not parsed or history or restarted:
            return
        self.phase = None  # new steps: training is under way
        self.samples.append((now, self.last.step))
        # Keep the newest sample at least RATE_WINDOW_S back, and every one after it.
        while len(self.samples) > 2 and self.samples[1][0] <= now - RATE_WINDOW_S:
            self.samples.popleft()

    def rate(self) -> float | None:
        """Steps per second of wall time over the window, checkpoints and validation
        included; None until two reads have brought steps."""
        if len(self.samples) < 2:
            return None
        (t0, s0), (t1, s1) = self.samples[0], self.samples[-1]
        if s1 <= s0 or t1 <= t0:
            return None
        return (s1 - s0) / (t1 - t0)

    def eta_s(self) -> float | None:
        if self.total is None or self.last is None:
            return None
        left = max(0, self.total - self.last.step)
        rate = self.rate()
        if left == 0 or rate is None:
            return None
        return left / rate

    def text(self, now: float) -> str:
        row = self.last
        parts = []
        if self.phase is not None:
            parts.append(self.phase)
        elif row is None:
            parts.append("waiting for the first step")
        elif self.total is not None:
            done = min(row.step / self.total, 1.0)
            filled = int(done * BAR_WIDTH)
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            parts.append(f"step {row.step}/{self.total} [{bar}] {done:4.0%}")
        else:
            parts.append(f"step {row.step}")
        if row is not None and self.phase is None:
            parts.append(f"loss {number(row.train_loss)}")
            val_loss, val_accuracy = self.val
            if val_loss is not None:
                parts.append(f"val_loss {number(val_loss)}")
            if val_accuracy is not None:
                parts.append(f"val_acc {val_accuracy:.4f}")
            parts += [f"{k} {v:.4g}" for k, v in self.own.items() if v is not None]
            if row.samples_per_s is not None:
                parts.append(f"{row.samples_per_s:,.0f} samples/s")
        parts.append(f"elapsed {duration(now - self.started)}")
        eta = self.eta_s() if self.phase is None else None
        if eta is not None:
            parts.append(f"ETA {duration(eta)}")
        return "  ".join(parts)

    def tick(self, *, final: bool = False) -> None:
        now = self.clock()
        if self.tty:
            if self.last is None and self.phase is None and not final:
                return
            if self.last is not None or self.phase is not None:
                columns = shutil.get_terminal_size(fallback=(120, 24)).columns
                text = self.text(now)[: max(columns - 1, 20)]
                self.stream.write("\r" + text + " " * max(0, self.width - len(text)))
                self.width = len(text)
            if final and self.width:
                self.stream.write("\n")
                self.width = 0
            self.stream.flush()
        elif (
            self.unprinted
            and self.phase is None  # the phase has had its line
            and (final or now - self.printed_at >= self.line_every)
        ):
            self.stream.write(f"raymb: {self.text(now)}\n")
            self.stream.flush()
            self.printed_at = now
            self.unprinted = False


class Watch:
    """A run's progress on the terminal: the start-up phases (`phase`), then the rows of
    `metrics_csv` once `follow_rows` is called, until `close` (or the end of a with block).

    `total_steps` gives the bar and the ETA (None when unknown, as for online training).
    Rows already in the file (a resumed run) count as progress. `on_rows` gets each batch of
    new rows too (experiment tracking), on the watching thread.
    """

    def __init__(
        self,
        metrics_csv: Path | Location,
        total_steps: int | None,
        stream: TextIO | None = None,
        *,
        interval: float | None = None,
        line_every: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        stream = sys.stderr if stream is None else stream
        self.display = Display(
            stream, total_steps, line_every=line_every, tty=_isatty(stream), clock=clock
        )
        remote = isinstance(metrics_csv, Location) and not metrics_csv.local
        self.tail = RemoteTail(metrics_csv) if remote else Tail(Path(metrics_csv))
        if interval is None:
            interval = 2.0 if remote else 0.5  # a read of an object store is a request
        self.interval = interval
        self.reading = False
        self.on_rows: Callable[[list[dict[str, str]]], None] | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the final update must not interleave with the thread's
        self._thread: threading.Thread | None = None

    def phase(self, text: str) -> None:
        """What the run does now, until its first new rows ("starting Ray", ...)."""
        with self._lock:
            self.display.set_phase(text)
        self._start()

    def say(self, line: str) -> None:
        """Print one of the driver's own lines without breaking the bar."""
        with self._lock:
            self.display.say(line)

    def follow_rows(self, on_rows: Callable[[list[dict[str, str]]], None] | None = None) -> None:
        """From now on read metrics.csv's rows (the workers are starting)."""
        with self._lock:
            self.reading, self.on_rows = True, on_rows
        self._start()

    def close(self) -> None:
        """The last rows, and the bar's line ended; the thread gone."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self._update(final=True)
        except (OSError, ValueError, RaymbError):
            pass

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._run, name="raymb-progress", daemon=True)
            self._thread.start()

    def _update(self, final: bool = False) -> None:
        with self._lock:
            rows: list[dict[str, str]] = []
            if self.reading:
                rows, restarted = self.tail.read()
                self.display.add(rows, restarted)
            self.display.tick(final=final)
            if rows and self.on_rows is not None:
                self.on_rows(rows)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._update()
            except (OSError, ValueError, RaymbError):  # a closed stream, an odd row: optional
                pass


@contextmanager
def watch(
    metrics_csv: Path | Location,
    total_steps: int | None,
    stream: TextIO | None = None,
    *,
    interval: float | None = None,
    line_every: float = 10.0,
    on_rows: Callable[[list[dict[str, str]]], None] | None = None,
) -> Iterator[Watch]:
    """Show the progress of the run writing `metrics_csv` while the body runs (a Watch that
    reads rows from the start)."""
    shown = Watch(metrics_csv, total_steps, stream, interval=interval, line_every=line_every)
    shown.follow_rows(on_rows)
    try:
        yield shown
    finally:
        shown.close()


def duration(seconds: float) -> str:
    """12.3s, 4m05s, 2h03m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, s = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m"


def number(value: float | None, spec: str = ".6g") -> str:
    """A value as the display and the result table show it: n/a when there is none."""
    return "n/a" if value is None else format(value, spec)


def _row(raw: dict[str, str]) -> Row | None:
    try:
        step = int(raw["step"])
    except (KeyError, TypeError, ValueError):
        return None
    return Row(
        step=step,
        train_loss=_float(raw.get("train_loss")),
        val_loss=_float(raw.get("val_loss")),
        val_accuracy=_float(raw.get("val_accuracy")),
        samples_per_s=_float(raw.get("samples_per_s")),
        own={
            k: _float(v) for k, v in raw.items() if k.startswith("val_") and k not in BUILT_IN_VAL
        },
    )


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False
