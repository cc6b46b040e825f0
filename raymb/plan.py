"""The step plan: how a worker's shard of an epoch divides into steps and microbatches.

Ray Train gives every worker the same number of rows (streaming_split with equal=True drops
fewer than W leftover rows), so every worker can work out the size of each step, the short
last one included, without communicating.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from raymb.config import Config
from raymb.errors import DataError


@dataclass(frozen=True, kw_only=True)
class Plan:
    workers: int
    rows_per_worker: int
    """Training rows each worker sees per epoch."""
    microbatch: int
    """m: rows per forward/backward."""
    step_rows: int
    """Rows per worker in a full step (k·m; the whole shard for full batch)."""
    epochs: int
    max_steps: int | None
    in_features: int
    out_features: int
    classify: bool

    @classmethod
    def build(
        cls, config: Config, *, num_rows: int, in_features: int, num_classes: int | None
    ) -> Plan:
        W = config.scale.workers
        rows = num_rows // W
        if rows == 0:
            raise DataError(
                f"data.train has {num_rows} rows, fewer than scale.workers={W}: lower scale.workers"
            )
        m = config.microbatch()
        step_rows = (
            rows if config.train.global_batch_size == "all" else config.accumulation_steps() * m
        )
        if config.train.global_batch_size == "all":
            if m > rows:
                raise DataError(
                    f"train.microbatch_size={m} is larger than a worker's shard of data.train "
                    f"({rows} rows = {num_rows} rows / {W} workers)"
                )
        elif step_rows > rows:
            raise DataError(
                f"train.global_batch_size={config.train.global_batch_size} needs {step_rows} rows "
                f"per worker per step, but each of the {W} workers gets {rows} rows of data.train"
            )
        classify = num_classes is not None
        return cls(
            workers=W,
            rows_per_worker=rows,
            microbatch=m,
            step_rows=step_rows,
            epochs=config.train.epochs,
            max_steps=config.train.max_steps,
            in_features=in_features,
            out_features=num_classes if classify else 1,
            classify=classify,
        )

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.rows_per_worker / self.step_rows)

    @property
    def total_steps(self) -> int:
        steps = self.steps_per_epoch * self.epochs
        return steps if self.max_steps is None else min(steps, self.max_steps)

    def rows_in_step(self, step_in_epoch: int) -> int:
        """Rows this worker trains on in step `step_in_epoch` (the last may be short)."""
        return min(self.step_rows, self.rows_per_worker - step_in_epoch * self.step_rows)

    def microbatches_in_step(self, step_in_epoch: int) -> int:
        return math.ceil(self.rows_in_step(step_in_epoch) / self.microbatch)

    def to_dict(self) -> dict:
        return asdict(self)
