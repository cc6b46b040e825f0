"""The one seam between raymb's worker loops and the runtime that started the workers.

The loops (raymb.worker.epochs, raymb.worker.follow) and the Worker they drive ask a
`Session` for their rank, world size and device, for the run's latest checkpoint, and hand it
each report. Two sessions implement it:

- `RaySession`: inside a Ray Train worker (what `raymb train` runs). Reports and checkpoints
  go through `ray.train.report`; Ray Train keeps, scores and uploads the checkpoints.
- `TorchSession`: on a plain `torch.distributed` process group (gloo or NCCL), started by
  `torch.multiprocessing` (the driver's `run_torch`, raymb.driver.launch) or torchrun, with
  no Ray installed. Each report with a checkpoint becomes `<run_dir>/checkpoint_<step>/`,
  written by every rank into the same directory and marked complete by rank 0 after a
  barrier. It serves the numerics tests and the GPU checks: they drive the real loop, not a
  copy of it.

Only this module and raymb.worker.feed (Ray Data) import Ray on the worker side, and only
when a RaySession is made or a stream read.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

COMPLETE = ".complete"
"""TorchSession: in a checkpoint directory once every rank's files are in it."""


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
    """Inside a Ray Train worker."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    @contextmanager
    def restored(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

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


@dataclass
class TorchSession:
    """On the default torch.distributed process group (or alone, without one)."""

    run_dir: Path
    device: torch.device = field(default_factory=lambda: _default_device())
    reports: list[dict[str, Any]] = field(default_factory=list)
    """Every report's metrics, in order (what Ray Train's result would hold)."""

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        grouped = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if grouped else 0
        self.world = dist.get_world_size() if grouped else 1

    @contextmanager
    def restored(self) -> Iterator[Path | None]:
        yield self.latest()

    def latest(self) -> Path | None:
        """The newest complete checkpoint directory of the run, by step."""
        done = sorted(self.run_dir.glob(f"checkpoint_*/{COMPLETE}"))
        return done[-1].parent if done else None

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
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
                (target / COMPLETE).touch()
        self._barrier()
        self.reports.append(dict(metrics))

    def node_id(self) -> str:
        return socket.gethostname()

    def fetch(self, blocks: list) -> list:
        return list(blocks)

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
