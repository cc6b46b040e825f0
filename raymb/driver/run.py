"""The driver: checks inputs, starts or joins Ray, runs the workers, writes the run's results.

Everything a user can get wrong is checked here before Ray starts, so a bad config or bad
data costs a one-line error and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.train
from ray.train.torch import TorchTrainer

from raymb.config import Config
from raymb.data.checks import DatasetInfo, describe_shape
from raymb.data.columns import column_names
from raymb.driver.preflight import prepare, run_location, tokenizer_spec
from raymb.errors import DataError, RaymbError, StorageError
from raymb.rundir import plot, progress, storage
from raymb.rundir.checkpoint import MODEL_FILE, claim_run
from raymb.rundir.runs import latest_checkpoint, mark
from raymb.rundir.storage import Location
from raymb.rundir.tracking import Tracker
from raymb.worker.epochs import train_loop
from raymb.worker.spec import DataSpec, EpochsSpec
from raymb.worker.worker import POLL_ENV, POLL_S

CACHE_SHARE = 0.25
"""data.cache = "auto" caches when the data takes at most this share of Ray's object store
and of the memory Ray may use."""


@dataclass(frozen=True)
class Result:
    """What a finished run leaves: its directory (local or in an object store) and the
    contents of summary.json."""

    run_dir: Location
    summary: dict[str, Any]

    @property
    def checkpoint(self) -> str | None:
        return self.summary["checkpoint"]


def connect(config: Config, address: str | None) -> float:
    """Start a local Ray cluster or join one; return the logical CPUs to give each worker.

    A worker holding every CPU starves Ray Data's read tasks and the run waits forever, so
    the workers together leave at least one CPU free.
    """
    W = config.scale.max_workers
    if not ray.is_initialized():
        if address is None:
            ray.init(
                address="local",
                num_cpus=max(os.cpu_count() or 1, W + 1),
                include_dashboard=False,
                log_to_driver=True,
            )
        else:
            ray.init(address=address)
    if config.scale.cpus_per_worker is not None:
        return config.scale.cpus_per_worker
    total = ray.cluster_resources().get("CPU", 0)
    return min(1.0, max(total - 1, total / 2) / W) if total else 1.0


def train(config: Config, *, address: str | None = None) -> Result:
    """Train as configured and return the run's summary (also written to summary.json)."""
    plan, train_info, val_info = prepare(config)
    run_dir = run_location(config)
    fresh = not run_dir.exists()
    claim_run(run_dir, config)  # a resumed run must fit its checkpoints
    cpus = connect(config, address)
    mark(run_dir, "running")
    tracker = start_tracking(config, run_dir, resumed=not fresh)
    cached = use_cache(config, [train_info, val_info])
    print(
        f"raymb: data.train: {train_info.num_rows} rows, "
        f"{describe_shape(train_info, config.data.features)}, task {plan.inputs['task']}",
        flush=True,
    )
    spec = EpochsSpec(
        config=config,
        plan=plan,
        run_dir=run_dir,
        train=data_spec(train_info, config, cached),
        val=data_spec(val_info, config, cached, "data.val") if val_info else None,
        tokenizer=tokenizer_spec(config),
    )
    trainer = make_trainer(config, train_loop, {"spec": spec}, cpus, run_dir)
    started = time.perf_counter()
    try:
        with progress.watch(run_dir / "metrics.csv", plan.total_steps, on_rows=tracker.log_rows):
            result = trainer.fit()
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        tracker.finish(summary=None, status=status, files={})
        if not isinstance(e, ray.train.TrainingFailedError):
            raise
        latest, _ = latest_checkpoint(run_dir)
        bad_data = _data_error(e)
        if bad_data is not None:  # found by the workers' first read: nothing to keep
            if fresh and latest is None:
                run_dir.remove()
            else:
                mark_failed(run_dir, bad_data)
            raise DataError(bad_data) from None
        kept = (
            f"latest checkpoint: {latest} (run again with run.name={config.run.name!r} to resume)"
            if latest
            else "no checkpoint was written"
        )
        mark_failed(run_dir, _first_line(e))
        raise RaymbError(f"training failed: {_first_line(e)} ({kept})") from e
    wall = time.perf_counter() - started
    summary = _summary(result, wall, config, run_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot.write_run_plot(run_dir)
    finish_tracking(tracker, summary, run_dir)
    mark(run_dir, "stopped early" if summary["stopped_early"] else "finished")
    return Result(run_dir=run_dir, summary=summary)


def start_tracking(config: Config, run_dir: Location, *, resumed: bool) -> Tracker:
    """TensorBoard and MLflow, as [log] asks (maybe neither)."""
    return Tracker.start(
        run_dir=run_dir,
        run_name=config.run.name,
        config=config.to_dict(),
        tensorboard=config.log.tensorboard,
        mlflow_uri=config.log.mlflow_uri,
        mlflow_experiment=config.log.mlflow_experiment,
        resumed=resumed,
    )


def finish_tracking(tracker: Tracker, summary: dict[str, Any], run_dir: Location) -> None:
    """End the tracked run with summary.json and the best model as artifacts."""
    files = {"summary.json": run_dir / "summary.json"}
    if summary.get("best_checkpoint"):
        files[MODEL_FILE] = storage.resolve(summary["best_checkpoint"])
    tracker.finish(summary=summary, status="FINISHED", files=files)


def mark_failed(run_dir: Location, error: str) -> None:
    """status.json says failed, unless the store is what failed: the error at hand is the news."""
    try:
        mark(run_dir, "failed", error=error)
    except StorageError:
        pass


def use_cache(config: Config, infos: list[DatasetInfo | None]) -> bool:
    """data.cache, with "auto" resolved against what the cluster holds."""
    if config.data.cache != "auto":
        return bool(config.data.cache)
    size = sum(i.bytes for i in infos if i is not None)
    resources = ray.cluster_resources()
    room = min(resources.get("object_store_memory", 0), resources.get("memory", 0))
    # Each worker also keeps the rows as float32 tensors.
    rows = sum(i.num_rows * (i.num_features * _itemsize(i) + 8) for i in infos if i is not None)
    return size <= CACHE_SHARE * room and rows * config.scale.max_workers <= CACHE_SHARE * room


def _itemsize(info: DatasetInfo) -> int:
    """Bytes a feature value takes in a worker's cache: as stored, floats as float32."""
    kind = np.dtype(info.feature_type) if info.feature_type in np.sctypeDict else np.float32
    return 4 if np.issubdtype(kind, np.floating) else np.dtype(kind).itemsize


def data_spec(
    info: DatasetInfo, config: Config, cached: bool, what: str = "data.train"
) -> DataSpec:
    """What a worker needs to read a dataset (raymb.worker.feed): the blocks materialized in
    Ray's object store, or the files to stream."""
    if not cached:
        return DataSpec.of(info, config, what=what)
    import ray.data

    # Blocks in file order: the row indices of raymb.core.order are positions in the files.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    dataset = ray.data.read_parquet(list(info.files), filesystem=info.filesystem)
    columns = column_names(config.data.features, config.data.label_column)
    dataset = dataset.select_columns(columns).materialize()
    return DataSpec.of(info, config, what=what, blocks=tuple(dataset.to_arrow_refs()))


def make_trainer(config: Config, loop, loop_config: dict, cpus: float, run_dir: Location):
    """The TorchTrainer of a run: its workers, storage, failures, checkpoints. Each worker
    writes its checkpoint files straight to run_dir's filesystem (Ray Train's upload)."""
    # Ray passes the setting on to the controller that fit() starts.
    os.environ.setdefault(POLL_ENV, str(POLL_S))
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=(
                (config.scale.min_workers, config.scale.max_workers)
                if config.scale.elastic
                else config.scale.max_workers
            ),
            use_gpu=config.scale.use_gpu,
            resources_per_worker={"CPU": cpus} if not config.scale.use_gpu else None,
        ),
        run_config=ray.train.RunConfig(
            name=config.run.name,
            storage_path=run_dir.parent.path,
            storage_filesystem=None if run_dir.local else run_dir.fs,
            failure_config=ray.train.FailureConfig(max_failures=config.scale.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.checkpoint.keep,
                checkpoint_score_attribute=config.checkpoint.metric,
                checkpoint_score_order=config.checkpoint.mode,
            ),
        ),
    )


def _best_checkpoint(result, config: Config, run_dir: Location) -> str | None:
    scored = [
        (m[config.checkpoint.metric], run_dir.on_same(c.path))
        for c, m in (result.best_checkpoints or [])
        if m.get(config.checkpoint.metric) is not None
    ]
    if not scored:
        return None
    pick = min if config.checkpoint.mode == "min" else max
    return f"{pick(scored)[1]}/{MODEL_FILE}"


def _summary(result, wall_s: float, config: Config, run_dir: Location) -> dict[str, Any]:
    """summary.json: the last metrics, and the checkpoints as paths or URIs to give eval."""
    m = result.metrics or {}
    final = f"{run_dir.on_same(result.checkpoint.path)}/{MODEL_FILE}" if result.checkpoint else None
    best = _best_checkpoint(result, config, run_dir) or final
    stopped_early = bool(m.get("stopped_early"))
    return {
        "train_loss": m.get("train_loss"),
        "val_loss": m.get("val_loss"),
        "val_accuracy": m.get("val_accuracy"),
        **{k: m[k] for k in ("val_perplexity", "val_bits_per_byte") if k in m},
        "steps": m.get("step", 0),
        "samples": m.get("samples", 0),
        "samples_per_s": m["samples"] / m["train_seconds"] if m.get("train_seconds") else None,
        "wall_s": round(wall_s, 3),
        "checkpoint": best if stopped_early else final,
        "best_checkpoint": best,
        "resumed_from_steps": m.get("resumed_from_steps", []),
        "bytes_allreduced": m.get("bytes_allreduced", 0),
        "skipped_steps": m.get("skipped_steps", 0),
        "workers": m.get("workers"),
        "nodes": m.get("nodes"),
        "stopped_early": stopped_early,
    }


def _data_error(error: BaseException) -> str | None:
    """The message of a DataError a worker raised, from Ray's wrapped traceback."""
    marker = f"{DataError.__name__}: "
    found = [line for line in str(error).splitlines() if marker in line]
    return found[-1].split(marker, 1)[1].strip() if found else None  # the last one raised


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    # Ray wraps the worker's traceback; its last line is the worker's own error.
    return lines[-1] if lines else text
