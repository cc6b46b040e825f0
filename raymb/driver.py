"""The driver: checks inputs, starts or joins Ray, runs the workers, writes the run's results.

Everything a user can get wrong is checked here before Ray starts, so a bad config or bad
data costs a one-line error and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from raymb import plot, progress
from raymb.checkpoint import claim_run
from raymb.columns import column_names
from raymb.config import Config
from raymb.errors import ConfigError, DataError, RaymbError
from raymb.loop import train_loop
from raymb.plan import Plan
from raymb.schema import DatasetInfo, check_dataset
from raymb.worker import POLL_ENV, POLL_S

CACHE_SHARE = 0.25
"""data.cache = "auto" caches when the data takes at most this share of Ray's object store
and of the memory Ray may use."""


@dataclass(frozen=True)
class Result:
    """What a finished run leaves: its directory and the contents of summary.json."""

    run_dir: Path
    summary: dict[str, Any]

    @property
    def checkpoint(self) -> str | None:
        return self.summary["checkpoint"]


def prepare(config: Config) -> tuple[Plan, Any, Any]:
    """Check the data against the config; nothing is started or written."""
    features, label = config.data.features, config.data.label
    # The feature values are checked by the workers' first read (raymb.feed).
    train_info = check_dataset(
        config.data.train, features, label, what="data.train", scan_features=False
    )
    val_info = None
    if config.data.val is not None:
        val_info = check_dataset(
            config.data.val, features, label, what="data.val", scan_features=False
        )
        if (val_info.num_features, val_info.label_kind) != (
            train_info.num_features,
            train_info.label_kind,
        ):
            raise ConfigError(
                f"data.val has {val_info.num_features} features and {val_info.label_kind} labels; "
                f"data.train has {train_info.num_features} and {train_info.label_kind}"
            )
    if config.checkpoint.metric.startswith("val_") and val_info is None:
        raise ConfigError(
            f"checkpoint.metric={config.checkpoint.metric!r} needs data.val; set data.val "
            "or checkpoint.metric=train_loss"
        )
    classes = None
    if train_info.label_kind == "int":
        seen = max(train_info.num_classes, val_info.num_classes if val_info else 0)
        classes = config.model.num_classes or seen
        if classes < seen:
            raise ConfigError(f"model.num_classes={classes} but the labels go up to {seen - 1}")
    elif config.checkpoint.metric == "val_accuracy":
        raise ConfigError("checkpoint.metric='val_accuracy' needs integer (class) labels")
    plan = Plan.build(
        config,
        num_rows=train_info.num_rows,
        in_features=train_info.num_features,
        num_classes=classes,
    )
    return plan, train_info, val_info


def connect(config: Config, address: str | None) -> float:
    """Start a local Ray cluster or join one; return the logical CPUs to give each worker.

    A worker holding every CPU starves Ray Data's read tasks and the run waits forever, so
    the workers together leave at least one CPU free.
    """
    W = config.scale.workers
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
    storage = str(Path(config.run.storage_path).expanduser().resolve())
    run_dir = Path(storage) / config.run.name
    fresh = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    claim_run(run_dir, config)  # a resumed run must fit its checkpoints
    cpus = connect(config, address)
    cached = use_cache(config, [train_info, val_info])
    loop_config = {
        "config": config.to_dict(),
        "plan": plan.to_dict(),
        "train": data_spec(train_info, config, cached),
        "val": data_spec(val_info, config, cached, "data.val") if val_info else None,
        "run_dir": str(run_dir),
    }
    trainer = make_trainer(config, train_loop, loop_config, cpus, run_dir)
    started = time.perf_counter()
    try:
        with progress.watch(run_dir / "metrics.csv", plan.total_steps):
            result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        latest = latest_checkpoint(run_dir)
        bad_data = _data_error(e)
        if bad_data is not None:  # found by the workers' first read: nothing to keep
            if fresh and latest is None:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise DataError(bad_data) from None
        kept = (
            f"latest checkpoint: {latest} (run again with run.name={config.run.name!r} to resume)"
            if latest
            else "no checkpoint was written"
        )
        raise RaymbError(f"training failed: {_first_line(e)} ({kept})") from e
    wall = time.perf_counter() - started
    summary = _summary(result, wall, config)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot.write_run_plot(run_dir)
    return Result(run_dir=run_dir, summary=summary)


def use_cache(config: Config, infos: list[DatasetInfo | None]) -> bool:
    """data.cache, with "auto" resolved against what the cluster holds."""
    if config.data.cache != "auto":
        return bool(config.data.cache)
    size = sum(i.bytes for i in infos if i is not None)
    resources = ray.cluster_resources()
    room = min(resources.get("object_store_memory", 0), resources.get("memory", 0))
    # Each worker also keeps the rows as float32 tensors.
    rows = sum(i.num_rows * (i.num_features + 2) * 4 for i in infos if i is not None)
    return size <= CACHE_SHARE * room and rows * config.scale.workers <= CACHE_SHARE * room


def data_spec(
    info: DatasetInfo, config: Config, cached: bool, what: str = "data.train"
) -> dict[str, Any]:
    """What a worker needs to read a dataset (raymb.feed): the materialized blocks, or the
    files to stream."""
    columns = column_names(config.data.features, config.data.label)
    spec = {
        "cached": cached,
        "shuffle": config.data.shuffle,
        "seed": config.train.seed,
        "file_rows": list(info.file_rows),
        "files": list(info.files),
        "filesystem": info.filesystem,
        "columns": columns,
        "what": what,
        "scan": columns[:-1],  # the features: check_dataset read the labels
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


def make_trainer(config: Config, loop, loop_config: dict, cpus: float, run_dir: Path):
    """The TorchTrainer of a run: its workers, storage, failures, checkpoints."""
    # Ray passes the setting on to the controller that fit() starts.
    os.environ.setdefault(POLL_ENV, str(POLL_S))
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.scale.workers,
            use_gpu=config.scale.use_gpu,
            resources_per_worker={"CPU": cpus} if not config.scale.use_gpu else None,
        ),
        run_config=ray.train.RunConfig(
            name=config.run.name,
            storage_path=str(run_dir.parent),
            failure_config=ray.train.FailureConfig(max_failures=config.scale.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.checkpoint.keep,
                checkpoint_score_attribute=config.checkpoint.metric,
                checkpoint_score_order=config.checkpoint.mode,
            ),
        ),
    )


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint directory of a run (Ray names them by time)."""
    done = [d for d in run_dir.glob("checkpoint_*") if (d / "state.pt").is_file()]
    return max(done, key=lambda d: d.name) if done else None


def _best_checkpoint(result, config: Config) -> str | None:
    scored = [
        (m[config.checkpoint.metric], c.path)
        for c, m in (result.best_checkpoints or [])
        if m.get(config.checkpoint.metric) is not None
    ]
    if not scored:
        return None
    pick = min if config.checkpoint.mode == "min" else max
    return pick(scored)[1] + "/model.pt"


def _summary(result, wall_s: float, config: Config) -> dict[str, Any]:
    m = result.metrics or {}
    final = result.checkpoint.path + "/model.pt" if result.checkpoint else None
    best = _best_checkpoint(result, config) or final
    stopped_early = bool(m.get("stopped_early"))
    return {
        "train_loss": m.get("train_loss"),
        "val_loss": m.get("val_loss"),
        "val_accuracy": m.get("val_accuracy"),
        "steps": m.get("step", 0),
        "samples": m.get("samples", 0),
        "samples_per_s": m["samples"] / m["train_seconds"] if m.get("train_seconds") else None,
        "wall_s": round(wall_s, 3),
        "checkpoint": best if stopped_early else final,
        "best_checkpoint": best,
        "resumed_from_steps": m.get("resumed_from_steps", []),
        "bytes_allreduced": m.get("bytes_allreduced", 0),
        "skipped_steps": m.get("skipped_steps", 0),
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
