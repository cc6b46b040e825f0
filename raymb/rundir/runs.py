"""The runs under a storage path, as `raymb runs` lists them, read from the run directories only.

A run directory (`<storage_path>/<name>/`, docs/design.md) is one that holds `run.json`. Besides the
files the driver and Ray Train write there, the driver keeps `status.json` through `mark`: the
run's status, when it was last marked, and the host and process of the driver, so that a
"running" run whose driver died (on this machine) shows as "interrupted". Runs from before
status.json count as finished when they have a summary.json.

While a driver trains a run it holds `.lock` in the run directory (raymb.rundir.lock).

A run's checkpoints come from either launcher: those Ray Train registered in its snapshot file
(named by time) and raymb's own `checkpoint_<step>/` of a `--local` segment
(raymb.worker.session.TorchSession); `saved_checkpoints` lists both, for the sessions that
resume from the newest and for the driver.

No Ray and no torch here: listing runs must be quick, on a laptop or against an object store.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from raymb.errors import StorageError
from raymb.rundir.lock import is_alive
from raymb.storage import Location, resolve

RUN_FILE = "run.json"
STATUS_FILE = "status.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.csv"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of its checkpoints
COMPLETE = ".complete"
"""In raymb's own checkpoint directory once every rank's files are in it; it holds the
report's metrics as JSON (empty in checkpoints from before cross-launcher resumes)."""
OWN_NAME = re.compile(r"checkpoint_(\d{8,})")
"""raymb's own checkpoint folder: checkpoint_<step, 8 digits or more>. Ray Train's are
checkpoint_<date and time>."""
STATUSES = ("running", "finished", "stopped early", "stopped", "interrupted", "failed")
"""What `mark` records ("interrupted": abandoned by a second Ctrl-C). `find_runs` also shows a
run marked running whose driver is gone as "interrupted", and "unknown" (no status.json and no
summary.json)."""
READERS = 16  # run directories read at once: an object store answers each request slowly


def mark(run_dir: Location, status: str, **fields: Any) -> None:
    """Record a run's status in <run_dir>/status.json, replacing the whole file (a reader sees
    the old record or the new): {"status", "updated": unix time, "host", "pid", "started"} and
    `fields`, e.g. error="one line". "running" sets "started"; later marks keep it."""
    if status not in STATUSES:
        raise ValueError(f"run status {status!r}: expected one of {', '.join(STATUSES)}")
    now = round(time.time(), 3)
    record: dict[str, Any] = {
        "status": status,
        "updated": now,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    started = now if status == "running" else _read_json(run_dir / STATUS_FILE).get("started")
    if started is not None:
        record["started"] = started
    record.update(fields)
    (run_dir / STATUS_FILE).write_text(json.dumps(record) + "\n")


@dataclass(frozen=True)
class Run:
    """One line of `raymb runs`; None where the run's files do not say."""

    name: str
    location: str
    status: str
    steps: int | None
    metric: str | None  # the metric of the best checkpoint (checkpoint.metric)
    best: float | None
    checkpoint: str | None  # the newest complete checkpoint directory
    checkpoint_step: int | None
    wall_s: float | None
    updated: float | None  # unix time of the newest file in the run directory
    host: str | None
    pid: int | None
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def find_runs(root: Location) -> list[Run]:
    """The runs in the directories of `root` (or `root` itself when it is a run directory),
    the most recently updated last."""
    kind = root.info().type
    if kind == pafs.FileType.NotFound:
        raise StorageError(root.uri, "no such directory")
    if kind != pafs.FileType.Directory:
        raise StorageError(root.uri, "not a directory")
    entries = root.listing()
    if RUN_FILE in entries:
        return [read_run(root, entries)]
    dirs = [root / name for name, info in entries.items() if info.type == pafs.FileType.Directory]
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        found = [run for run in pool.map(_read_if_run, dirs) if run is not None]
    return sorted(found, key=lambda r: (r.updated or 0.0, r.name))


def read_run(run_dir: Location, entries: dict[str, pafs.FileInfo] | None = None) -> Run:
    """What a run directory's files say about the run. `entries`: its listing, if at hand."""
    if entries is None:
        entries = run_dir.listing()
    record = _read_json(run_dir / STATUS_FILE) if STATUS_FILE in entries else {}
    summary = _read_json(run_dir / SUMMARY_FILE) if SUMMARY_FILE in entries else {}
    snapshot = _read_json(run_dir / SNAPSHOT_FILE) if SNAPSHOT_FILE in entries else {}
    rows = _read_rows(run_dir / METRICS_FILE) if METRICS_FILE in entries else []
    config = _read_json(run_dir / RUN_FILE).get("config")
    status = _status(record, summary)
    updated = max(
        [i.mtime_ns / 1e9 for i in entries.values() if i.mtime_ns is not None]
        + [t for t in [record.get("updated")] if isinstance(t, int | float)],
        default=None,
    )
    steps = [_number(rows[-1].get("step")) if rows else None, _number(summary.get("steps"))]
    metric, best = _best(config if isinstance(config, dict) else {}, snapshot, rows)
    checkpoint, checkpoint_step = latest_checkpoint(run_dir, entries, snapshot)
    return Run(
        name=run_dir.name,
        location=run_dir.uri,
        status=status,
        steps=max((int(s) for s in steps if s is not None), default=None),
        metric=metric,
        best=best,
        checkpoint=checkpoint.uri if checkpoint is not None else None,
        checkpoint_step=checkpoint_step,
        wall_s=_wall(status, record, summary, updated),
        updated=updated,
        host=record.get("host"),
        pid=record.get("pid"),
        error=record.get("error"),
    )


def format_table(runs: list[Run]) -> str:
    """Aligned columns under a header line, one run a line."""
    header = ("NAME", "STATUS", "STEPS", "BEST", "LAST CHECKPOINT", "WALL", "UPDATED")
    lines = [header] + [
        (
            run.name,
            run.status,
            "-" if run.steps is None else str(run.steps),
            "-" if run.best is None else f"{run.metric} {run.best:.4g}",
            "-" if run.checkpoint is None else run.checkpoint.rsplit("/", 1)[-1],
            format_duration(run.wall_s),
            "-"
            if run.updated is None
            else time.strftime("%Y-%m-%d %H:%M", time.localtime(run.updated)),
        )
        for run in runs
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {2}  # numbers line up on the right
    return "\n".join(
        "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(line)
        ).rstrip()
        for line in lines
    )


def format_duration(seconds: float | None) -> str:
    """25.9s, 3m 05s, 2h 07m, 1d 04h."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if s >= size:
            return f"{s // size}{unit} {s % size // sub_size:02d}{sub}"
    return f"{s // 60}m {s % 60:02d}s"


def _read_if_run(directory: Location) -> Run | None:
    entries = directory.listing()
    return read_run(directory, entries) if RUN_FILE in entries else None


def _read_json(location: Location) -> dict[str, Any]:
    """A JSON object file's contents; {} when it is missing or not a JSON object (a run's files
    are the driver's to get right; a listing shows what it can)."""
    try:
        value = json.loads(location.read_text())
    except (FileNotFoundError, UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_rows(location: Location) -> list[dict[str, str]]:
    try:
        text = location.read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return []
    complete = text[: text.rfind("\n") + 1]  # the writer may be mid-row
    return list(csv.DictReader(io.StringIO(complete)))


def _status(record: dict[str, Any], summary: dict[str, Any]) -> str:
    status = record.get("status")
    if status == "running" and record.get("host") == socket.gethostname():
        pid = record.get("pid")
        if isinstance(pid, int) and not is_alive(pid):
            return "interrupted"
    if isinstance(status, str) and status:
        return status
    if not summary:
        return "unknown"
    if summary.get("stopped_early"):
        return "stopped early"
    return "stopped" if summary.get("stop_reason") == "interrupted" else "finished"


def _best(
    config: dict[str, Any], snapshot: dict[str, Any], rows: list[dict[str, str]]
) -> tuple[str | None, float | None]:
    """The best value of checkpoint.metric (train_loss where no value of it was logged, as
    with no data.val): among the checkpoints Ray Train kept, which hold the best one, else
    among metrics.csv's rows."""
    checkpoint = config.get("checkpoint") or {}
    metric = checkpoint.get("metric") or "val_loss"
    kept = [r.get("metrics") or {} for r in snapshot.get("checkpoint_results") or []]
    for name in dict.fromkeys((metric, "train_loss")):
        mode = checkpoint.get("mode") if name == metric else "min"  # checkpoint.mode
        auto = "max" if name == "val_accuracy" else "min"
        pick = max if (mode if mode in ("min", "max") else auto) == "max" else min
        for source in (kept, rows):
            values = [v for v in (_number(m.get(name)) for m in source) if v is not None]
            if values:
                return name, pick(values)
    return None, None


def latest_checkpoint(
    run_dir: Location,
    entries: dict[str, pafs.FileInfo] | None = None,
    snapshot: dict[str, Any] | None = None,
) -> tuple[Location | None, int | None]:
    """The newest complete checkpoint of a run and its step, whichever launcher wrote it: the
    newer by step of the one Ray Train registered last (a checkpoint still uploading is not
    registered yet; Ray's where both have the same step) and raymb's own newest (a `--local`
    segment's). For a run with neither and without Ray's record, the newest checkpoint_*
    directory holding model.pt and state.pt (Ray names them by time). `entries` and
    `snapshot`: the run directory's listing and Ray's record, when the caller has them."""
    if entries is None:
        entries = run_dir.listing()
    if snapshot is None:
        snapshot = _read_json(run_dir / SNAPSHOT_FILE) if SNAPSHOT_FILE in entries else {}
    own = _own_checkpoints(run_dir, entries)
    newest = own[-1] if own else None
    latest = snapshot.get("latest_checkpoint_result") or {}
    if latest.get("checkpoint_dir_name"):
        ray = _by_ray(run_dir, latest)
        if newest is None or _step_key(ray) >= _step_key(newest):
            newest = ray
    if newest is not None:
        return newest.location, newest.step
    if snapshot:
        return None, None
    names = sorted(
        (
            n
            for n, i in entries.items()
            if n.startswith("checkpoint_") and i.type == pafs.FileType.Directory
        ),
        reverse=True,
    )
    for name in names:
        if {"model.pt", "state.pt"} <= set((run_dir / name).listing()):
            return run_dir / name, None
    return None, None


@dataclass(frozen=True)
class Saved:
    """A complete checkpoint of a run, whichever launcher wrote it: `path` (on its
    filesystem) and `metrics` are what Ray Train's Result gives of one."""

    location: Location
    step: int | None
    metrics: dict[str, Any]
    by_ray: bool
    """Registered by Ray Train (named by time); else raymb's own (a TorchSession's)."""

    @property
    def path(self) -> str:
        return self.location.path


def saved_checkpoints(run_dir: Location | str | Path) -> list[Saved]:
    """The run's complete checkpoints, oldest step first: raymb's own (a folder
    checkpoint_<step> holding .complete) and those in Ray Train's snapshot whose folder is
    there. No torch: the driver lists them too."""
    run_dir = run_dir if isinstance(run_dir, Location) else resolve(str(run_dir))
    entries = run_dir.listing()
    found = _own_checkpoints(run_dir, entries)
    if SNAPSHOT_FILE in entries:
        snapshot = _read_json(run_dir / SNAPSHOT_FILE)
        results = list(snapshot.get("checkpoint_results") or [])
        results.append(snapshot.get("latest_checkpoint_result") or {})
        seen = set()
        for result in results:
            name = result.get("checkpoint_dir_name")
            if name and name not in seen and name in entries:
                seen.add(name)
                found.append(_by_ray(run_dir, result))
    return sorted(found, key=_step_key)


def newest_checkpoint(
    run_dir: Location | str | Path, *, by_ray: bool | None = None
) -> Saved | None:
    """The run's checkpoint of the highest step (Ray Train's where raymb's own has the same
    step: they hold the same state), or None; `by_ray`: only Ray Train's (True) or only
    raymb's own (False)."""
    found = [c for c in saved_checkpoints(run_dir) if by_ray is None or c.by_ray == by_ray]
    return found[-1] if found else None


def _own_checkpoints(run_dir: Location, entries: dict[str, pafs.FileInfo]) -> list[Saved]:
    """raymb's own complete checkpoints in the listing `entries`, oldest step first."""
    found: list[Saved] = []
    for name in entries:
        match = OWN_NAME.fullmatch(name)
        if match is None or COMPLETE not in (run_dir / name).listing():
            continue
        try:
            metrics = json.loads((run_dir / name / COMPLETE).read_text() or "{}")
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            continue  # pruned meanwhile, or a marker being written
        step = int(match.group(1))
        found.append(Saved(run_dir / name, step, {**metrics, "step": step}, by_ray=False))
    return sorted(found, key=_step_key)


def _by_ray(run_dir: Location, result: dict[str, Any]) -> Saved:
    """A checkpoint of Ray Train's snapshot (`result`: one of its checkpoint results)."""
    metrics = dict(result.get("metrics") or {})
    step = metrics.get("step")
    step = int(step) if isinstance(step, int | float) and math.isfinite(step) else None
    return Saved(run_dir / result["checkpoint_dir_name"], step, metrics, by_ray=True)


def _step_key(saved: Saved) -> tuple[int, bool]:
    """Oldest first; at one step raymb's own before Ray Train's."""
    return (-1 if saved.step is None else saved.step, saved.by_ray)


def _wall(
    status: str, record: dict[str, Any], summary: dict[str, Any], updated: float | None
) -> float | None:
    """summary.json's wall_s for a run that ended with one; else from its start to its last
    write (the current attempt, for a resumed run)."""
    wall = _number(summary.get("wall_s"))
    if wall is not None and status in ("finished", "stopped early", "stopped"):
        return wall
    started = _number(record.get("started"))
    if started is not None and updated is not None:
        return max(0.0, updated - started)
    return wall


def _number(value: Any) -> float | None:
    """A finite number from JSON or CSV text; None for empty, null or not a number."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number and abs(number) != float("inf") else None
