"""Where a worker's steps come from: whole steps of rows, in the order of raymb.order.

Two sources, one interface (`steps(epoch, start)` yields this worker's (x, y) for each step
of an epoch from step `start` on):

- Cached (data.cache): the driver reads the set once with Ray Data and materializes it in
  the object store; each worker fetches the blocks once, keeps them as tensors, and gathers
  each step's rows by index. Later epochs cost nothing but the gather.
- Streamed: every epoch each worker streams the files with Ray Data in the epoch's file
  order (and, for shuffle "rows", through a seeded shuffle buffer), in batches of one whole
  step of every worker's rows, and keeps its own slice. Every worker reads the same stream,
  so which rows it trains on never depends on how Ray Data handed out blocks.

The validation set is split rank::W, so every row is evaluated once across the workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import ray
import ray.data
import torch

from raymb.columns import table_to_tensors
from raymb.order import _epoch_seed, epoch_order, rank_rows, worker_rows
from raymb.plan import Plan

Batch = tuple[torch.Tensor, torch.Tensor]


class CachedSource:
    """The whole set as tensors in this worker; each step is an index gather."""

    def __init__(self, spec: dict[str, Any], features, label, plan: Plan, rank: int, world: int):
        self.x, self.y = _tensors(spec["refs"], features, label)
        self.file_rows = spec["file_rows"]
        self.shuffle, self.seed = spec["shuffle"], spec["seed"]
        self.plan, self.rank, self.world = plan, rank, world

    def steps(self, epoch: int, start: int) -> Iterator[Batch]:
        order = epoch_order(self.shuffle, self.seed, epoch, self.file_rows)
        plan = self.plan
        for s in range(start, plan.steps_per_epoch):
            rows = worker_rows(
                order, s, plan.step_rows, plan.rows_in_step(s), self.rank, self.world
            )
            yield self.x[rows], self.y[rows]


class StreamedSource:
    """Ray Data reads every epoch; this worker keeps its slice of each step's rows."""

    def __init__(self, spec: dict[str, Any], features, label, plan: Plan, rank: int, world: int):
        self.spec, self.features, self.label = spec, features, label
        self.plan, self.rank, self.world = plan, rank, world

    def steps(self, epoch: int, start: int) -> Iterator[Batch]:
        spec, plan = self.spec, self.plan
        files = list(spec["files"])
        if spec["shuffle"] != "none":
            order = epoch_order("files", spec["seed"], epoch, [1] * len(files)).tolist()
            files = [files[i] for i in order]
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        dataset = ray.data.read_parquet(
            files, filesystem=spec["filesystem"], override_num_blocks=len(files)
        )
        dataset = dataset.select_columns(spec["columns"])
        shuffle = {}
        if spec["shuffle"] == "rows":
            shuffle = dict(
                local_shuffle_buffer_size=spec["shuffle_buffer"],
                local_shuffle_seed=_epoch_seed(spec["seed"], epoch) % 2**32,
            )
        batches = dataset.iter_batches(
            batch_size=plan.step_rows * self.world,
            batch_format="pyarrow",
            prefetch_batches=1,
            **shuffle,
        )
        for s, table in enumerate(batches):
            if s >= plan.steps_per_epoch:
                break  # the fewer than W rows no worker trains on this epoch
            if s < start:
                continue  # trained on before the resume
            rows = plan.rows_in_step(s)
            part = table.slice(self.rank * rows, rows)
            yield table_to_tensors(part, self.features, self.label)


def train_source(spec: dict[str, Any], features, label, plan: Plan, rank: int, world: int):
    kind = CachedSource if spec["cached"] else StreamedSource
    return kind(spec, features, label, plan, rank, world)


def val_batches(
    spec: dict[str, Any] | None, features, label, rank: int, world: int, rows: int
) -> Iterator[Batch] | list[Batch] | None:
    """This worker's part of data.val: cached batches (a list, reusable), or a function of
    nothing that streams them again."""
    if spec is None:
        return None
    if spec["cached"]:
        x, y = _tensors(spec["refs"], features, label)
        x, y = x[rank::world], y[rank::world]
        return [(x[i : i + rows], y[i : i + rows]) for i in range(0, len(y), rows)]
    return _StreamedVal(spec, features, label, rank, world, rows)


class _StreamedVal:
    def __init__(self, spec, features, label, rank, world, rows) -> None:
        self.spec, self.features, self.label = spec, features, label
        self.rank, self.world, self.rows = rank, world, rows

    def __iter__(self) -> Iterator[Batch]:
        spec = self.spec
        dataset = ray.data.read_parquet(list(spec["files"]), filesystem=spec["filesystem"])
        dataset = dataset.select_columns(spec["columns"])
        for table in dataset.iter_batches(
            batch_size=self.rows * self.world, batch_format="pyarrow"
        ):
            part = rank_rows(0, table.num_rows, self.world, self.rank)
            if part.stop > part.start:
                table = table.slice(part.start, part.stop - part.start)
                yield table_to_tensors(table, self.features, self.label)


def _tensors(refs: list, features, label) -> Batch:
    tables = ray.get(list(refs))
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return table_to_tensors(table, features, label)
