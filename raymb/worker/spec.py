"""What crosses from the driver to the workers: frozen, typed specs instead of payload dicts.

The driver (raymb.driver.run) builds them after every check; the loops (raymb.worker.epochs and
raymb.worker.follow) read them. A spec holds only what a worker cannot work out itself, and
nothing that reads the disk when it is built on the worker side.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from raymb.config import Config
from raymb.core.plan import Plan
from raymb.core.shape import InputShape
from raymb.data.checks import DatasetInfo
from raymb.data.columns import column_names
from raymb.storage import Location


@dataclass(frozen=True)
class Shape:
    """What the model is built for and what a checkpoint records of it: its inputs, and its
    outputs (classes, the vocabulary, or 1)."""

    inputs: InputShape
    out_features: int
    tokenizer: dict | None = None
    """lm: the tokenizer's spec (raymb.data.tokenizer), kept with the model for sampling."""

    @property
    def in_features(self) -> int:
        return self.inputs.in_features

    @property
    def classify(self) -> bool:
        return self.inputs.classify


@dataclass(frozen=True)
class Code:
    """What raymb.train(model=..., loss=..., metrics=...) was given from Python, cloudpickled
    on the driver (closures too, as Ray carries a training function; the --local launcher's
    processes unpickle them alike), and the metric names the driver's dry run found."""

    model: bytes | None = None
    loss: bytes | None = None
    metrics: bytes | None = None
    metric_names: tuple[str, ...] = ()

    def load(self, which: str) -> Any:
        """The callable (or module) given as `which`, or None."""
        data = getattr(self, which)
        if data is None:
            return None
        import cloudpickle

        return cloudpickle.loads(data)


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """How a worker reads one dataset (raymb.worker.feed): cached blocks, or files to stream."""

    cached: bool
    files: tuple[str, ...]
    file_rows: tuple[int, ...]
    filesystem: Any = field(repr=False)
    columns: tuple[str, ...]
    """Feature columns, then the label column (if any)."""
    scan: tuple[str, ...]
    """Feature columns whose values the first read checks (the driver read the labels)."""
    what: str
    """data.train or data.val: how errors name the set."""
    shuffle: str
    seed: int
    shuffle_buffer: int
    blocks: tuple = ()
    """Cached: the set in file order, as Ray object refs (RaySession) or pyarrow Tables
    (TorchSession); the session's fetch turns them into Tables."""
    folds: int = 0
    fold: int = 0
    """data.folds, data.fold: train on the rows fold `fold` keeps (raymb.core.order.fold_rows)."""
    held_out: bool = False
    """With folds: this spec reads the fold's held-out rows instead (its validation)."""

    @classmethod
    def of(
        cls,
        info: DatasetInfo,
        config: Config,
        *,
        what: str = "data.train",
        blocks: tuple | None = None,
    ) -> DataSpec:
        """The spec of a checked dataset; `blocks`: its cached blocks (None: streamed)."""
        label = config.data.label_column
        named = config.data.named
        columns = tuple(column_names(config.data.reads, label))
        G = config.train.global_batch_size
        step_rows = info.num_rows if G == "all" else G
        return cls(
            cached=blocks is not None,
            files=tuple(info.files),
            file_rows=tuple(info.file_rows),
            filesystem=info.filesystem,
            columns=columns,
            scan=columns[: len(columns) - (label is not None)]
            if named is None
            else tuple(c for c in columns if c != named.label),
            what=what,
            shuffle=config.data.shuffle,
            seed=config.train.seed,
            shuffle_buffer=max(4096, 4 * step_rows),
            blocks=tuple(blocks or ()),
            folds=config.data.folds,
            fold=config.data.fold,
        )


def validation(config: Config, train: DataSpec, val: DataSpec | None) -> DataSpec | None:
    """What validates: data.val's spec, or with data.folds the held-out rows of data.train."""
    if not config.data.folds:
        return val
    return replace(train, held_out=True, what=f"data.train (fold {config.data.fold})")


@dataclass(frozen=True, kw_only=True)
class EpochsSpec:
    """What `raymb train` hands each worker of the epoch loop."""

    config: Config
    plan: Plan
    run_dir: Location
    train: DataSpec
    val: DataSpec | None = None
    tokenizer: dict | None = None
    """lm: the tokenizer's spec (raymb.data.tokenizer), kept with the model for sampling."""
    code: Code = field(default_factory=Code)
    """The model, loss and metrics given from Python, and the metrics' names."""


@dataclass(frozen=True, kw_only=True)
class FollowSpec:
    """What `raymb train --follow DIR` hands each worker of the online loop."""

    config: Config
    shape: Shape
    """Fixed by the first file in DIR: every later file must fit it."""
    run_dir: Location
    val: DataSpec | None
    directory: str
    """DIR, as a path on its filesystem or a URI."""
    idle_timeout: float
    poll_s: float
    stop_file: Location


@dataclass(frozen=True, kw_only=True)
class LrFindSpec:
    """What `raymb lr-find` hands each worker (raymb.worker.lr_find): the epoch loop's spec,
    its run_dir <run.storage_path>/<run.name>-lr-find, and the rates to step at."""

    run: EpochsSpec
    lrs: tuple[float, ...]
