"""Every check before Ray starts: the config against the data, the model against its rows.

Nothing here starts Ray or writes a file, so a bad config or bad data costs a one-line error
and leaves nothing behind, in well under the 2 s a refusal may take.
"""

from __future__ import annotations

from raymb.config import Config
from raymb.core.plan import Plan
from raymb.data.checks import DatasetInfo, check_dataset, describe_shape
from raymb.data.columns import Inputs
from raymb.data.manifest import find_manifest
from raymb.errors import ConfigError
from raymb.rundir import storage
from raymb.rundir.storage import Location
from raymb.rundir.tracking import mlflow_target


def prepare(config: Config) -> tuple[Plan, DatasetInfo, DatasetInfo | None]:
    """Check the data against the config; nothing is started or written."""
    storage.configure(config.storage)  # the endpoint of s3:// data and runs
    mlflow_target(config.log.mlflow_uri)  # asked for, and installed
    data = config.data
    label = data.label_column
    # The feature values are checked by the workers' first read (raymb.worker.feed).
    train_info = check_dataset(
        data.train, data.features, label, what="data.train", scan_features=False, task=data.task
    )
    val_info = None
    if data.val is not None:
        val_info = check_dataset(
            data.val, data.features, label, what="data.val", scan_features=False, task=data.task
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


def run_location(config: Config) -> Location:
    """<run.storage_path>/<run.name>: a local directory or a prefix in an object store."""
    root = storage.resolve(config.run.storage_path, what="run.storage_path")
    return root / config.run.name


def tokenizer_spec(config: Config) -> dict | None:
    """The tokenizer of a prepared text folder, to keep with the model (raymb sample)."""
    found = find_manifest(config.data.train) if config.data.task == "lm" else None
    if found is None or not found[1].get("tokenizer"):
        return None
    from raymb.data.tokenizer import load_tokenizer

    return load_tokenizer(found[0]).spec
