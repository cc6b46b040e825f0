"""`raymb eval`: a saved model's loss and accuracy on a parquet set, in this process.

A batch's sums are raymb.core.objective.Objective.sums, as in the workers' validation pass:
the run's loss (a built-in, or loss.name's own, sum / count), accuracy and metrics.name's
metrics; `evaluate` adds them up across the files of a dataset, so that it prints the
numbers the run's validation would on the same rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raymb.config import Config
from raymb.config.data import Named
from raymb.core import batch
from raymb.core.loss import lm_metrics
from raymb.core.objective import Objective, metric_names
from raymb.core.shape import InputShape
from raymb.data.checks import DatasetInfo, check_dataset
from raymb.data.columns import table_to_tensors
from raymb.errors import DataError, RaymbError
from raymb.rundir.checkpoint import first_sentence
from raymb.tools.load import load_model, payload_inputs

DRY_RUN_ROWS = 4
"""Rows of the first batch that metrics.name runs on to name its metrics, as the driver's."""


def evaluate(
    checkpoint: str, data: str, batch_rows: int = 65536, *, trust_model_code: bool = False
) -> dict[str, Any]:
    """Mean loss over every row (sum / count: per token, with perplexity and bits per byte,
    for a language model; per counted element for a counted loss), accuracy for classifiers
    and metrics.name's metrics (under "metrics"). Code the checkpoint names (model.name,
    loss.name, metrics.name) runs only with `trust_model_code` (raymb.tools.load)."""
    model, payload = load_model(checkpoint, trust_model_code=trust_model_code, objective=True)
    config = Config.from_saved(payload["config"])
    inputs = payload_inputs(payload)
    named = config.data.named
    label = config.data.label_column
    if named is None:
        info = check_dataset(data, config.data.features, label, what="--data", task=inputs.task)
    else:
        from raymb.data.named import check_named

        info = check_named(data, named, what="--data")
        check_columns(info, inputs, data)
    check_fits(info, payload, data, labelled=named is None or named.label in named.targets)
    objective = Objective.of(config, inputs.classify)
    model.eval()
    sums = None
    for _, table in read_batches(info, batch_rows):
        x, y = inputs.collate(*table_to_tensors(table, config.data.reads, label))
        try:
            if sums is None and objective.metrics is not None:  # named as the driver's dry run
                few_x, few_y = batch.part(x, 0, DRY_RUN_ROWS), batch.part(y, 0, DRY_RUN_ROWS)
                with torch.no_grad():
                    output = batch.forward(model, few_x)
                names = metric_names(objective.metrics, output, few_y, "metrics.name")
                objective.metric_names = names
            part = objective.sums(model, x, y)
        except RaymbError:
            raise
        except Exception as e:  # the model, loss or metrics are the user's code: one line
            raise RaymbError(
                f"--data: {data}: the model, loss or metrics raised {type(e).__name__}: "
                f"{first_sentence(e)}"
            ) from None
        sums = part if sums is None else sums + part
    if sums is None:
        sums = torch.zeros(4, dtype=torch.float64)
    loss, count, hits, predicted, *metrics = sums.tolist()
    result: dict[str, Any] = {
        "loss": loss / count if count else None,
        "accuracy": hits / predicted if predicted else None,
    }
    if objective.metric_names:
        result["metrics"] = {
            name: total / n if n else None
            for name, total, n in zip(objective.metric_names, metrics[0::2], metrics[1::2])
        }
    if inputs.task == "lm":
        extra = lm_metrics(result["loss"], inputs.task, payload.get("tokenizer"))
        result.update({k.removeprefix("val_"): v for k, v in extra.items()})
        result["tokens"] = int(count)
    elif objective.counted:
        result["count"] = count
    return {**result, "rows": int(info.num_rows)}


def check_named_inputs(data: str, inputs: InputShape, label: str) -> tuple[DatasetInfo, Named]:
    """The checked dataset of a model of named inputs, for predict and export (no target is
    read): each input column there, of the shape the model was trained on."""
    from raymb.data.named import check_named

    named = Named(tuple(name for name, _ in inputs.columns or ()), (), label)
    info = check_named(data, named, what="--data", read_label=False)
    check_columns(info, inputs, data)
    return info, named


def check_columns(info: DatasetInfo, inputs: InputShape, data: str) -> None:
    """Named inputs: each column the model takes has the shape it was trained on."""
    have = {name: shape for name, shape, _ in info.columns}
    for name, want in inputs.columns or ():
        if name in have and tuple(have[name]) != tuple(want):
            raise DataError(
                f"--data: {data} column {name!r} has rows of shape {list(have[name])}; the "
                f"model takes {list(want)}"
            )


def check_fits(
    info: DatasetInfo, payload: dict[str, Any], data: str, *, labelled: bool = True
) -> None:
    """The data has the model's feature shape and, if `labelled`, its kind of label (named
    inputs: check_columns checks their shapes)."""
    inputs = payload_inputs(payload)
    if inputs.columns is not None:
        if labelled:
            _check_label(info, payload, data)
        return
    if info.num_features != payload["in_features"] or (
        len(inputs.shape) > 1 and info.feature_shape != inputs.shape
    ):
        have = (
            f"{info.num_features} features per row"
            if len(info.feature_shape) == 1
            else f"rows of shape {list(info.feature_shape)}"
        )
        want = payload["in_features"] if len(inputs.shape) == 1 else list(inputs.shape)
        raise DataError(f"--data: {data} has {have}; the model takes {want}")
    if inputs.task == "lm":
        if info.value_range is not None and info.value_range[1] >= payload["out_features"]:
            raise DataError(
                f"--data: {data} has token ids up to {info.value_range[1]}; the model's "
                f"vocabulary has {payload['out_features']}"
            )
        return
    _check_label(info, payload, data)


def _check_label(info: DatasetInfo, payload: dict[str, Any], data: str) -> None:
    if info.label_kind in ("none", "multi"):  # no label read; 0/1 lists (bce)
        return
    classify = payload["classify"]
    if (info.label_kind == "int") != classify:
        raise DataError(
            f"--data: {data} has {info.label_kind} labels; the model is a "
            f"{'classifier (integer labels)' if classify else 'regressor (float labels)'}"
        )
    if classify and info.num_classes is not None and info.num_classes > payload["out_features"]:
        raise DataError(
            f"--data: {data} has labels up to {info.num_classes - 1}; the model has "
            f"{payload['out_features']} classes"
        )


def read_batches(info: DatasetInfo, batch_rows: int) -> Iterator[tuple[str, pa.Table]]:
    """(file, table of up to batch_rows rows) over every file of a dataset, in order."""
    for path in info.files:
        with info.filesystem.open_input_file(path) as f:
            for chunk in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
                yield path, pa.Table.from_batches([chunk])  # what table_to_tensors reads
