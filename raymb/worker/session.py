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
step, whichever wrote it (raymb.rundir.runs.saved_checkpoints: raymb's own
`checkpoint_<step>/` folders and the ones Ray Train registered in its snapshot file). Each
prunes only its own checkpoints.

Only this module and raymb.worker.feed (Ray Data) import Ray on the worker side, and only
when a RaySession is made or a stream read; torch is imported when a session is made.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from raymb.rundir.runs import COMPLETE, Saved, newest_checkpoint, saved_checkpoints
from raymb.storage import Location

if TYPE_CHECKING:
    import torch

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


class RaySession:
    """Inside a Ray Train worker. `run_dir`: the run directory (the spec's; Ray Train's
    storage too), where a run trained with `--local` keeps its own checkpoints."""

    def __init__(self, run_dir: Location) -> None:
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
        own = newest_checkpoint(self.run_dir, by_ray=False)
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
