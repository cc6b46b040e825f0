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

Ray Data is not used: files are small and arrive one at a time, so each worker reads the
file with pyarrow (the whole file, then its rows); rank 0 lists DIR and broadcasts what to
do next, so every worker agrees. Nothing waits in a collective for long: rank 0 sends a
"wait" every half second or so while idle.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raymb import checkpoint as ckpt
from raymb.columns import table_to_tensors
from raymb.config import Config
from raymb.driver import (
    ReportsToCsv,
    Result,
    _first_line,
    _summary,
    connect,
    latest_checkpoint,
    make_trainer,
)
from raymb.errors import CheckpointError, ConfigError, DataError, RaymbError
from raymb.models import build_model, correct, summed_loss
from raymb.optim import build_optimizer, build_scheduler
from raymb.order import rank_rows
from raymb.schema import PARQUET_SUFFIX, DatasetInfo, check_dataset, resolve_files
from raymb.step import train_step
from raymb.sync import build_sync

STOP_FILE = "STOP"
"""In the run directory: the workers stop after the file in hand when it appears."""


# Files: plain pyarrow, used by the driver and by rank 0.


def open_directory(directory: str | Path) -> tuple[pafs.FileSystem, str]:
    """DIR as (filesystem, path on it): a local path or any URI pyarrow understands."""
    text = str(directory)
    try:
        if "://" in text:
            fs, root = pafs.FileSystem.from_uri(text)
        else:
            fs, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text))
        is_dir = fs.get_file_info(root).type == pafs.FileType.Directory
    except (OSError, ValueError) as e:
        raise DataError(f"--follow {text}: cannot open ({' '.join(str(e).split())})") from None
    if not is_dir:
        raise DataError(f"--follow {text}: not a directory")
    return fs, root


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


@dataclass
class Progress:
    """What a checkpoint carries besides model and optimizer."""

    step: int = 0
    samples: int = 0
    train_seconds: float = 0.0
    bytes_allreduced: int = 0
    resumed_from_steps: list[int] = field(default_factory=list)
    train_loss: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    skipped_steps: int = 0
    files: list[list] = field(default_factory=list)
    """[name, rows] of every file trained on, in order."""


@dataclass
class Window:
    """Sums between two reports: one row of metrics."""

    loss: Any = 0.0  # a tensor once a step has run: read only when reporting
    rows: int = 0
    steps: int = 0
    step_s: float = 0.0
    wait_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)


def follow_loop(payload: dict) -> None:
    """What each Ray Train worker runs: agree on the next file, train one pass, checkpoint."""
    config = Config.from_dict(payload["config"])
    dims = payload["dims"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    torch.manual_seed(config.train.seed)
    model = build_model(config.model, dims["in_features"], dims["out_features"]).to(device)
    optimizer = build_optimizer(config.optim, model.parameters())
    scheduler = build_scheduler(config.optim, optimizer, 1)  # constant or step: no total needed
    progress = Progress()
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            _restore(Path(directory), model, optimizer, scheduler, progress)
        progress.resumed_from_steps.append(progress.step)
        if rank == 0:
            print(f"raymb: resumed at step {progress.step}, {len(progress.files)} files in")
    sync = build_sync(config.train.sync, world, device)
    net = sync.wrap(model)
    sync.comm.bytes = progress.bytes_allreduced
    classify = dims["classify"]
    val = _read_val(config, rank, world) if config.data.val is not None else None
    fs, root = open_directory(payload["directory"])
    consumed = {name for name, _ in progress.files}
    G, m = config.train.global_batch_size, config.microbatch()
    window = Window()

    def report(*, with_checkpoint: bool) -> None:
        nonlocal window
        sums = torch.tensor([float(window.loss), float(window.rows)], device=device)
        loss, rows = _all_sum(sums).tolist()
        if rows:
            progress.train_loss = loss / rows
        elapsed = time.perf_counter() - window.started
        progress.bytes_allreduced = sync.comm.bytes
        metrics = {
            "step": progress.step,
            "epoch": len(progress.files),  # online: the files consumed
            "train_loss": progress.train_loss,
            "val_loss": progress.val_loss,
            "val_accuracy": progress.val_accuracy,
            "lr": scheduler.get_last_lr()[0],
            "samples": progress.samples,
            "samples_per_s": rows / elapsed if rows and elapsed > 0 else 0.0,
            "step_time_s": window.step_s / max(1, window.steps),
            "data_wait_s": window.wait_s / max(1, window.steps),
            "bytes_allreduced": progress.bytes_allreduced,
            "train_seconds": progress.train_seconds,
            "resumed_from_steps": list(progress.resumed_from_steps),
            "skipped_steps": progress.skipped_steps,
            "files_consumed": len(progress.files),
        }
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if with_checkpoint and rank == 0:
                _save(Path(tmp), model, optimizer, scheduler, progress, config, dims)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        window = Window()

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
        if not window.steps:
            window.started = waited  # throughput counts training, not idling
        table = pq.read_table(f"{root}/{name}", filesystem=fs, columns=_columns(config))
        x, y = table_to_tensors(table, config.data.features, config.data.label)
        if len(y) != rows:
            raise DataError(f"--follow: {name} changed while being read ({len(y)} != {rows} rows)")
        x, y = x.to(device), y.to(device)
        sizes = step_sizes(rows, G)
        start = 0
        for i, n in enumerate(sizes):
            part = rank_rows(start, n, world, rank)
            xs, ys = x[part], y[part]
            # A worker with no row in this step still takes part with an empty batch: the
            # gradient all-reduce needs every worker's backward.
            batches = [(xs[j : j + m], ys[j : j + m]) for j in range(0, len(ys), m)] or [(xs, ys)]
            began = time.perf_counter()
            loss, taken = _step(net, optimizer, batches, n, world, sync, config, classify)
            scheduler.step()
            done = time.perf_counter()
            window.loss = window.loss + loss
            window.rows += len(ys)
            window.steps += 1
            window.wait_s += began - waited
            window.step_s += done - began
            progress.train_seconds += done - waited
            progress.step += 1
            progress.samples += n
            progress.skipped_steps += not taken
            start += n
            waited = done
            if i + 1 < len(sizes) and progress.step % config.train.log_every == 0:
                report(with_checkpoint=False)
        progress.files.append([name, rows])
        consumed.add(name)
        if val is not None:
            progress.val_loss, progress.val_accuracy = _validate(model, val, classify, device)
        report(with_checkpoint=True)
        idle_since = time.monotonic()


def _decide(payload, fs, root, consumed, warned, idle_since, dims, config) -> dict:
    """Rank 0: what every worker does next."""
    if os.path.exists(payload["stop_file"]):
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


def _step(net, optimizer, microbatches, step_rows: int, world: int, sync, config, classify):
    """train_step with every microbatch's loss divided by the rows of the step, all workers.

    train_step divides by sync.step_samples(rows), rows * world under grad sync, which
    assumes the same rows on every worker; here the last step of a file may split unevenly
    (37 rows: 19 and 18), so every worker passes the step's mean share, step_rows / world.
    """
    loss, taken = train_step(
        net,
        optimizer,
        microbatches,
        step_rows / world,
        sync=sync,
        classify=classify,
        grad_clip=config.optim.grad_clip,
    )
    if not taken and config.train.on_nan == "abort":
        raise RaymbError("non-finite loss or gradient: the run stopped at its last checkpoint")
    return loss, taken


def _all_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def _columns(config: Config) -> list[str]:
    features = config.data.features
    return [*([features] if isinstance(features, str) else features), config.data.label]


def _read_val(config: Config, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This worker's rows (rank::world) of data.val, read once."""
    files, fs = resolve_files(config.data.val, what="data.val")
    table = pq.ParquetDataset(files, filesystem=fs).read(columns=_columns(config))
    x, y = table_to_tensors(table, config.data.features, config.data.label)
    return x[rank::world], y[rank::world]


@torch.no_grad()
def _validate(model, val, classify: bool, device) -> tuple[float | None, float | None]:
    """Mean loss (and accuracy for classifiers) over data.val, all workers."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    x_all, y_all = val
    for i in range(0, len(y_all), 4096):
        x, y = x_all[i : i + 4096].to(device), y_all[i : i + 4096].to(device)
        out = model(x)
        sums[0] += summed_loss(out, y, classify).double()
        sums[1] += correct(out, y).double() if classify else 0.0
        sums[2] += len(y)
    model.train()
    loss, hits, rows = _all_sum(sums).tolist()
    if rows == 0:
        return None, None
    return loss / rows, (hits / rows if classify else None)


def _save(directory: Path, model, optimizer, scheduler, progress, config, dims) -> None:
    payload = ckpt.model_payload(
        model, config.to_dict(), dims["in_features"], dims["out_features"], dims["classify"]
    )
    state = {
        "format": "raymb",
        "mode": "follow",
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": asdict(progress),
    }
    ckpt.atomic_save(payload, directory / ckpt.MODEL_FILE)
    ckpt.atomic_save(state, directory / ckpt.STATE_FILE)


def _restore(directory: Path, model, optimizer, scheduler, progress: Progress) -> None:
    state = ckpt.read(directory / ckpt.STATE_FILE)
    if state.get("mode") != "follow":
        raise CheckpointError(
            f"{directory}: this run was not started with --follow; use another run.name"
        )
    model.load_state_dict(ckpt.read(directory / ckpt.MODEL_FILE)["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for key, value in state["progress"].items():
        setattr(progress, key, value)


# The driver.


def follow(
    config: Config, directory: str | Path, *, idle_timeout: float, address: str | None = None
) -> Result:
    """Train on each parquet file as it lands in `directory` until `idle_timeout` seconds pass
    without one, or SIGINT; return the run's summary (also written to summary.json).

    With no complete file in `directory` within `idle_timeout`, nothing starts: DataError.
    """
    _check_config(config, idle_timeout)
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

    storage = str(Path(config.run.storage_path).expanduser().resolve())
    run_dir = Path(storage) / config.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.claim_run(run_dir, config)  # a resumed run must fit its checkpoints
    cpus = connect(config, address)
    stop_file = run_dir / STOP_FILE
    stop_file.unlink(missing_ok=True)  # left by an earlier run
    loop_config = {
        "config": config.to_dict(),
        "dims": dims,
        "directory": location,
        "idle_timeout": float(idle_timeout),
        "poll_s": min(0.5, max(0.05, idle_timeout / 10)),
        "stop_file": str(stop_file),
    }
    callbacks = [ReportsToCsv(run_dir / "metrics.csv")]
    trainer = make_trainer(config, follow_loop, loop_config, cpus, run_dir, callbacks)
    started = time.perf_counter()
    try:
        result = _fit_stopping_on_sigint(trainer, stop_file)
        stopped = stop_file.exists()
    except ray.train.TrainingFailedError as e:
        latest = latest_checkpoint(run_dir)
        kept = f"latest checkpoint: {latest}" if latest else "no checkpoint was written"
        raise RaymbError(f"training failed: {_first_line(e)} ({kept})") from e
    finally:
        stop_file.unlink(missing_ok=True)
    summary = _summary(result, time.perf_counter() - started, config)
    metrics = result.metrics or {}
    summary["files_consumed"] = metrics.get("files_consumed", 0)
    summary["stop_reason"] = "interrupted" if stopped else "idle"
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return Result(run_dir=run_dir, summary=summary)


def _check_config(config: Config, idle_timeout: float) -> None:
    if not idle_timeout > 0:
        raise ConfigError(f"--idle-timeout must be > 0 seconds, got {idle_timeout}")
    unsupported = (
        ("train.sync", config.train.sync, config.train.sync != "grad"),
        ("train.microbatch_size", "auto", config.train.microbatch_size == "auto"),
        ("optim.schedule", "cosine", config.optim.schedule == "cosine"),
        ("train.precision", config.train.precision, config.train.precision != "fp32"),
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
    }
    _check_fits(info, dims, what=f"--follow: {name}")
    return dims


def _fit_stopping_on_sigint(trainer, stop_file: Path):
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
        stop_file.touch()
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
