"""The step plan: how an epoch divides into steps, each step among the workers, and each
worker's rows into microbatches.

Every epoch trains on all N rows of data.train in steps of G rows (the whole set for full
batch; the last step may be short); worker r of W takes the r-th of W near-equal slices of
each step (raymb.core.order). Which rows a step takes never depends on W, so a run resumed with
another number of workers continues exactly. Every worker works out every step's sizes
without communicating.

Arithmetic only: the microbatch size comes in as a number (train.microbatch_size, or the one
raymb.driver.sizing measures for "auto"), and nothing here builds a model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from raymb.config import Config
from raymb.core.order import rank_rows
from raymb.core.shape import InputShape
from raymb.errors import DataError


@dataclass(frozen=True, kw_only=True)
class Plan:
    workers: int
    num_rows: int
    """N: rows an epoch trains on (all of data.train)."""
    step_total: int
    """G: rows of a full step on all workers (N for full batch)."""
    microbatch: int
    """m: rows per forward/backward; a worker's rows of a step are cut into microbatches of
    m, the last short (raymb.worker.epochs.StepBatches): exact whatever the split."""
    epochs: int
    max_steps: int | None
    out_features: int
    """Classes, the vocabulary (lm), or 1 (regression)."""
    inputs: dict
    """raymb.core.shape.InputShape in its stored form (to_dict): the task, the rows' shape,
    the collate's scaling."""

    @classmethod
    def build(
        cls,
        config: Config,
        *,
        num_rows: int,
        inputs: InputShape,
        out_features: int,
        microbatch: int,
    ) -> Plan:
        """The plan of `num_rows` rows in microbatches of `microbatch` rows (m, as
        raymb.driver.sizing.microbatch_size resolved it); a refusal is one line."""
        W = config.scale.max_workers  # elastic: the loop takes the size Ray Train gave it
        G = config.train.global_batch_size
        rows = num_rows // W
        if rows == 0:
            raise DataError(
                f"data.train has {num_rows} rows, fewer than scale.workers={W}: lower scale.workers"
            )
        m, shard = microbatch, -(-num_rows // W)  # a worker's most rows of data.train
        if m > shard:
            raise DataError(
                f"train.microbatch_size={m} is larger than a worker's shard of data.train "
                f"({shard} rows = {num_rows} rows / {W} workers, rounded up): lower "
                "train.microbatch_size or scale.workers"
            )
        if G != "all" and G > num_rows:
            raise DataError(
                f"train.global_batch_size={G} needs {G // W} rows per worker per step, "
                f"but each of the {W} workers gets {rows} rows of data.train: lower "
                "train.global_batch_size or scale.workers"
            )
        return cls(
            workers=W,
            num_rows=num_rows,
            step_total=num_rows if G == "all" else G,
            microbatch=m,
            epochs=config.train.epochs,
            max_steps=config.train.max_steps,
            out_features=out_features,
            inputs=inputs.to_dict(),
        )

    @property
    def input_shape(self) -> InputShape:
        return InputShape.from_dict(self.inputs)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_rows / self.step_total)

    @property
    def total_steps(self) -> int:
        steps = self.steps_per_epoch * self.epochs
        return steps if self.max_steps is None else min(steps, self.max_steps)

    def step_rows(self, step_in_epoch: int) -> int:
        """Rows of step `step_in_epoch` on all workers (the last may be short)."""
        return min(self.step_total, self.num_rows - step_in_epoch * self.step_total)

    def rows_in_step(self, step_in_epoch: int, rank: int) -> int:
        """Rows worker `rank` trains on in the step (the workers' differ by at most one)."""
        part = rank_rows(0, self.step_rows(step_in_epoch), self.workers, rank)
        return part.stop - part.start

    def even(self, step_in_epoch: int) -> bool:
        """Whether every worker has the same rows in the step (else the loss divisor, the
        step's rows, is all-reduced)."""
        return self.step_rows(step_in_epoch) % self.workers == 0

    def for_world(self, world: int) -> Plan:
        """The plan on the `world` workers Ray Train started (elastic scale.workers)."""
        return self if world == self.workers else replace(self, workers=world)

    def to_dict(self) -> dict:
        return asdict(self)
