"""metrics.csv: one row per logged step, gathered on the workers without a barrier per row.

Every step leaves an `Entry` on each worker; every `Ledger.every` steps (tuned so that this
happens about once a second) the workers all-reduce their entries' losses in one message,
turn them into rows, and rank 0 appends the rows to metrics.csv. ray.train.report, a barrier
through the Ray Train controller, is left for checkpoints.

A row's train_loss is a function of its step alone, so a run resumed anywhere, on any number
of workers, writes the rows of a straight run: a row at step s on the log_every grid covers
the steps (s - log_every, s], a row at a checkpoint between two of the grid the steps since
the last one of the grid. The reports' (and summary.json's) train_loss is the mean over the
last `window` steps: log_every, or an epoch's steps if fewer. The Ledger keeps the all-reduced
losses of the last log_every steps, and a checkpoint carries them (Progress.recent_losses), so
the windows reach across a resume.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from raymb import storage
from raymb.core.noise import NoiseScale
from raymb.storage import Location

COLUMNS = (
    "step",
    "epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_perplexity",
    "val_bits_per_byte",
    "lr",
    "samples",
    "samples_per_s",
    "step_time_s",
    "data_wait_s",
    "bytes_allreduced",
    "skipped_steps",
)
NOISE_COLUMN = "grad_noise_scale"
"""With train.noise_scale: the estimate after the row's step, in rows (raymb.core.noise)."""
NOISE_WIDTH = 5
"""The numbers of a step's NoiseProbe.take."""
FLUSH_S = 1.0
"""About how often the workers gather their entries into rows."""
UPLOAD_S = 5.0
"""At most how often rank 0 uploads metrics.csv to an object store between checkpoints."""


@dataclass
class Entry:
    """One step as this worker saw it: `loss` is its summed loss (None when skipped), `rows`
    the step's rows on all workers, `units` what the loss is a mean over (rows, or tokens)."""

    row: dict[str, Any]
    loss: torch.Tensor | None
    rows: int
    step_s: float
    wait_s: float
    ended: float
    logged: bool
    units: int
    count: torch.Tensor | None = None
    """A counted loss's count of this worker's rows (raymb.core.objective): the row's units
    are then all workers' counts, summed at the gather."""
    noise: tuple[torch.Tensor, tuple[float, float, float]] | None = None
    """train.noise_scale: this worker's NoiseProbe.take of the step (None: not measured)."""


class Ledger:
    """Entries since the last gather, and the gathered losses of the last log_every steps."""

    def __init__(
        self,
        csv_path: Path | Location | None,
        world: int,
        device: torch.device,
        *,
        log_every: int,
        window: int | None = None,
        recent: Iterable[list] = (),
        noise: NoiseScale | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        """`extra`: more columns of metrics.csv (metrics.name's val_<metric>)."""
        self.noise = noise
        """train.noise_scale: the moving averages, updated at each gather in step order."""
        columns = COLUMNS + ((NOISE_COLUMN,) if noise is not None else ()) + tuple(extra)
        self.csv = MetricsCsv(csv_path, columns) if csv_path is not None else None
        self.world, self.device = world, device
        self.log_every = log_every
        self.window = min(log_every, window or log_every)
        """Steps that the reports' train_loss is a mean over."""
        self.entries: list[Entry] = []
        # (step, summed loss on all workers or None when skipped, units) of the last steps,
        # oldest first: a resumed run's carry the ones before the resume.
        self.recent: deque[tuple[int, float | None, int]] = deque(
            (tuple(r) for r in recent), maxlen=log_every
        )
        self.every = 1
        self.since = time.perf_counter()
        self._reset_timing(self.since)

    def _reset_timing(self, started: float) -> None:
        """Throughput is timed over the steps this process trained since the last row."""
        self.t_rows, self.t_steps, self.t_step_s, self.t_wait_s = 0, 0, 0.0, 0.0
        self.t_started = started

    def add(self, entry: Entry) -> None:
        self.entries.append(entry)

    @property
    def due(self) -> bool:
        return len(self.entries) >= self.every

    def gather(self, flag: bool = False) -> tuple[int | None, bool]:
        """All-reduce the entries' losses (a collective: every worker calls it at the same
        step) and write their rows; return the first step whose loss is not finite, if any,
        and whether any worker raised `flag` (rank 0's stop request rides along)."""
        entries, self.entries = self.entries, []
        if not entries:
            return None, False
        elapsed = time.perf_counter() - self.since
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        values = torch.stack(
            [
                *(zero if e.loss is None else e.loss.double() for e in entries),
                _t(elapsed, self),
                _t(float(flag), self),
            ]
        )
        counted = any(e.count is not None for e in entries)
        if counted:  # a counted loss's counts: in the same message
            counts = [
                zero if e.count is None else e.count.double().to(self.device) for e in entries
            ]
            values = torch.cat([values, torch.stack(counts)])
        measured = self._measured(entries)
        if measured is not None:  # train.noise_scale: in the same message
            values = torch.cat([values, measured])
        if self.world > 1:
            dist.all_reduce(values)
        values = values.tolist()
        noise = values[len(entries) + 2 :]
        if counted:
            counts, noise = noise[: len(entries)], noise[len(entries) :]
            for entry, count in zip(entries, counts):
                entry.units = count
        *losses, elapsed, flagged = values[: len(entries) + 2]
        # The next gather after about FLUSH_S, judged by the workers' mean time: all agree.
        per_step = elapsed / self.world / len(entries)
        self.every = max(1, min(100_000, int(FLUSH_S / per_step) if per_step > 0 else 100_000))
        self.since = time.perf_counter()
        bad = next((e.row["step"] for e, v in zip(entries, losses) if not math.isfinite(v)), None)
        if bad is not None:
            return bad, flagged > 0
        rows = []
        for i, (entry, loss) in enumerate(zip(entries, losses)):
            if self.noise is not None:
                self._add_noise(noise[i * NOISE_WIDTH : (i + 1) * NOISE_WIDTH])
                entry.row[NOISE_COLUMN] = self.noise.value
            step = entry.row["step"]
            self.recent.append((step, None if entry.loss is None else loss, entry.units))
            self.t_rows += entry.rows
            self.t_steps += 1
            self.t_step_s += entry.step_s
            self.t_wait_s += entry.wait_s
            if entry.logged:
                rows.append(self._row(entry))
                self._reset_timing(entry.ended)
        if self.csv is not None and rows:
            self.csv.append(rows)
        return None, flagged > 0

    def _measured(self, entries: list[Entry]) -> torch.Tensor | None:
        """The entries' noise numbers, NOISE_WIDTH a step (zeros for a step not measured):
        sum of the parts' |G_part|^2, |G_big|^2, parts, sum of their 1/B, 1/B_big."""
        if self.noise is None:
            return None
        zero = torch.zeros(2, dtype=torch.float64, device=self.device)
        squares = torch.stack([zero if e.noise is None else e.noise[0] for e in entries])
        floats = [(0.0, 0.0, 0.0) if e.noise is None else e.noise[1] for e in entries]
        floats = torch.tensor(floats, dtype=torch.float64, device=self.device)
        return torch.cat([squares.to(self.device), floats], dim=1).reshape(-1)

    def _add_noise(self, summed: list[float]) -> None:
        """One step's numbers summed over the workers: the parts' mean |G_small|^2 and 1/B,
        and |G_big|^2 and 1/B_big (the same on every worker) into the moving averages."""
        small, big, parts, inverse, inverse_big = summed
        if parts:
            self.noise.add(
                small / parts, inverse / parts, big / self.world, inverse_big / self.world
            )

    def _row(self, entry: Entry) -> dict[str, Any]:
        step = entry.row["step"]
        took = entry.ended - self.t_started
        steps = max(1, self.t_steps)
        return {
            **entry.row,
            # The grid's window: (step - log_every, step], or since the grid's last row.
            "train_loss": self.mean_loss(after=(step - 1) // self.log_every * self.log_every),
            "samples_per_s": self.t_rows / took if took > 0 else 0.0,
            "step_time_s": self.t_step_s / steps,
            "data_wait_s": self.t_wait_s / steps,
        }

    def mean_loss(self, *, after: int) -> float | None:
        """Mean loss per row (per token for lm) over the gathered steps past `after`."""
        kept = [
            (loss, units) for step, loss, units in self.recent if step > after and loss is not None
        ]
        units = sum(u for _, u in kept)
        return sum(loss for loss, _ in kept) / units if units else None

    def train_loss(self) -> float | None:
        """Mean loss over the last `window` steps gathered (what a report shows)."""
        if not self.recent:
            return None
        return self.mean_loss(after=self.recent[-1][0] - self.window)

    def recent_state(self) -> list[list]:
        """The recent steps' losses, as a checkpoint carries them."""
        return [list(r) for r in self.recent]


class MetricsCsv:
    """Appends rows to metrics.csv; `truncate_after` drops the rows of steps a resumed run
    will train again, so the file holds each step once.

    In an object store (which cannot append) the rows go to a local copy, and the whole file
    is uploaded at most every UPLOAD_S seconds and at each `flush` (before a checkpoint's
    report), so what a resumed run downloads holds every row up to its checkpoint."""

    def __init__(self, target: Path | Location, columns: tuple[str, ...] = COLUMNS) -> None:
        self.columns = columns
        if not isinstance(target, Location):
            target = storage.resolve(target)
        self.target = target
        self.uploaded = -math.inf
        if target.local:
            self.path = Path(target.path)
            return
        self.path = Path(tempfile.mkdtemp(prefix="raymb-metrics-")) / target.name
        try:
            self.path.write_bytes(target.read_bytes())
        except FileNotFoundError:
            pass

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        self.flush()

    def append(self, rows: list[dict[str, Any]]) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in self.columns})
        if time.monotonic() - self.uploaded >= UPLOAD_S:
            self.flush()

    def flush(self) -> None:
        """Upload the local copy (object stores only)."""
        if self.target.local or not self.path.exists():
            return
        self.target.write_bytes(self.path.read_bytes())
        self.uploaded = time.monotonic()

    def close(self) -> None:
        """Remove the local copy with its temporary folder (object stores only; a local
        metrics.csv stays where it is). Nothing is uploaded here: each checkpoint's `flush`
        has put the rows up to it in the store, and a failing run's error stays the error."""
        if not self.target.local:
            shutil.rmtree(self.path.parent, ignore_errors=True)


def _t(value: float, ledger: Ledger) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float64, device=ledger.device)
