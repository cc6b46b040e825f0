"""The driver: checks inputs, starts or joins Ray, runs the workers, writes the run's results.

Everything a user can get wrong is checked here before Ray starts, so a bad config or bad
data costs a one-line error and leaves nothing behind. Ray is imported only once the checks
have passed, and the modules that need torch only by the checks of the data: a bad run name,
a storage path that is a file or a run another driver holds is refused at once. A driver
holds its run directory's lock (raymb.runs.lock_run) from its first write to its end.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from raymb import plot, progress, runs, storage
from raymb.config import Config
from raymb.data.manifest import find_manifest
from raymb.errors import ConfigError, DataError, RaymbError, StorageError
from raymb.runs import RunLock, latest_checkpoint, mark
from raymb.storage import Location
from raymb.tracking import Tracker, mlflow_target

if TYPE_CHECKING:
    from raymb.columns import Inputs
    from raymb.plan import Plan
    from raymb.schema import DatasetInfo

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


def prepare(config: Config) -> tuple[Plan, Any, Any]:
    """Check the data against the config; nothing is started or written."""
    from raymb.columns import Inputs
    from raymb.plan import Plan
    from raymb.schema import MAX_CLASSES, check_dataset, describe_shape

    storage.configure(config.storage)  # the endpoint of s3:// data and runs
    mlflow_target(config.log.mlflow_uri)  # asked for, and installed
    data = config.data
    label = data.label_column
    # Without model.num_classes the labels size the model: one outlier must not.
    max_classes = MAX_CLASSES if config.model.num_classes is None else None
    # The feature values are checked by the workers' first read (raymb.feed).
    train_info = check_dataset(
        data.train,
        data.features,
        label,
        what="data.train",
        scan_features=False,
        task=data.task,
        max_classes=max_classes,
    )
    val_info = None
    if data.val is not None:
        val_info = check_dataset(
            data.val,
            data.features,
            label,
            what="data.val",
            scan_features=False,
            task=data.task,
            max_classes=max_classes,
        )
        if (val_info.feature_shape, val_info.label_kind) != (
            train_info.feature_shape,
            train_info.label_kind,
        ):
            raise ConfigError(
                f"data.val has {describe_shape(val_info, data.features)} and "
                f"{val_info.label_kind} labels; data.train has "
                f"{describe_shape(train_info, data.features)} and {train_info.label_kind}"
            )
    if config.checkpoint.metric.startswith("val_") and val_info is None:
        raise ConfigError(
            f"checkpoint.metric={config.checkpoint.metric!r} needs data.val; set data.val "
            "or checkpoint.metric=train_loss"
        )
    inputs = Inputs.of(data, _task(config, train_info), train_info.feature_shape)
    _check_model_fits(config, inputs, train_info)
    found = find_manifest(data.train)
    plan = Plan.build(
        config,
        num_rows=train_info.num_rows,
        inputs=inputs,
        out_features=_out_features(
            config, inputs.task, train_info, val_info, found[1] if found else {}
        ),
    )
    return plan, train_info, val_info


def _task(config: Config, info: DatasetInfo) -> str:
    """data.task, with "auto" resolved by the label's type; a label that cannot serve it is a
    one-line error."""
    task, label = config.data.task, config.data.label
    if task == "lm":
        return task
    kind = "classify" if info.label_kind == "int" else "regress"
    if task not in ("auto", kind):
        wanted = "an integer" if task == "classify" else "a floating"
        raise ConfigError(
            f'data.task = "{task}" needs {wanted} label column; data.train\'s {label!r} is '
            f"{'integer' if kind == 'classify' else 'floating'}"
        )
    if kind == "regress" and config.checkpoint.metric == "val_accuracy":
        raise ConfigError("checkpoint.metric='val_accuracy' needs integer (class) labels")
    return kind


def _out_features(
    config: Config, task: str, train: DatasetInfo, val: DatasetInfo | None, manifest: dict
) -> int:
    """Classes (model.num_classes, or max label + 1, or the prepared folder's count: a class
    may have no row in these splits), the vocabulary (lm), or 1."""
    if task == "regress":
        return 1
    if task == "lm":
        seen = max(i.value_range[1] for i in (train, val) if i is not None and i.value_range) + 1
        vocab = config.model.num_classes or manifest.get("vocab_size") or seen
        if vocab < seen:
            raise ConfigError(
                f"the vocabulary has {vocab} tokens but data.train's token ids go up to {seen - 1}"
            )
        return vocab
    seen = max(train.num_classes, val.num_classes if val else 0)
    classes = config.model.num_classes or max(seen, manifest.get("num_classes") or 0)
    if classes < seen:
        raise ConfigError(f"model.num_classes={classes} but the labels go up to {seen - 1}")
    return classes


def _check_model_fits(config: Config, inputs: Inputs, info: DatasetInfo) -> None:
    """The built-in models against the data's shape and task, in one line before Ray starts."""
    from raymb.schema import describe_shape

    name, shape, rows = config.model.name, inputs.shape, describe_shape(info, config.data.features)
    if inputs.task == "lm" and (len(shape) != 1 or shape[0] < 2):
        raise ConfigError(
            f'data.task = "lm" needs blocks of at least 2 token ids; data.train has {rows}'
        )
    if inputs.task == "lm" and name in ("linear", "mlp", "cnn"):
        raise ConfigError(
            f'model.name = {name} does not take token ids (data.task = "lm"): use gpt'
        )
    if name == "cnn" and len(shape) != 3:
        raise ConfigError(f"model.name = cnn needs image rows [C, H, W]; data.train has {rows}")
    if name == "gpt":
        if inputs.task != "lm":
            raise ConfigError('model.name = gpt needs data.task = "lm" (token blocks)')
        block = config.model.block_size
        if block is not None and block < inputs.model_shape[0]:
            raise ConfigError(
                f"model.block_size={block} is shorter than data.train's blocks "
                f"({inputs.model_shape[0]} tokens of input per row): raise it or unset it"
            )
    if inputs.mean is not None and len(inputs.mean) != shape[0]:
        raise ConfigError(
            f"data.mean has {len(inputs.mean)} values; data.train's rows have {shape[0]} "
            f"channels ({rows})"
        )


def connect(config: Config, address: str | None) -> float:
    """Start a local Ray cluster or join one; return the logical CPUs to give each worker.

    A worker holding every CPU starves Ray Data's read tasks and the run waits forever, so
    the workers together leave at least one CPU free.
    """
    import ray

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
    run_dir = check_run_dir(config)  # before the data checks: no torch needed
    plan, train_info, val_info = prepare(config)
    lock = runs.lock_run(run_dir)
    try:
        return _train(config, address, lock, plan, train_info, val_info)
    finally:
        lock.release()  # on failure and Ctrl-C too


def _train(
    config: Config,
    address: str | None,
    lock: RunLock,
    plan: Plan,
    train_info: DatasetInfo,
    val_info: DatasetInfo | None,
) -> Result:
    """The run, once its directory is held."""
    from raymb.checkpoint import claim_run
    from raymb.schema import describe_shape

    run_dir, fresh = lock.run_dir, lock.created
    try:
        claim_run(run_dir, config)  # a resumed run must fit its checkpoints
        cpus = connect(config, address)  # Ray from here on, not before the last refusal
        from raymb.loop import train_loop

        mark(run_dir, "running")
        tracker = start_tracking(config, run_dir, resumed=not fresh)
        cached = use_cache(config, [train_info, val_info])
        print(
            f"raymb: data.train: {train_info.num_rows} rows, "
            f"{describe_shape(train_info, config.data.features)}, task {plan.inputs['task']}",
            flush=True,
        )
        loop_config = {
            "config": config.to_dict(),
            "plan": plan.to_dict(),
            "tokenizer": tokenizer_spec(config),
            "train": data_spec(train_info, config, cached),
            "val": data_spec(val_info, config, cached, "data.val") if val_info else None,
            "run_dir": run_dir,
        }
        trainer = make_trainer(config, train_loop, loop_config, cpus, run_dir)
    except BaseException:
        lock.discard()  # a new run that never started leaves nothing; an older one is kept
        raise
    import ray.train

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
            left = None
            if fresh and latest is None:
                left = lock.discard()
            else:
                mark_failed(run_dir, bad_data)
            # The data error is the news; a run directory that would not go is a footnote.
            note = f" ({run_dir} is left: {left})" if left else ""
            raise DataError(f"{bad_data}{note}") from None
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
    from raymb.checkpoint import MODEL_FILE

    files = {"summary.json": run_dir / "summary.json"}
    if summary.get("best_checkpoint"):
        files[MODEL_FILE] = storage.resolve(summary["best_checkpoint"])
    tracker.finish(summary=summary, status="FINISHED", files=files)


def mark_failed(run_dir: Location, error: str) -> None:
    """status.json says failed, unless the store is what failed: the error at hand is the news."""
    try:
        mark(run_dir, "failed", error=error)
    except (StorageError, OSError):
        pass


def check_run_dir(config: Config) -> Location:
    """The run directory, checked before anything is written (the storage path's place, the
    name, no other driver holding it); the lock is taken later, by raymb.runs.lock_run."""
    storage.configure(config.storage)  # the endpoint of s3:// runs
    run_dir = run_location(config)
    runs.check_unlocked(run_dir)
    return run_dir


def run_location(config: Config) -> Location:
    """<run.storage_path>/<run.name>: a local directory or a prefix in an object store, always
    directly inside the storage path. Only checked, nothing written: a storage path that is a
    file, or a name that is not one plain name (the config refuses those first), is one line."""
    root = storage.resolve(config.run.storage_path, what="run.storage_path")
    try:
        run_dir = root.child(config.run.name)
    except ValueError:
        name = config.run.name
        raise ConfigError(f"run.name must be a plain folder name (got {name!r})") from None
    root.check_can_hold("run.storage_path")
    if run_dir.is_file():
        raise StorageError(run_dir.uri, "is a file, not a run directory: use another run.name")
    return run_dir


def tokenizer_spec(config: Config) -> dict | None:
    """The tokenizer of a prepared text folder, to keep with the model (raymb sample)."""
    found = find_manifest(config.data.train) if config.data.task == "lm" else None
    if found is None or not found[1].get("tokenizer"):
        return None
    from raymb.data.tokenizer import load_tokenizer

    return load_tokenizer(found[0]).spec


def use_cache(config: Config, infos: list[DatasetInfo | None]) -> bool:
    """data.cache, with "auto" resolved against what the cluster holds."""
    import ray

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
) -> dict[str, Any]:
    """What a worker needs to read a dataset (raymb.feed): the materialized blocks, or the
    files to stream."""
    from raymb.columns import column_names

    label = config.data.label_column
    columns = column_names(config.data.features, label)
    features = columns[: len(columns) - (label is not None)]
    spec = {
        "cached": cached,
        "shuffle": config.data.shuffle,
        "seed": config.train.seed,
        "file_rows": list(info.file_rows),
        "files": list(info.files),
        "filesystem": info.filesystem,
        "columns": columns,
        "what": what,
        "scan": features,  # check_dataset read the labels
        "shuffle_buffer": max(4096, 4 * _step_rows(config, info)),
    }
    if cached:
        import ray.data

        # Blocks in file order: the row indices of raymb.order are positions in the files.
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        dataset = ray.data.read_parquet(list(info.files), filesystem=info.filesystem)
        dataset = dataset.select_columns(columns).materialize()
        spec["refs"] = dataset.to_arrow_refs()
    return spec


def _step_rows(config: Config, info: DatasetInfo) -> int:
    G = config.train.global_batch_size
    return info.num_rows if G == "all" else G


def make_trainer(config: Config, loop, loop_config: dict, cpus: float, run_dir: Location):
    """The TorchTrainer of a run: its workers, storage, failures, checkpoints. Each worker
    writes its checkpoint files straight to run_dir's filesystem (Ray Train's upload)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raymb.worker import POLL_ENV, POLL_S

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
    from raymb.checkpoint import MODEL_FILE

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
    from raymb.checkpoint import MODEL_FILE

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
