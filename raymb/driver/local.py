"""`raymb train --local` (scale.launcher = "local"): raymb's epoch loop on a plain
torch.distributed group of processes on this machine, with no Ray.

The same checks, plan, loop, steps, sync, metrics and checkpoints as on Ray; the data is read
here with pyarrow, in file order as Ray's cache holds it, and handed to every process whole (a
TorchSession's cache); the checkpoints land in `<run dir>/checkpoint_<step>/`, and either
launcher resumes from the newest checkpoint of the run, whichever wrote it
(raymb.worker.session). raymb.driver.run drives a run through `LocalFit` as it drives Ray
Train's fit(); `train_torch` is the loop alone (no lock, progress or summary), for the
numerics tests and the GPU checks, which must drive the real loop on a machine without Ray.

No torch and no Ray here: the processes import torch themselves (raymb.driver.launch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raymb.config import Config
from raymb.data.checks import DatasetInfo, read_blocks
from raymb.data.columns import column_names
from raymb.driver.launch import TorchGroup, WorkerFailed, epochs_process, run_torch
from raymb.driver.preflight import prepare, run_location, tokenizer_spec
from raymb.errors import ConfigError
from raymb.rundir.checkpoint import MODEL_FILE
from raymb.rundir.runs import Saved, newest_checkpoint, saved_checkpoints
from raymb.storage import Location
from raymb.worker.spec import DataSpec, EpochsSpec, validation

__all__ = [
    "LocalFit",
    "LocalResult",
    "WorkerFailed",
    "check_local",
    "local_spec",
    "notice",
    "train_torch",
]


def check_local(config: Config) -> None:
    """What --local cannot do, refused in one line before anything starts."""
    if "://" in config.run.storage_path:
        raise ConfigError(
            f"run.storage_path={config.run.storage_path!r}: --local (scale.launcher = "
            '"local") keeps runs on this machine; a run in an object store trains on Ray'
        )
    if config.data.cache is False:
        raise ConfigError(
            '--local (scale.launcher = "local") reads the data into memory: data.cache = '
            "false (streamed every epoch) trains on Ray"
        )


def notice(config: Config) -> str:
    """The line a --local run starts with."""
    W = config.scale.max_workers
    return (
        f"raymb: --local: {W} process{'' if W == 1 else 'es'} on this machine, no Ray (a worker "
        "that fails ends the run; failure restarts need Ray)"
    )


def backend_of(config: Config) -> str:
    return "nccl" if config.scale.use_gpu else "gloo"


def local_spec(
    config: Config,
    prepared: tuple[Any, DatasetInfo, DatasetInfo | None] | None = None,
    run_dir: Location | None = None,
    code: Any = None,
) -> EpochsSpec:
    """The spec `raymb train` would send its workers, with the data cached from this process.
    `prepared`: raymb.driver.preflight.prepare's answer, when the caller has it already;
    `code`: raymb.driver.custom.custom_code's (default: the config's own, dry-run here)."""
    plan, train_info, val_info = prepared or prepare(config)
    if code is None:
        from raymb.driver.custom import custom_code

        code = custom_code(config, plan, train_info)
    columns = tuple(column_names(config.data.reads, config.data.label_column))

    def cached(info: DatasetInfo, what: str) -> DataSpec:
        blocks = read_blocks(info.files, columns, info.filesystem, what)
        return DataSpec.of(info, config, what=what, blocks=blocks)

    train = cached(train_info, "data.train")
    val = cached(val_info, "data.val") if val_info else None
    return EpochsSpec(
        config=config,
        plan=plan,
        run_dir=run_dir or run_location(config),
        train=train,
        val=validation(config, train, val),
        tokenizer=tokenizer_spec(config),
        code=code,
    )


def train_torch(config: Config, *, backend: str | None = None) -> Path:
    """Train as configured on scale.workers local processes; return the final model.pt (the
    loop alone: no lock, progress, summary or status)."""
    spec = local_spec(config)
    run_dir = Path(spec.run_dir.path)
    run_dir.mkdir(parents=True, exist_ok=True)
    world = config.scale.max_workers
    run_torch(epochs_process, (spec,), world, backend=backend or backend_of(config))
    latest = newest_checkpoint(spec.run_dir)
    if latest is None:
        raise RuntimeError(f"{run_dir}: the run wrote no checkpoint")
    return Path(latest.path) / MODEL_FILE


@dataclass(frozen=True)
class LocalResult:
    """What raymb.driver.run reads of Ray Train's Result, for a --local run: the last
    report's metrics, the run's newest checkpoint and its kept ones with their metrics."""

    metrics: dict[str, Any] | None
    checkpoint: Saved | None
    best_checkpoints: list[tuple[Saved, dict[str, Any]]] = field(default_factory=list)


class LocalFit:
    """A --local run's processes, as raymb.driver.run runs Ray Train's fit(): `fit()` starts
    them and waits on the calling (main) thread, where the stop signals are handled."""

    def __init__(self, config: Config, spec: EpochsSpec) -> None:
        self.config, self.spec = config, spec
        self.group = TorchGroup(
            epochs_process, (spec,), config.scale.max_workers, backend=backend_of(config)
        )

    def fit(self) -> LocalResult:
        self.group.start()
        metrics = self.group.wait()
        kept = saved_checkpoints(self.spec.run_dir)
        newest = kept[-1] if kept else None
        return LocalResult(metrics, newest, [(c, c.metrics) for c in kept])
