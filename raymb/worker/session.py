"""The one seam between raymb's worker loops and the runtime that started the workers.

The loops (raymb.worker.epochs, raymb.worker.follow) and the Worker they drive ask a
`Session` for their rank, world size and device, for the run's latest checkpoint, and hand it
each report. Two sessions implement it:

- `RaySession`: inside a Ray Train worker (what `raymb train` runs). Reports and checkpoints
  go through `ray.train.report`; Ray Train keeps, scores and uploads the checkpoints.
- `TorchSession`: on a plain `torch.distributed` process group (gloo or NCCL), started by
  `torch.multiprocessing` (the driver's `run_torch`, raymb.driver.launch: `raymb train
  --local`) or torchrun, with no Ray installed. Each report with a checkpoint becomes
  `<run_dir>/checkpoint_<step>/`, written by every rank into the same directory and marked
  complete by rank 0 after a barrier (its `.complete` holds the report's metrics); rank 0
  then prunes them as Ray Train does (`keep`: the best by `metric`, and the latest).

One run, either launcher: each session resumes from the newest checkpoint of the run by
step, whichever wrote it (`saved_checkpoints`: raymb's own `checkpoint_<step>/` folders and
the ones Ray Train registered in its snapshot file). Each prunes only its own checkpoints.

Only this module and raymb.worker.feed (Ray Data) import Ray on the worker side, and only
when a RaySession is made or a stream read; torch is imported when a session is made, so
the driver may list a run's checkpoints (`saved_checkpoints`) without it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from raymb.storage import Location, resolve

if TYPE_CHECKING:
    import torch

COMPLETE = ".complete"
"""TorchSession: in a checkpoint directory once every rank's files are in it; it holds the
report's metrics as JSON (empty in checkpoints from before cross-launcher resumes)."""
OWN_NAME = re.compile(r"checkpoint_(\d{8,})")
"""A TorchSession's checkpoint folder: checkpoint_<step, 8 digits or more>. Ray Train's are
checkpoint_<date and time>."""
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Ray Train's record of the checkpoints it registered (raymb.rundir.runs.SNAPSHOT_FILE)."""
STATE_FILE = "state.pt"  # raymb.rundir.checkpoint.STATE_FILE


class Session(Protocol):
    rank: int
    world: int
    device: torch.device

    def restored(self) -> Any:
        """A context manager yielding the latest checkpoint's directory, or None."""

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        """A collective: every rank reports the same number of times; `checkpoint` is this
        rank's directory of files to keep (or None)."""

    def node_id(self) -> str:
        """The node this worker runs on (workers on one node share it)."""

    def fetch(self, blocks: list) -> list:
        """A cached dataset's blocks as pyarrow Tables (Ray: object refs; torch: tables)."""


@dataclass(frozen=True)
class Saved:
    """A complete checkpoint of a run, whichever launcher wrote it: `path` (on its
    filesystem) and `metrics` are what Ray Train's Result gives of one."""

    location: Location
    step: int | None
    metrics: dict[str, Any]
    by_ray: bool
    """Registered by Ray Train (named by time); else written by a TorchSession."""

    @property
    def path(self) -> str:
        return self.location.path


def saved_checkpoints(run_dir: Location | str | Path) -> list[Saved]:
    """The run's complete checkpoints, oldest step first: a TorchSession's (a folder
    checkpoint_<step> holding .complete) and those in Ray Train's snapshot whose folder is
    there. No torch: the driver lists them too."""
    run_dir = run_dir if isinstance(run_dir, Location) else resolve(str(run_dir))
    entries = run_dir.listing()
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
    if RAY_SNAPSHOT in entries:
        try:
            snapshot = json.loads((run_dir / RAY_SNAPSHOT).read_text())
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            snapshot = {}
        results = list(snapshot.get("checkpoint_results") or [])
        results.append(snapshot.get("latest_checkpoint_result") or {})
        seen = set()
        for result in results:
            name = result.get("checkpoint_dir_name")
            if not name or name in seen or name not in entries:
                continue
            seen.add(name)
            metrics = dict(result.get("metrics") or {})
            step = metrics.get("step")
            step = int(step) if isinstance(step, int | float) and math.isfinite(step) else None
            found.append(Saved(run_dir / name, step, metrics, by_ray=True))
    return sorted(found, key=lambda c: (-1 if c.step is None else c.step, c.by_ray))


def newest_checkpoint(run_dir: Location | str | Path, *, by_ray: bool | None = None):
    """The run's checkpoint of the highest step (a TorchSession's where Ray's has the same
    step: they hold the same state), or None; `by_ray`: only Ray Train's (True) or only a
    TorchSession's (False)."""
    found = [c for c in saved_checkpoints(run_dir) if by_ray is None or c.by_ray == by_ray]
    return found[-1] if found else None


class RaySession:
    """Inside a Ray Train worker. `run_dir`: the run directory (unset: Ray Train's, from its
    storage context), where a run trained with `--local` keeps its own checkpoints."""

    def __init__(self, run_dir: Location | None = None) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run_dir = run_dir

    @contextmanager
    def restored(self) -> Iterator[Path | None]:
        """The newer (by the step in its state.pt) of Ray Train's latest checkpoint and the
        run directory's newest TorchSession checkpoint (a run trained with --local)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        own = newest_checkpoint(self._run_dir(), by_ray=False)
        with tempfile.TemporaryDirectory(prefix="raymb-restore-") as tmp:
            if checkpoint is not None:
                with checkpoint.as_directory() as directory:
                    if own is None or _step_of(Path(directory)) >= (own.step or 0):
                        yield Path(directory)
                        return
            yield None if own is None else own.location.fetch(Path(tmp))

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        import ray.train

        kept = ray.train.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None
        ray.train.report(metrics, checkpoint=kept)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def fetch(self, blocks: list) -> list:
        import ray

        return ray.get(list(blocks))

    def _run_dir(self) -> Location:
        if self.run_dir is None:
            import pyarrow.fs as pafs
            import ray.train

            storage = ray.train.get_context().get_storage()  # a DeveloperAPI of Ray Train
            fs, path = storage.storage_filesystem, storage.experiment_fs_path
            if isinstance(fs, pafs.LocalFileSystem):
                self.run_dir = Location(fs, path, path)
            else:
                self.run_dir = Location(fs, path, f"{fs.type_name}://{path}")
        return self.run_dir


def _step_of(directory: Path) -> int:
    """The step a checkpoint was taken after, as its state.pt records it."""
    from raymb.rundir.checkpoint import read

    return int(read(directory / STATE_FILE)["progress"]["step"])


@dataclass
class TorchSession:
    """On the default torch.distributed process group (or alone, without one). `keep`,
    `metric`, `mode`: checkpoint.keep, .metric and .mode, as Ray Train prunes (None: keep
    every checkpoint)."""

    run_dir: Path
    device: torch.device = field(default_factory=lambda: _default_device())
    reports: list[dict[str, Any]] = field(default_factory=list)
    """Every report's metrics, in order (what Ray Train's result would hold)."""
    keep: int | None = None
    metric: str = "val_loss"
    mode: str = "min"

    def __post_init__(self) -> None:
        import torch.distributed as dist

        self.run_dir = Path(self.run_dir)
        grouped = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if grouped else 0
        self.world = dist.get_world_size() if grouped else 1

    @contextmanager
    def restored(self) -> Iterator[Path | None]:
        yield self.latest()

    def latest(self) -> Path | None:
        """The newest complete checkpoint directory of the run, by step: this session's kind,
        or one Ray Train registered (a run trained on Ray before)."""
        newest = newest_checkpoint(self.run_dir)
        return None if newest is None else Path(newest.path)

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        import torch
        import torch.distributed as dist

        has = torch.tensor([int(checkpoint is not None)])
        if self.world > 1:
            dist.all_reduce(has)  # every rank saves at the same steps; check it
        if has.item() not in (0, self.world):
            raise RuntimeError("ranks disagree on whether this report has a checkpoint")
        if checkpoint is not None:
            target = self.run_dir / f"checkpoint_{int(metrics['step']):08d}"
            if self.rank == 0:
                (target / COMPLETE).unlink(missing_ok=True)  # a resumed run saves it again
                target.mkdir(parents=True, exist_ok=True)
            self._barrier()
            for file in Path(checkpoint).iterdir():
                shutil.copy2(file, target / file.name)
            self._barrier()
            if self.rank == 0:
                marker = json.dumps(metrics, default=str)
                _write_atomic(target / COMPLETE, marker)
                self._prune(target)
        self._barrier()
        self.reports.append(dict(metrics))

    def node_id(self) -> str:
        return socket.gethostname()

    def fetch(self, blocks: list) -> list:
        return list(blocks)

    def _prune(self, latest: Path) -> None:
        """Rank 0: delete this session's kind of checkpoints beyond `keep`, the worst by
        `metric` first (one without it, or NaN, is the worst; ties: the older), never the
        latest; as Ray Train's CheckpointManager does with its own."""
        if self.keep is None:
            return
        own = [c for c in saved_checkpoints(self.run_dir) if not c.by_ray]
        sign = -1.0 if self.mode == "min" else 1.0

        def score(c: Saved) -> tuple:
            value = c.metrics.get(self.metric)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or math.isnan(value):
                return (False, -math.inf, c.step or 0)
            return (True, sign * value, c.step or 0)

        ranked = sorted(own, key=score)  # worst first
        for c in ranked[: max(0, len(ranked) - self.keep)]:
            if Path(c.path) != latest:
                shutil.rmtree(c.path, ignore_errors=True)

    def _barrier(self) -> None:
        import torch.distributed as dist

        if self.world > 1:
            dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    temp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temp.write_text(text)
    os.replace(temp, path)


def _default_device() -> torch.device:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
