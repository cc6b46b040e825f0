"""Every check before Ray starts: the config against the data, the model against its rows.

Nothing here starts Ray or writes a file, so a bad config or bad data costs a one-line error
and leaves nothing behind, in well under the 2 s a refusal may take: the run directory is
checked first (its place, its name, no other driver holding it), before the data checks
import torch.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING

from raymb import storage
from raymb.config import CheckpointSection, Config, DataSection
from raymb.data.checks import MAX_CLASSES, DatasetInfo, check_dataset, describe_shape
from raymb.driver.report.tracking import mlflow_target
from raymb.errors import ConfigError, DataError, StorageError
from raymb.load import manifest
from raymb.rundir.lock import check_unlocked
from raymb.storage import Location

if TYPE_CHECKING:
    from raymb.core.plan import Plan
    from raymb.core.shape import InputShape
    from raymb.worker.spec import Shape


def prepare(config: Config) -> tuple[Plan, DatasetInfo, DatasetInfo | None]:
    """Check the data against the config; nothing is started or written."""
    from raymb.data.columns import input_shape
    from raymb.driver.sizing import build_plan

    mlflow_target(config.log.mlflow_uri)  # asked for, and installed
    data = config.data
    if data.task == "lm":  # the tokenizer file tokenizer_spec reads later: checked, not opened
        from raymb.data.tokenizer import tokenizer_file

        if (found := manifest(data.train)) is not None:
            tokenizer_file(*found)
    label = data.label_column
    # Without model.num_classes the labels size the model: one outlier must not.
    max_classes = MAX_CLASSES if config.model.num_classes is None else None
    # The feature values are checked by the workers' first read (raymb.worker.feed).
    checks = dict(scan_features=False, task=data.task, max_classes=max_classes)
    if data.named is not None:
        from raymb.data.named import check_named

        check = lambda path, what: check_named(path, data.named, what=what, max_classes=max_classes)  # noqa: E731
    else:
        check = lambda path, what: check_dataset(path, data.features, label, what=what, **checks)  # noqa: E731
    train_info = check(data.train, "data.train")
    val_info = None
    if data.val is not None:
        val_info = check(data.val, "data.val")
        if (val_info.feature_shape, val_info.label_kind, val_info.columns) != (
            train_info.feature_shape,
            train_info.label_kind,
            train_info.columns,
        ):
            raise ConfigError(
                f"data.val has {describe_shape(val_info, data.features)} and "
                f"{val_info.label_kind} labels; data.train has "
                f"{describe_shape(train_info, data.features)} and {train_info.label_kind}"
            )
    _check_folds(data, train_info)
    if config.checkpoint.metric.startswith("val_") and val_info is None and not data.folds:
        raise ConfigError(
            f"checkpoint.metric={config.checkpoint.metric!r} needs data.val; set data.val "
            "or checkpoint.metric=train_loss"
        )
    inputs = input_shape(data, _task(config, train_info), train_info.feature_shape)
    if data.named is not None:
        named_shapes = tuple((name, shape) for name, shape, _ in train_info.columns)
        inputs = dataclasses.replace(inputs, columns=named_shapes)
    check_zero_padding(data.augment, inputs.shape)
    _check_model_fits(config, inputs, train_info)
    found = manifest(data.train)
    num_rows = train_info.num_rows
    if data.folds:  # a fold trains on the rows it does not hold out (raymb.core.order)
        from raymb.core.order import held_out_count

        num_rows -= held_out_count(num_rows, data.folds, data.fold)
    plan = build_plan(
        config,
        num_rows=num_rows,
        inputs=inputs,
        out_features=_out_features(
            config, inputs.task, train_info, val_info, found[1] if found else {}
        ),
    )
    return plan, train_info, val_info


def _check_folds(data: DataSection, train: DatasetInfo) -> None:
    """data.folds against data.train's rows: fold f holds out the rows f, f + k, ... of the
    permutation, so with more folds than rows some fold validates on none (val_loss null)."""
    if data.folds and data.folds > train.num_rows:
        raise ConfigError(
            f"data.folds={data.folds} is more than data.train's {train.num_rows} rows: a fold "
            f"would hold out no rows to validate on; set data.folds to at most {train.num_rows}"
        )


def check_zero_padding(augment, shape: tuple[int, ...]) -> None:
    """data.augment.crop_padding with padding_mode = "zero" against the images, as reflect
    padding is bounded (raymb.data.columns.check_augment): a padding as large as the image
    crops windows of padding alone, and a huge one (1e9) is an allocation the workers fail on
    after Ray has started."""
    P = augment.crop_padding
    if P and augment.padding_mode == "zero" and len(shape) == 3 and P >= min(shape[1:]):
        raise ConfigError(
            f'data.augment.crop_padding={P} with padding_mode = "zero" must be smaller than '
            f"the images' {shape[1]}x{shape[2]} pixels (a window would hold no pixel of the "
            "image): lower it"
        )


def _task(config: Config, info: DatasetInfo) -> str:
    """data.task, with "auto" resolved by the label's type; a label that cannot serve it is a
    one-line error."""
    task, label = config.data.task, config.data.label
    if task == "lm":
        return task
    bce = config.loss.name == "bce"
    own = ":" in config.loss.name  # a loss of your own reads its targets as it likes
    if info.label_kind == "multi" and not bce and not own:
        raise ConfigError(
            f'data.label {label!r} is a list column (multi-label): set loss.name = "bce" '
            "(binary cross-entropy with logits), or use a loss of your own"
        )
    if bce and info.label_kind == "int":
        raise ConfigError(
            f'loss.name = "bce" needs 0/1 targets as floats or a fixed-length list of them; '
            f"data.label {label!r} holds integer classes: use cross_entropy"
        )
    kind = "classify" if info.label_kind in ("int", "multi") else "regress"
    if config.loss.name == "mse" and kind == "classify":
        raise ConfigError(f'loss.name = "mse" needs a floating label; {label!r} holds classes')
    if config.loss.name == "cross_entropy" and kind == "regress":
        raise ConfigError(
            f'loss.name = "cross_entropy" needs integer classes; {label!r} is floating'
        )
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
    if train.label_kind == "multi":
        return train.num_classes  # one logit per target of the list
    if task == "regress" or config.loss.name == "bce":
        return config.model.num_classes or 1
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


def _check_model_fits(config: Config, inputs: InputShape, info: DatasetInfo) -> None:
    """The built-in models against the data's shape and task, in one line before Ray starts."""
    name, shape, rows = config.model.name, inputs.shape, describe_shape(info, config.data.features)
    if inputs.columns is not None:
        return  # the model given for named inputs: raymb.driver.custom
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


def check_run_dir(config: Config) -> Location:
    """The run directory, checked before anything is written (the storage path's place, the
    name, no other driver holding it); the lock is taken later, by raymb.rundir.lock.lock_run."""
    storage.configure(config.storage.endpoint_url, config.storage.region)  # s3:// runs, data
    run_dir = run_location(config)
    check_unlocked(run_dir)
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
    found = manifest(config.data.train) if config.data.task == "lm" else None
    if found is None or not found[1].get("tokenizer"):
        return None
    from raymb.data.tokenizer import load_tokenizer

    return load_tokenizer(found[0], found).spec


# --follow DIR: what the first file fixes, and what --follow does not take yet.


def prepare_follow(
    config: Config, directory: str | Path, idle_timeout: float
) -> tuple[Config, Shape, DatasetInfo | None, str]:
    """Check a --follow run before Ray starts; wait for DIR's first complete file, which fixes
    the model's widths. Returns (the config as --follow runs it, the model's shape, data.val's
    info, DIR as the workers open it)."""
    from raymb.data.arrivals import check_fits, open_directory

    config = without_demo_val(config)
    check_follow_config(config, idle_timeout)
    fs, root = open_directory(directory)
    location = root if "://" not in str(directory) else str(directory)
    val_info = None
    if config.data.val is not None:
        val_info = check_dataset(
            config.data.val, config.data.features, config.data.label, what="data.val"
        )
    first = wait_for_first_file(fs, root, idle_timeout, str(directory))
    info = check_dataset(
        f"{location.rstrip('/')}/{first}", config.data.features, config.data.label, what="--follow"
    )
    shape = follow_shape(config, info, first)
    if val_info is not None:
        check_fits(val_info, shape, what="data.val")
    return config, shape, val_info, location


def without_demo_val(config: Config) -> Config:
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


def check_follow_config(config: Config, idle_timeout: float) -> None:
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


def wait_for_first_file(fs, root: str, idle_timeout: float, shown: str) -> str:
    """Any complete file (consumed or not): it fixes the model's input and output widths."""
    from raymb.data.arrivals import next_file

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


def follow_shape(config: Config, info: DatasetInfo, name: str) -> Shape:
    """What the first file in DIR fixes of the model: its input and output widths."""
    from raymb.data.arrivals import check_fits
    from raymb.data.columns import input_shape
    from raymb.worker.spec import Shape

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
    inputs = input_shape(config.data, "classify" if classify else "regress", info.feature_shape)
    check_zero_padding(config.data.augment, inputs.shape)
    shape = Shape(inputs, config.model.num_classes if classify else 1)
    check_fits(info, shape, what=f"--follow: {name}")
    return shape
