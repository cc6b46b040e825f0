"""fault.* (docs/runs.md, Drills): a worker killed, or a loss made non-finite, at a step, for
tests and rehearsals. `with_drills` installs them around the epoch loop's step batches when
the config asks for one on this rank, so the loop itself holds none of them.

Each fault fires once per run directory (a marker file records it), so the replacement worker
trains on. A real kill can also lose the newest checkpoint if Ray Train's controller had not
taken its report yet; the run then resumes, just as exactly, from the one before."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from raymb.config import FaultSection
from raymb.storage import Location
from raymb.worker.worker import POLL_ENV

if TYPE_CHECKING:
    from raymb.worker.checkpointer import Progress

StepBatchesFn = Callable[..., tuple[list, object]]


def with_drills(
    batches: StepBatchesFn, fault: FaultSection, run_dir: Location, rank: int, progress: Progress
) -> StepBatchesFn:
    """`batches` (raymb.worker.epochs.StepBatches), with the drills fault.* sets for this
    rank fired on the microbatches of the step about to be taken; `batches` itself when none."""
    if rank != fault.rank or (fault.kill_worker_at_step is None and fault.nan_at_step is None):
        return batches
    drills = Drills(fault, run_dir, rank)

    def drilled(batch, step_in_epoch: int, epoch: int):
        microbatches, keys = batches(batch, step_in_epoch, epoch)
        drills.before_step(progress.step + 1, microbatches)
        return microbatches, keys

    return drilled


class Drills:
    def __init__(self, fault: FaultSection, run_dir: Location, rank: int) -> None:
        self.fault, self.run_dir, self.rank = fault, run_dir, rank

    def before_step(self, step: int, microbatches: list) -> None:
        if step == self.fault.kill_worker_at_step and self._first(f"kill-at-step-{step}"):
            # A report waits in a queue until Ray Train's controller polls the workers; give
            # it time to take the latest checkpoint, so the drill resumes from a known step.
            time.sleep(fault_wait_s())
            print(f"raymb: fault.kill_worker_at_step={step}: killing rank {self.rank}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.fault.nan_at_step and self._first(f"nan-at-step-{step}"):
            x, y = microbatches[0]
            microbatches[0] = (x * float("nan"), y)

    def _first(self, name: str) -> bool:
        marker = self.run_dir / f".fault-{name}"
        if not marker.local:  # one rank fires a fault: no race to lose
            if marker.exists():
                return False
            marker.write_bytes(b"")
            return True
        try:
            Path(marker).touch(exist_ok=False)
            return True
        except FileExistsError:
            return False


def fault_wait_s() -> float:
    """Long enough for Ray Train's controller to take the latest report."""
    return 5 * float(os.environ.get(POLL_ENV, 2.0))
