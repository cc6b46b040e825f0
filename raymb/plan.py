"""The step plan: how a worker's shard of an epoch divides into steps and microbatches.

Every worker trains on the same number of rows an epoch (raymb.order takes W·⌊N/W⌋ rows of
each epoch's order), so every worker can work out the size of each step, the short last one
included, without communicating.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from raymb.columns import Inputs
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
    """Classes, the vocabulary (lm), or 1 (regression)."""
    classify: bool
    inputs: dict
    """raymb.columns.Inputs, as a dict: the task, the rows' shape, the collate's scaling."""

    @classmethod
    def build(cls, config: Config, *, num_rows: int, inputs: Inputs, out_features: int) -> Plan:
        if ":" in config.model.name:
            # Import the user's model factory now: a typo costs one line, not a Ray start.
            # (Imported here: the plan itself needs no torch.)
            from raymb.models import load_factory

            load_factory(config.model.name)
        W = config.scale.workers
        G = config.train.global_batch_size
        rows = num_rows // W
        if rows == 0:
            raise DataError(
                f"data.train has {num_rows} rows, fewer than scale.workers={W}: lower scale.workers"
            )
        m = config.microbatch()
        if m is None:  # train.microbatch_size = "auto"
            m = auto_microbatch(config, rows, inputs, out_features)
        if m > rows:
            raise DataError(
                f"train.microbatch_size={m} is larger than a worker's shard of data.train "
                f"({rows} rows = {num_rows} rows // {W} workers): lower train.microbatch_size "
                "or scale.workers"
            )
        step_rows = rows if G == "all" else G // W
        if step_rows > rows:
            raise DataError(
                f"train.global_batch_size={G} needs {step_rows} rows per worker per step, "
                f"but each of the {W} workers gets {rows} rows of data.train: lower "
                "train.global_batch_size or scale.workers"
            )
        return cls(
            workers=W,
            rows_per_worker=rows,
            microbatch=m,
            step_rows=step_rows,
            epochs=config.train.epochs,
            max_steps=config.train.max_steps,
            in_features=inputs.in_features,
            out_features=out_features,
            classify=inputs.task != "regress",
            inputs=inputs.to_dict(),
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


def activation_bytes_per_sample(config: Config, inputs: Inputs, out_features: int) -> int:
    """Estimated training memory one sample costs: every module's output kept for the
    backward pass, and its gradient, in float32 (measured on a 2-row probe forward)."""
    import torch

    from raymb.models import build_model

    shape = inputs.model_shape
    model = build_model(config.model, shape, out_features)
    elements = [math.prod(shape)]

    def count(module, inputs, output) -> None:
        if torch.is_tensor(output):
            elements.append(output[0].numel())

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    probe = torch.zeros(2, *shape, dtype=torch.long if inputs.task == "lm" else torch.float32)
    with torch.no_grad():
        model(probe)
    for hook in hooks:
        hook.remove()
    return 2 * 4 * sum(elements)


def auto_microbatch(config: Config, rows: int, inputs: Inputs, out_features: int) -> int:
    """train.microbatch_size = "auto" on a CPU: the largest m whose activations fit
    train.memory_budget and that keeps the step exact (k = G / (W·m) whole)."""
    fits = max(
        1,
        config.train.memory_budget_bytes()
        // activation_bytes_per_sample(config, inputs, out_features),
    )
    G = config.train.global_batch_size
    if G == "all":
        return min(rows, fits)
    per_worker = G // config.scale.workers
    return max(d for d in range(1, per_worker + 1) if per_worker % d == 0 and d <= fits)
