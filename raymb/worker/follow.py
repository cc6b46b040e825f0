"""Online training (`raymb train --follow DIR`): train on each parquet file as it lands in DIR.

One pass over each file, in name order among the files present, then in order of arrival.
After each file the workers validate (data.val, if set) and checkpoint; the checkpoint
records every file consumed (name and rows), so a restart, or a worker group Ray restarts,
never trains a file twice. The run stops after `idle_timeout` seconds without a new file,
or on Ctrl-C (SIGINT): the driver writes `<run dir>/STOP`, the workers finish the file in
hand, checkpoint, and return. `touch <run dir>/STOP` stops a run from anywhere.

Producer contract: write a file under a name the follower ignores, one starting with "." or
"_" or not ending in ".parquet" (e.g. `.part-000123.parquet.tmp`) in DIR itself, then rename it
to its final `*.parquet` name (rename is atomic within a filesystem). Never change or reuse
a name once it is in DIR; names should sort in the order to train (zero-padded sequence
numbers or UTC timestamps). As a second guard a file is taken only once its parquet footer
reads. Only files directly in DIR count, not subdirectories.

Exact steps: a file's rows go into steps of G = train.global_batch_size rows (one step for
"all"), the last one short; each step's rows are split into W contiguous, near-equal parts,
one per worker, in microbatches of m. Every worker takes every step (one with no row runs an
empty batch), so the gradient all-reduce always pairs up and each step's gradient is the
mean over exactly its rows: the parameters equal one process taking the same steps.

The arriving files are small and come one at a time, so each worker reads the file with
pyarrow (the whole file, then its rows); data.val is read once by Ray Data, as for `raymb
train`. Rank 0 lists DIR and broadcasts what to do next, so every worker agrees. Nothing
waits in a collective for long: rank 0 sends a "wait" every half second or so while idle.
Steps, metrics, validation and checkpoints are raymb.worker.worker's and
raymb.worker.checkpointer's, as for `raymb train`: any train.sync (under param/diloco a
checkpoint after each file averages the workers; a worker with no row in a step steps on zero
gradients, which momentum still moves). Listing DIR and reading its files is
raymb.data.arrivals's (the driver lists it too, before Ray starts).
"""

from __future__ import annotations

import time

import torch.distributed as dist

from raymb.config import Config
from raymb.core.order import rank_rows
from raymb.data.arrivals import check_fits, next_file, open_directory, read_arrival
from raymb.data.checks import check_dataset
from raymb.data.columns import column_names, table_to_tensors
from raymb.errors import DataError, RaymbError
from raymb.worker.feed import val_batches
from raymb.worker.session import RaySession, Session
from raymb.worker.spec import FollowSpec, Shape
from raymb.worker.stopping import EarlyStopper
from raymb.worker.worker import Worker


def step_sizes(rows: int, global_batch: int | str) -> list[int]:
    """Rows of each step over a file of `rows`, all workers together; the last may be short."""
    if global_batch == "all" or rows == 0:
        return [rows] if rows else []
    return [min(global_batch, rows - s) for s in range(0, rows, global_batch)]


# The worker loop.


def follow_loop(payload: dict[str, FollowSpec], session: Session | None = None) -> None:
    """What each worker runs: agree on the next file, train one pass, checkpoint. Ray Train
    calls it with its train_loop_config ({"spec": FollowSpec})."""
    spec = payload["spec"]
    session = session or RaySession(spec.run_dir)
    config, shape = spec.config, spec.shape
    rank, world = session.rank, session.world
    features, label = config.data.features, config.data.label
    val = val_batches(spec.val, session.fetch, features, label, rank, world, 4096)
    inputs = shape.inputs
    # constant or step schedules only: they need no total
    with Worker(
        config,
        shape,
        spec.run_dir,
        mode="follow",
        total_steps=1,
        session=session,
        val=val,
    ) as worker:  # its local files go when the loop ends (Worker.close)
        progress, device = worker.progress, worker.device
        checkpointer, early = worker.checkpointer, EarlyStopper.of(config)
        if worker.resumed and rank == 0:
            print(f"raymb: resumed at step {progress.step}, {len(progress.files)} files in")
        fs, root = open_directory(spec.directory)
        consumed = {name for name, _ in progress.files}
        G, m = config.train.global_batch_size, config.microbatch()

        warned: set[str] = set()
        idle_since = time.monotonic()
        while True:
            decision = None
            if rank == 0:
                decision = _decide(spec, fs, root, consumed, warned, idle_since)
            decision = _broadcast(decision, world)
            if decision["do"] == "wait":
                if rank == 0:
                    time.sleep(spec.poll_s)
                continue
            if decision["do"] == "error":
                raise DataError(decision["message"])
            if decision["do"] == "stop":
                return  # the last file's checkpoint holds everything

            name, rows = decision["name"], decision["rows"]
            waited = time.perf_counter()
            table = read_arrival(fs, root, name, column_names(features, label))
            x, y = table_to_tensors(table, features, label)
            if len(y) != rows:
                raise DataError(
                    f"--follow: {name} changed while being read ({len(y)} != {rows} rows)"
                )
            x, y = inputs.collate(x.to(device), y.to(device))
            sizes = step_sizes(rows, G)
            start = 0
            for i, n in enumerate(sizes):
                part = rank_rows(start, n, world, rank)
                xs, ys = x[part], y[part]
                # A worker with no row in this step still takes part with an empty batch: the
                # gradient all-reduce needs every worker's backward.
                batches = [(xs[j : j + m], ys[j : j + m]) for j in range(0, len(ys), m)]
                batches = batches or [(xs, ys)]
                wait_s = time.perf_counter() - waited
                loss, taken, step_s = worker.step(batches, len(ys), uneven=True)
                start += n
                last = i + 1 == len(sizes)
                if last:  # the checkpoint after the file records it
                    worker.ledger.window = min(config.train.log_every, len(sizes))  # a file's steps
                    progress.files.append([name, rows])
                    progress.epoch = len(progress.files)
                    consumed.add(name)
                due = checkpointer.due(progress.step, end=last)  # after each file only
                if due:
                    worker.consolidate()
                    worker.validate()
                worker.record(loss, taken, n, step_s=step_s, wait_s=wait_s, logged=due)
                if due:
                    metrics = worker.report_metrics()
                    early.update(progress, metrics)
                    checkpointer.report(metrics, worker)
                elif worker.ledger.due:
                    worker.gather()
                waited = time.perf_counter()
            idle_since = time.monotonic()


def _decide(spec: FollowSpec, fs, root, consumed, warned, idle_since) -> dict:
    """Rank 0: what every worker does next."""
    if spec.stop_file.exists():
        return {"do": "stop"}
    found = next_file(fs, root, consumed, warned)
    if found is not None:
        name, rows = found
        message = _check_file(spec.directory, name, rows, spec.shape, spec.config)
        if message is not None:
            return {"do": "error", "message": message}
        return {"do": "file", "name": name, "rows": rows}
    if time.monotonic() - idle_since >= spec.idle_timeout:
        return {"do": "stop"}
    return {"do": "wait"}


def _check_file(directory: str, name: str, rows: int, shape: Shape, config: Config) -> str | None:
    """A one-line reason the file does not fit the run, or None."""
    if rows == 0:
        return None
    location = f"{directory.rstrip('/')}/{name}"
    try:
        info = check_dataset(location, config.data.features, config.data.label, what="--follow")
        check_fits(info, shape, what=f"--follow: {name}")
    except RaymbError as e:
        return f"{e} (the run stopped before this file; fix or move it, then start again)"
    return None


def _broadcast(decision: dict | None, world: int) -> dict:
    if world > 1:
        box = [decision]
        dist.broadcast_object_list(box, src=0)
        decision = box[0]
    return decision
