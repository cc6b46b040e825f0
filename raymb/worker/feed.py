"""Where a worker's steps come from: whole steps of rows, in the order of raymb.order.

Two sources, one interface (`steps(epoch, start)` yields this worker's (x, y) for each step
of an epoch from step `start` on):

- Cached (data.cache): the driver's read tasks put the set once in the object store, a
  block a file (raymb.driver.cluster.data_spec); each worker fetches the blocks once, keeps
  them as tensors, and gathers each step's rows by index. Later epochs cost nothing but the
  gather.
- Streamed: every epoch each worker streams the files with Ray Data in the epoch's file
  order (and, for shuffle "rows", through a seeded shuffle buffer), in batches of one whole
  step of every worker's rows, and keeps its own slice. Every worker reads the same stream,
  so which rows it trains on never depends on how Ray Data handed out blocks.

The validation set is split rank::W, so every row is evaluated once across the workers.
Both sources check the feature values (nulls, NaN, inf) as they first read them, naming the
file: the driver's check before Ray starts reads only footers and labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from raymb.core import batch
from raymb.core.batch import Columns
from raymb.core.order import epoch_order, epoch_seed, fold_rows, rank_rows, worker_rows
from raymb.core.plan import Plan
from raymb.data.checks import check_values
from raymb.data.columns import table_to_tensors
from raymb.errors import DataError
from raymb.worker.spec import DataSpec

Batch = tuple[Columns, Columns]
"""(the model's inputs, the loss's targets): tensors, or dicts of them by column name."""
Fetch = Callable[[list], list]
"""A session's fetch: a cached spec's blocks as pyarrow Tables (raymb.worker.session)."""
PATH = "path"
"""The column Ray Data's include_paths adds: which file a streamed row came from."""


class CachedSource:
    """The whole set as tensors in this worker; each step is an index gather."""

    def __init__(self, spec: DataSpec, fetch: Fetch, features, label, plan: Plan, rank, world):
        self.x, self.y = _tensors(spec, fetch, features, label)
        self.file_rows = spec.file_rows
        if spec.folds:  # the fold's training rows, a data set of their own in file order
            self.x, self.y = _fold(spec, self.x, self.y)
            self.file_rows = (batch.rows(self.y),)
        self.shuffle, self.seed = spec.shuffle, spec.seed
        self.plan, self.rank, self.world = plan, rank, world

    def steps(self, epoch: int, start: int) -> Iterator[Batch]:
        order = epoch_order(self.shuffle, self.seed, epoch, self.file_rows)
        plan = self.plan
        for s in range(start, plan.steps_per_epoch):
            rows = worker_rows(order, s, plan.step_total, plan.step_rows(s), self.rank, self.world)
            yield batch.index(self.x, rows), batch.index(self.y, rows)


class StreamedSource:
    """Ray Data reads every epoch; this worker keeps its slice of each step's rows."""

    def __init__(self, spec: DataSpec, fetch: Fetch, features, label, plan: Plan, rank, world):
        self.spec, self.features, self.label = spec, features, label
        self.plan, self.rank, self.world = plan, rank, world

    def steps(self, epoch: int, start: int) -> Iterator[Batch]:
        spec, plan = self.spec, self.plan
        files = list(spec.files)
        if spec.shuffle != "none":
            order = epoch_order("files", spec.seed, epoch, [1] * len(files)).tolist()
            files = [files[i] for i in order]
        dataset = _stream(spec, files)
        shuffle = {}
        if spec.shuffle == "rows":
            shuffle = dict(
                local_shuffle_buffer_size=spec.shuffle_buffer,
                local_shuffle_seed=epoch_seed(spec.seed, epoch) % 2**32,
            )
        batches = dataset.iter_batches(
            batch_size=plan.step_total,
            batch_format="pyarrow",
            prefetch_batches=1,
            **shuffle,
        )
        for s, table in enumerate(batches):
            if s < start:
                continue  # trained on before the resume
            check_batch(table, spec)
            part = rank_rows(0, table.num_rows, self.world, self.rank)
            table = table.slice(part.start, part.stop - part.start)
            yield table_to_tensors(table, self.features, self.label)


def train_source(spec: DataSpec, fetch: Fetch, features, label, plan: Plan, rank, world):
    kind = CachedSource if spec.cached else StreamedSource
    return kind(spec, fetch, features, label, plan, rank, world)


def val_batches(
    spec: DataSpec | None, fetch: Fetch, features, label, rank: int, world: int, rows: int
) -> Iterator[Batch] | list[Batch] | None:
    """This worker's part of data.val: cached batches (a list, reusable), or an iterable that
    streams them again each time."""
    if spec is None:
        return None
    if spec.cached:
        x, y = _tensors(spec, fetch, features, label)
        if spec.folds:
            x, y = _fold(spec, x, y)
        x, y = batch.every(x, rank, world), batch.every(y, rank, world)
        n = batch.rows(y)
        return [(batch.part(x, i, i + rows), batch.part(y, i, i + rows)) for i in range(0, n, rows)]
    return _StreamedVal(spec, features, label, rank, world, rows)


class _StreamedVal:
    def __init__(self, spec, features, label, rank, world, rows) -> None:
        self.spec, self.features, self.label = spec, features, label
        self.rank, self.world, self.rows = rank, world, rows

    def __iter__(self) -> Iterator[Batch]:
        spec = self.spec
        dataset = _stream(spec, list(spec.files))
        for table in dataset.iter_batches(
            batch_size=self.rows * self.world, batch_format="pyarrow"
        ):
            check_batch(table, spec)
            part = rank_rows(0, table.num_rows, self.world, self.rank)
            if part.stop > part.start:
                table = table.slice(part.start, part.stop - part.start)
                yield table_to_tensors(table, self.features, self.label)


def _fold(spec: DataSpec, x: Columns, y: Columns) -> Batch:
    """A cached set's rows of its fold: the training rows, or the held-out ones."""
    train, held = fold_rows(spec.seed, batch.rows(y), spec.folds, spec.fold)
    rows = held if spec.held_out else train
    return batch.index(x, rows), batch.index(y, rows)


def _stream(spec: DataSpec, files: list[str]):
    """The files as one Ray Data stream in this order, each row with its file's path."""
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    dataset = ray.data.read_parquet(
        files, filesystem=spec.filesystem, override_num_blocks=len(files), include_paths=True
    )
    return dataset.select_columns([*spec.columns, PATH])


def check_batch(table: pa.Table, spec: DataSpec) -> None:
    """The feature values of streamed rows (check_dataset left them to this first read):
    a DataError names the file, counting the bad rows of this batch."""
    columns = spec.scan
    try:
        check_values(table, columns, "")
        return
    except DataError:
        pass  # which file: look again, file by file
    for path in pc.unique(table.column(PATH)).to_pylist():
        rows = table.filter(pc.equal(table.column(PATH), path))
        check_values(rows, columns, f"{spec.what}: {path}")


def _tensors(spec: DataSpec, fetch: Fetch, features, label) -> Batch:
    """The cached blocks as tensors, their feature values checked file by file (the
    blocks are in file order)."""
    tables = fetch(list(spec.blocks))
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    start = 0
    for path, rows in zip(spec.files, spec.file_rows):
        check_values(table.slice(start, rows), spec.scan, f"{spec.what}: {path}")
        start += rows
    return table_to_tensors(table, features, label)  # over the blocks' shared memory
