"""`raymb eval`: a saved model's loss and accuracy on a parquet set, in this process.

A batch's sums are raymb.core.loss.batch_sums, as in the workers' validation pass: `evaluate`
adds them up across the files of a dataset.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raymb.config import Config
from raymb.core.loss import batch_sums, lm_metrics
from raymb.data.checks import DatasetInfo, check_dataset
from raymb.data.columns import table_to_tensors
from raymb.errors import DataError
from raymb.tools.load import load_model, payload_inputs


def evaluate(
    checkpoint: str, data: str, batch_rows: int = 65536, *, trust_model_code: bool = False
) -> dict[str, Any]:
    """Mean loss over every row (and accuracy for classifiers; per token, with perplexity
    and bits per byte, for a language model). A custom model factory runs only with
    `trust_model_code` (raymb.checkpoint.load_model)."""
    model, payload = load_model(checkpoint, trust_model_code=trust_model_code)
    config = Config.from_saved(payload["config"])
    inputs = payload_inputs(payload)
    label = config.data.label_column
    info = check_dataset(data, config.data.features, label, what="--data", task=inputs.task)
    check_fits(info, payload, data)
    classify = payload["classify"]
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    for _, batch in read_batches(info, batch_rows):
        x, y = inputs.collate(*table_to_tensors(batch, config.data.features, label))
        sums += batch_sums(model, x, y, classify)
    loss, hits, rows = sums.tolist()
    result = {"loss": loss / rows, "accuracy": hits / rows if classify else None}
    if inputs.task == "lm":
        extra = lm_metrics(loss / rows, inputs.task, payload.get("tokenizer"))
        result.update({k.removeprefix("val_"): v for k, v in extra.items()})
        result["tokens"] = int(rows)
        rows = info.num_rows
    return {**result, "rows": int(rows)}


def check_fits(info: DatasetInfo, payload: dict[str, Any], data: str) -> None:
    """The data has the model's feature shape and, if labelled, its kind of label."""
    inputs = payload_inputs(payload)
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
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
                yield path, pa.Table.from_batches([batch])  # what table_to_tensors reads
