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
Steps, metrics, validation and checkpoints are raymb.worker's, as for `raymb train`: any
train.sync (under param/diloco a checkpoint after each file averages the workers; a worker
with no row in a step steps on zero gradients, which momentum still moves).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch.distributed as dist

from raymb import checkpoint as ckpt
from raymb import storage
from raymb.columns import Inputs, column_names, table_to_tensors
from raymb.config import CheckpointSection, Config, DataSection
from raymb.driver import (
    Result,
    _first_line,
    _summary,
    check_run_dir,
    connect,
    data_spec,
    make_trainer,
    mark_failed,
)
from raymb.errors import ConfigError, DataError, RaymbError, StorageError
from raymb.order import rank_rows
from raymb.runs import RunLock, latest_checkpoint, lock_run, mark
from raymb.schema import PARQUET_SUFFIX, DatasetInfo, check_dataset
from raymb.storage import Location

STOP_FILE = "STOP"
"""In the run directory: the workers stop after the file in hand when it appears."""


# Files: plain pyarrow, used by the driver and by rank 0.


def open_directory(directory: str | Path) -> tuple[pafs.FileSystem, str]:
    """DIR as (filesystem, path on it): a local path or any URI raymb.storage resolves."""
    text = str(directory)
    try:
        location = storage.resolve(text, what="--follow")
        is_dir = location.is_dir()
    except StorageError as e:
        raise DataError(str(e)) from None
    if not is_dir:
        raise DataError(f"--follow {text}: not a directory")
    return location.fs, location.path


def next_file(
    fs: pafs.FileSystem, root: str, consumed: set[str], warned: set[str] | None = None
) -> tuple[str, int] | None:
    """(name, rows) of the first complete file in DIR not yet consumed, by name; or None."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    names = sorted(
        i.base_name
        for i in infos
        if i.type == pafs.FileType.File
        and is_data_name(i.base_name)
        and i.base_name not in consumed
    )
    for name in names:
        try:
            rows = pq.ParquetFile(f"{root}/{name}", filesystem=fs).metadata.num_rows
        except Exception:  # half-written or corrupt: its footer does not read (yet)
            if warned is not None and name not in warned:
                warned.add(name)
                print(
                    f"raymb: skipping {name} for now: its parquet footer does not read "
                    "(a producer should write a .tmp name and rename it)",
                    file=sys.stderr,
                    flush=True,
                )
            continue
        return name, rows
    return None


def is_data_name(name: str) -> bool:
    """Names a producer renames into place; hidden, `_` and `.tmp` names are work in progress."""
    return name.endswith(PARQUET_SUFFIX) and not name.startswith((".", "_"))


def step_sizes(rows: int, global_batch: int | str) -> list[int]:
    """Rows of each step over a file of `rows`, all workers together; the last may be short."""
    if global_batch == "all" or rows == 0:
        return [rows] if rows else []
    return [min(global_batch, rows - s) for s in range(0, rows, global_batch)]


# The worker loop.


def follow_loop(payload: dict) -> None:
    """What each Ray Train worker runs: agree on the next file, train one pass, checkpoint."""
    import ray.train  # Ray only in the workers and once the driver's checks have passed

    from raymb.feed import val_batches
    from raymb.worker import Shape, Worker

    config = Config.from_dict(payload["config"])
    dims = payload["dims"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    features, label = config.data.features, config.data.label
    val = val_batches(payload["val"], features, label, rank, world, 4096)
    inputs = Inputs.from_dict(dims["inputs"])
    shape = Shape(inputs, dims["out_features"])
    # constant or step schedules only: they need no total
    worker = Worker(config, shape, payload["run_dir"], mode="follow", total_steps=1, val=val)
    progress, device = worker.progress, worker.device
    if worker.resumed and rank == 0:
        print(f"raymb: resumed at step {progress.step}, {len(progress.files)} files in")
    fs, root = open_directory(payload["directory"])
    consumed = {name for name, _ in progress.files}
    G, m = config.train.global_batch_size, config.microbatch()

    warned: set[str] = set()
    idle_since = time.monotonic()
    while True:
        decision = None
        if rank == 0:
            decision = _decide(payload, fs, root, consumed, warned, idle_since, dims, config)
        decision = _broadcast(decision, world)
        if decision["do"] == "wait":
            if rank == 0:
                time.sleep(payload["poll_s"])
            continue
        if decision["do"] == "error":
            raise DataError(decision["message"])
        if decision["do"] == "stop":
            return  # the last file's checkpoint holds everything

        name, rows = decision["name"], decision["rows"]
        waited = time.perf_counter()
        table = pq.read_table(
            f"{root}/{name}", filesystem=fs, columns=column_names(features, label)
        )
        x, y = table_to_tensors(table, features, label)
        if len(y) != rows:
            raise DataError(f"--follow: {name} changed while being read ({len(y)} != {rows} rows)")
        x, y = inputs.collate(x.to(device), y.to(device))
        sizes = step_sizes(rows, G)
        start = 0
        for i, n in enumerate(sizes):
            part = rank_rows(start, n, world, rank)
            xs, ys = x[part], y[part]
            # A worker with no row in this step still takes part with an empty batch: the
            # gradient all-reduce needs every worker's backward.
            batches = [(xs[j : j + m], ys[j : j + m]) for j in range(0, len(ys), m)] or [(xs, ys)]
            wait_s = time.perf_counter() - waited
            loss, taken, step_s = worker.step(batches, len(ys), uneven=True)
            start += n
            last = i + 1 == len(sizes)
            if last:  # the checkpoint after the file records it
                progress.files.append([name, rows])
                progress.epoch = len(progress.files)
                consumed.add(name)
            worker.record(loss, taken, n, step_s=step_s, wait_s=wait_s, due=last)
            waited = time.perf_counter()
        idle_since = time.monotonic()


def _decide(payload, fs, root, consumed, warned, idle_since, dims, config) -> dict:
    """Rank 0: what every worker does next."""
    if payload["stop_file"].exists():
        return {"do": "stop"}
    found = next_file(fs, root, consumed, warned)
    if found is not None:
        name, rows = found
        message = _check_file(payload["directory"], name, rows, dims, config)
        if message is not None:
            return {"do": "error", "message": message}
        return {"do": "file", "name": name, "rows": rows}
    if time.monotonic() - idle_since >= payload["idle_timeout"]:
        return {"do": "stop"}
    return {"do": "wait"}


def _check_file(directory: str, name: str, rows: int, dims: dict, config: Config) -> str | None:
    """A one-line reason the file does not fit the run, or None."""
    if rows == 0:
        return None
    location = f"{directory.rstrip('/')}/{name}"
    try:
        info = check_dataset(location, config.data.features, config.data.label, what="--follow")
        _check_fits(info, dims, what=f"--follow: {name}")
    except RaymbError as e:
        return f"{e} (the run stopped before this file; fix or move it, then start again)"
    return None


def _check_fits(info: DatasetInfo, dims: dict, *, what: str) -> None:
    kind = "int" if dims["classify"] else "float"
    if (info.num_features, info.label_kind) != (dims["in_features"], kind):
        raise DataError(
            f"{what} has {info.num_features} features and {info.label_kind} labels; the run "
            f"has {dims['in_features']} and {kind}"
        )
    if dims["classify"] and info.num_classes > dims["out_features"]:
        raise DataError(
            f"{what} has labels up to {info.num_classes - 1}, but model.num_classes="
            f"{dims['out_features']}"
        )


def _broadcast(decision: dict | None, world: int) -> dict:
    if world > 1:
        box = [decision]
        dist.broadcast_object_list(box, src=0)
        decision = box[0]
    return decision


# The driver.


def follow(
    config: Config, directory: str | Path, *, idle_timeout: float, address: str | None = None
) -> Result:
    """Train on each parquet file as it lands in `directory` until `idle_timeout` seconds pass
    without one, or SIGINT; return the run's summary (also written to summary.json).

    With no complete file in `directory` within `idle_timeout`, nothing starts: DataError.
    """
    config = _without_demo_val(config)
    _check_config(config, idle_timeout)
    storage.configure(config.storage)
    run_dir = check_run_dir(config)  # a second driver is refused before waiting for a file
    fs, root = open_directory(directory)
    location = root if "://" not in str(directory) else str(directory)
    val_info = None
    if config.data.val is not None:
        val_info = check_dataset(
            config.data.val, config.data.features, config.data.label, what="data.val"
        )
    first = _wait_for_first_file(fs, root, idle_timeout, str(directory))
    info = check_dataset(
        f"{location.rstrip('/')}/{first}", config.data.features, config.data.label, what="--follow"
    )
    dims = _dims(config, info, first)
    if val_info is not None:
        _check_fits(val_info, dims, what="data.val")
    lock = lock_run(run_dir)
    try:
        return _follow(config, lock, location, dims, val_info, idle_timeout, address)
    finally:
        lock.release()  # on failure and Ctrl-C too


def _follow(
    config: Config,
    lock: RunLock,
    location: str,
    dims: dict[str, Any],
    val_info: DatasetInfo | None,
    idle_timeout: float,
    address: str | None,
) -> Result:
    """The run, once its directory is held."""
    run_dir = lock.run_dir
    stop_file = run_dir / STOP_FILE
    try:
        ckpt.claim_run(run_dir, config)  # a resumed run must fit its checkpoints
        cpus = connect(config, address)
        stop_file.remove()  # left by an earlier run
        mark(run_dir, "running")
        loop_config = {
            "config": config.to_dict(),
            "dims": dims,
            "run_dir": run_dir,
            "val": data_spec(val_info, config, True, "data.val") if val_info else None,
            "directory": location,
            "idle_timeout": float(idle_timeout),
            "poll_s": min(0.5, max(0.05, idle_timeout / 10)),
            "stop_file": stop_file,
        }
        trainer = make_trainer(config, follow_loop, loop_config, cpus, run_dir)
    except BaseException:
        lock.discard()  # a new run that never started leaves nothing; an older one is kept
        raise
    import ray.train  # connect() imported it; not before a resumed run's refusal

    started = time.perf_counter()
    try:
        result = _fit_stopping_on_sigint(trainer, stop_file)
        stopped = stop_file.exists()
    except ray.train.TrainingFailedError as e:
        latest, _ = latest_checkpoint(run_dir)
        kept = f"latest checkpoint: {latest}" if latest else "no checkpoint was written"
        mark_failed(run_dir, _first_line(e))
        raise RaymbError(f"training failed: {_first_line(e)} ({kept})") from e
    finally:
        stop_file.remove()
    summary = _summary(result, time.perf_counter() - started, config, run_dir)
    metrics = result.metrics or {}
    summary["files_consumed"] = metrics.get("epoch", 0)  # the epochs of --follow are files
    summary["stop_reason"] = "interrupted" if stopped else "idle"
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    mark(run_dir, "stopped" if stopped else "finished")
    return Result(run_dir=run_dir, summary=summary)


def _without_demo_val(config: Config) -> Config:
    """--follow trains on DIR, not data.train: a config that sets neither data.train nor
    data.val means no validation, not the demo set that data.val defaults to (and the best
    checkpoint is then the one of lowest train_loss, unless checkpoint.metric says else)."""
    default = DataSection()
    if (config.data.train, config.data.val) != (default.train, default.val):
        return config
    checkpoint = config.checkpoint
    if checkpoint.metric == CheckpointSection().metric:
        checkpoint = dataclasses.replace(checkpoint, metric="train_loss")
    data = dataclasses.replace(config.data, val=None)
    return dataclasses.replace(config, data=data, checkpoint=checkpoint)


def _check_config(config: Config, idle_timeout: float) -> None:
    if not idle_timeout > 0:
        raise ConfigError(f"--idle-timeout must be > 0 seconds, got {idle_timeout}")
    unsupported = (
        ("scale.workers", config.scale.workers, config.scale.elastic),
        ("train.microbatch_size", "auto", config.train.microbatch_size == "auto"),
        ("optim.schedule", "cosine", config.optim.schedule == "cosine"),
    )
    for key, value, bad in unsupported:
        if bad:
            raise ConfigError(f"{key}={value!r} is not supported with --follow yet")
    if config.checkpoint.metric.startswith("val_") and config.data.val is None:
        raise ConfigError(
            f"checkpoint.metric={config.checkpoint.metric!r} needs data.val; set data.val "
            "or checkpoint.metric=train_loss"
        )


def _wait_for_first_file(fs, root: str, idle_timeout: float, shown: str) -> str:
    """Any complete file (consumed or not): it fixes the model's input and output widths."""
    deadline = time.monotonic() + idle_timeout
    warned: set[str] = set()
    while True:
        found = next_file(fs, root, set(), warned)
        if found is not None:
            return found[0]
        if time.monotonic() >= deadline:
            raise DataError(
                f"--follow {shown}: no complete *.parquet file arrived within {idle_timeout:g} s; "
                "nothing trained"
            )
        time.sleep(min(1.0, idle_timeout / 10))


def _dims(config: Config, info: DatasetInfo, name: str) -> dict[str, Any]:
    if config.data.task == "lm":
        raise ConfigError('--follow does not train language models (data.task = "lm") yet')
    classify = info.label_kind == "int"
    if classify and config.model.num_classes is None:
        raise ConfigError(
            f"--follow: {name} has integer labels: set model.num_classes (the labels of files "
            "yet to come are unknown)"
        )
    if not classify and config.checkpoint.metric == "val_accuracy":
        raise ConfigError("checkpoint.metric='val_accuracy' needs integer (class) labels")
    dims = {
        "in_features": info.num_features,
        "out_features": config.model.num_classes if classify else 1,
        "classify": classify,
        "inputs": Inputs.of(
            config.data, "classify" if classify else "regress", info.feature_shape
        ).to_dict(),
    }
    _check_fits(info, dims, what=f"--follow: {name}")
    return dims


def _fit_stopping_on_sigint(trainer, stop_file: Location):
    """fit(); the first SIGINT asks the workers to stop after the file in hand.

    fit() runs in a thread: on the main thread Ray Train installs its own SIGINT handler,
    which aborts the workers at once. A second SIGINT raises KeyboardInterrupt here at once
    (a local Ray cluster ends with the process; the run resumes from its last checkpoint).
    """
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()  # no signals here
    outcome: dict[str, Any] = {}
    interrupts = 0

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # re-raised on the caller's thread
            outcome["error"] = e

    def on_sigint(signum, frame) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            raise KeyboardInterrupt
        stop_file.write_bytes(b"")
        print(
            "raymb: stopping after the file in hand, then checkpointing "
            "(Ctrl-C again to abandon it)",
            file=sys.stderr,
            flush=True,
        )

    thread = threading.Thread(target=run, name="raymb-follow-fit", daemon=True)
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
    finally:
        signal.signal(signal.SIGINT, previous)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
