"""What stops a run before its end: the driver's stop request, a non-finite loss
(train.on_nan = "abort"), and early stopping (train.early_stopping). The loops ask these
objects; the workers learn of each at the same step, so all stop together."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from raymb.config import Config
from raymb.storage import Location

if TYPE_CHECKING:
    from raymb.worker.checkpointer import Progress

STOP_FILE = "STOP"
"""In the run directory: the driver writes it on the first Ctrl-C or SIGTERM (anyone may touch
it); the workers then checkpoint at the next step (epochs) or after the file in hand
(--follow) and return."""
STOP_LOOK_S = {True: 0.5, False: 5.0}
"""How often rank 0 looks for the stop file, locally and in an object store (a request)."""


class StopRequest:
    """The driver's request to stop, and the abort on a non-finite loss, as the gathers of
    the losses (raymb.worker.metrics.Ledger.gather) bring them: rank 0's look for the stop
    file rides on the gather's all-reduce, so there is no collective of its own."""

    def __init__(
        self,
        stop_file: Location | None,
        rank: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`stop_file`: where rank 0 looks (None: nowhere, as under --follow, whose loop
        looks itself between files)."""
        self.stop_file, self.rank, self.clock = stop_file, rank, clock
        self.requested = False
        """The driver asked to stop: every worker learns it at the same gather."""
        self._looked = -float("inf")

    def look(self) -> bool:
        """Rank 0: whether the stop file is there, looked for at most every STOP_LOOK_S."""
        if self.stop_file is None or self.rank != 0:
            return False
        now = self.clock()
        if now - self._looked < STOP_LOOK_S[self.stop_file.local]:
            return False
        self._looked = now
        return self.stop_file.exists()

    def heard(self, bad_step: int | None, asked: bool) -> None:
        """What a gather brought: the first step whose loss is not finite (it aborts the run:
        the last checkpoint is intact), and whether rank 0 saw the stop file."""
        self.requested = self.requested or asked
        if bad_step is not None:
            raise FloatingPointError(
                f"raymb: non-finite loss or gradient at step {bad_step}; the last checkpoint is "
                "intact. Set train.on_nan=skip to drop such steps"
            )


class EarlyStopper:
    """train.early_stopping: counts checkpoints without an improvement of checkpoint.metric
    by more than min_delta, and stops after `patience` of them (never when it is unset). Its
    counters are Progress's, so a checkpoint carries them; every worker sees the same
    all-reduced metrics, so all stop together."""

    def __init__(
        self, metric: str, mode: str, patience: int | None, min_delta: float = 0.0
    ) -> None:
        self.metric, self.patience, self.min_delta = metric, patience, min_delta
        self.sign = 1.0 if mode == "min" else -1.0

    @classmethod
    def of(cls, config: Config) -> EarlyStopper:
        rule = config.train.early_stopping
        return cls(config.checkpoint.metric, config.checkpoint.order, rule.patience, rule.min_delta)

    def update(self, progress: Progress, metrics: dict[str, Any]) -> None:
        """At a checkpoint: count it, and mark its metrics stopped_early if this is the last."""
        if self.patience is None:
            return
        value = metrics.get(self.metric)
        if value is not None:
            if progress.best is None or self.sign * (progress.best - value) > self.min_delta:
                progress.best, progress.since_best = value, 0
            else:
                progress.since_best += 1
                progress.stopped_early = progress.since_best >= self.patience
        metrics["stopped_early"] = progress.stopped_early
