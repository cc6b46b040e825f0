"""`raymb eval`: a saved model's loss and accuracy on a parquet set, in this process.

`batch_sums` is the one definition of a validation batch's sums: the workers' validation
pass (raymb.loop) adds it up across workers, `evaluate` across the files of a dataset.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raymb.checkpoint import load_model
from raymb.columns import table_to_tensors
from raymb.config import Config
from raymb.errors import DataError
from raymb.models import correct, summed_loss
from raymb.schema import DatasetInfo, check_dataset


@torch.no_grad()
def batch_sums(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, classify: bool
) -> torch.Tensor:
    """(summed loss, correct predictions, rows) of one batch, as float64 on x's device."""
    out = model(x)
    hits = correct(out, y).double() if classify else torch.zeros((), dtype=torch.float64)
    return torch.stack(
        [
            summed_loss(out, y, classify).double(),
            hits.to(x.device),
            torch.tensor(float(len(y)), dtype=torch.float64, device=x.device),
        ]
    )


def evaluate(checkpoint: str, data: str, batch_rows: int = 65536) -> dict[str, Any]:
    """Mean loss over every row (and accuracy for classifiers)."""
    model, payload = load_model(checkpoint)
    config = Config.from_dict(payload["config"])
    info = check_dataset(data, config.data.features, config.data.label, what="--data")
    check_fits(info, payload, data)
    classify = payload["classify"]
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    for _, batch in read_batches(info, batch_rows):
        x, y = table_to_tensors(batch, config.data.features, config.data.label)
        sums += batch_sums(model, x, y, classify)
    loss, hits, rows = sums.tolist()
    return {"loss": loss / rows, "accuracy": hits / rows if classify else None, "rows": int(rows)}


def check_fits(info: DatasetInfo, payload: dict[str, Any], data: str) -> None:
    """The data has the model's feature width and, if labelled, its kind of label."""
    if info.num_features != payload["in_features"]:
        raise DataError(
            f"--data: {data} has {info.num_features} features per row; the model takes "
            f"{payload['in_features']}"
        )
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
