"""The step plan: how an epoch divides into steps, each step among the workers, and each
worker's rows into microbatches.

Every epoch trains on all N rows of data.train in steps of G rows (the whole set for full
batch; the last step may be short); worker r of W takes the r-th of W near-equal slices of
each step (raymb.core.order). Which rows a step takes never depends on W, so a run resumed with
another number of workers continues exactly. Every worker works out every step's sizes
without communicating.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from raymb.config import Config
from raymb.core.order import rank_rows
from raymb.data.columns import Inputs
from raymb.errors import DataError


@dataclass(frozen=True, kw_only=True)
class Plan:
    workers: int
    num_rows: int
    """N: rows an epoch trains on (all of data.train)."""
    step_total: int
    """G: rows of a full step on all workers (N for full batch)."""
    microbatch: int
    """m: rows per forward/backward."""
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
        W = config.scale.max_workers  # elastic: the loop takes the size Ray Train gave it
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
            in_features=inputs.in_features,
            out_features=out_features,
            classify=inputs.task != "regress",
            inputs=inputs.to_dict(),
        )

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
    per_worker = G // config.scale.max_workers
    return max(d for d in range(1, per_worker + 1) if per_worker % d == 0 and d <= fits)
