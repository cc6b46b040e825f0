"""What the driver shows while a run trains and after: a progress bar, and the result table.

A `Watch` shows the start-up as phases the driver names ("starting Ray", "reading data",
"starting 2 workers"), then tails metrics.csv (rank 0 appends the rows it gathers, about once
a second) in a background thread. On a terminal it redraws one line with `\\r`; elsewhere (a
log file, a Ray job's output) it prints a line for each phase and then a plain line at most
every `line_every` seconds, and only when a new row has arrived. After a resume rank 0
rewrites metrics.csv without the rows past the resumed step: the tail notices the new file
and starts over.

The ETA divides the steps left by the step rate over a moving window (RATE_WINDOW_S) of the
reads that brought new rows, from the first of them on: the start-up, and the steps taken
before the first read, are not in it, nor are rows that came in one read timed as one.
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from raymb.core.noise import batch_advice
from raymb.errors import RaymbError
from raymb.storage import Location

BAR_WIDTH = 20
RATE_WINDOW_S = 30.0
"""The ETA's step rate is measured over about this many seconds of the latest reads."""


@dataclass
class Row:
    """The columns of a metrics.csv row that the progress line shows."""

    step: int
    train_loss: float | None
    val_loss: float | None
    val_accuracy: float | None
    samples_per_s: float | None


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
                self.val = (row.val_loss, row.val_accuracy)
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
            parts.append(f"loss {_num(row.train_loss)}")
            val_loss, val_accuracy = self.val
            if val_loss is not None:
                parts.append(f"val_loss {_num(val_loss)}")
            if val_accuracy is not None:
                parts.append(f"val_acc {val_accuracy:.4f}")
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


def format_summary(summary: dict[str, Any], run_dir: str | Path) -> str:
    """summary.json as a short two-column table, for the end of `raymb train` and of a job."""
    resumed = summary.get("resumed_from_steps") or []
    steps = f"{summary.get('steps', 0):,}"
    notes = [f"resumed from step {', '.join(str(s) for s in resumed)}"] if resumed else []
    if summary.get("stopped_early"):
        notes.append("stopped early")
    if summary.get("skipped_steps"):
        notes.append(f"{summary['skipped_steps']:,} skipped")
    if notes:
        steps += f" ({'; '.join(notes)})"
    rate = summary.get("samples_per_s")
    rows = [
        ("train loss", _num(summary.get("train_loss"))),
        ("val loss", _num(summary.get("val_loss"))),
        ("val accuracy", _num(summary.get("val_accuracy"), ".4f")),
        *(
            [("val perplexity", _num(summary["val_perplexity"], ".3f"))]
            if summary.get("val_perplexity") is not None  # language models
            else []
        ),
        *(
            [("val bits/byte", _num(summary["val_bits_per_byte"], ".4f"))]
            if summary.get("val_bits_per_byte") is not None
            else []
        ),
        ("steps", steps),
        ("samples", f"{summary.get('samples', 0):,}"),
        *(
            [("files", f"{summary['files_consumed']:,} ({summary.get('stop_reason') or 'done'})")]
            if "files_consumed" in summary  # online training
            else []
        ),
        ("samples/s", "n/a" if rate is None else f"{rate:,.1f}"),
        ("wall time", duration(summary["wall_s"]) if summary.get("wall_s") is not None else "n/a"),
        ("all-reduced", f"{size(summary.get('bytes_allreduced') or 0)} per worker"),
        *_noise_rows(summary),
        ("checkpoint", str(summary.get("checkpoint") or "none")),
        *(
            [("best", str(summary["best_checkpoint"]))]
            if summary.get("best_checkpoint") not in (None, summary.get("checkpoint"))
            else []
        ),
        ("run dir", str(run_dir)),
    ]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def _noise_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """train.noise_scale: the last estimate, and a line when G is far from it."""
    if "grad_noise_scale" not in summary:
        return []
    estimate = summary["grad_noise_scale"]
    if estimate is None:
        return [("noise scale", "n/a (no step with two batch sizes yet)")]
    rows = [("noise scale", f"{estimate:,.1f} rows (B_simple, the last estimate)")]
    advice = batch_advice(estimate, summary.get("global_batch_size"))
    return rows + ([("", advice)] if advice else [])


def duration(seconds: float) -> str:
    """12.3s, 4m05s, 2h03m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, s = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m"


def size(n: float) -> str:
    """Bytes in binary units: 512 B, 1.5 KiB, 3.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


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
    )


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _num(value: float | None, spec: str = ".6g") -> str:
    return "n/a" if value is None else format(value, spec)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False
