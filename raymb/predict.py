"""`raymb predict`: a saved model's predictions on a parquet set, written to one parquet file.

The output keeps the input's columns other than the features (ids, the label if there is
one) and adds `prediction`: the class id (int64) and `probabilities` (softmax, one list per
row) for a classifier, the predicted value (float32) for a regressor. Labels are not needed.
The file is written under a temporary name and renamed: a reader never sees half of it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raymb.checkpoint import load_model, payload_inputs
from raymb.columns import table_to_tensors
from raymb.config import Config
from raymb.errors import DataError
from raymb.evaluate import check_fits, read_batches
from raymb.schema import DatasetInfo, check_dataset, resolve_files
from raymb.storage import temp_sibling


@torch.no_grad()
def predict(checkpoint: str, data: str, out: str | Path, batch_rows: int = 65536) -> dict[str, Any]:
    """Write the predictions of the model in `checkpoint` for every row of `data` to `out`."""
    model, payload = load_model(checkpoint)
    config = Config.from_dict(payload["config"])
    inputs = payload_inputs(payload)
    if inputs.task == "lm":
        raise DataError(
            f"{checkpoint}: a language model; continue a prompt with raymb sample, or measure "
            "it with raymb eval"
        )
    features, label = config.data.features, config.data.label
    feature_cols = [features] if isinstance(features, str) else list(features)
    info, labelled = _dataset(data, features, label)
    if labelled:
        check_fits(info, payload, data)
    out = Path(out)
    if out.is_dir():
        raise DataError(f"--out: {out} is a directory, expected a file name such as preds.parquet")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)  # unique: two predicts into one --out do not collide
    model.eval()
    rows = 0
    writer: pq.ParquetWriter | None = None
    try:
        for path, table in read_batches(info, batch_rows):
            source = table
            if not labelled:  # table_to_tensors reads a label; predictions never look at it
                source = table.append_column(label, pa.array(np.zeros(len(table), np.float32)))
            x, _ = table_to_tensors(source, features, label)
            if tuple(x.shape[1:]) != inputs.shape:
                have, want = list(x.shape[1:]), list(inputs.shape)
                if len(want) == 1:
                    have, want = f"{x[0].numel()} features per row", want[0]
                raise DataError(f"--data: {path}: {have}; the model takes {want}")
            x, _ = inputs.collate(x, x)
            result = _with_predictions(table, feature_cols, model(x), payload["classify"])
            if writer is None:
                writer = pq.ParquetWriter(tmp, result.schema)
            elif result.schema != writer.schema:
                try:
                    result = result.cast(writer.schema)
                except (pa.ArrowInvalid, ValueError):
                    raise DataError(
                        f"--data: {path}: its other columns ({result.schema.names}) differ from "
                        f"the first file's ({writer.schema.names}); predict one file at a time"
                    ) from None
            writer.write_table(result)
            rows += len(result)
        writer.close()
        writer = None
        os.replace(tmp, out)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return {"rows": rows, "out": str(out), "classify": payload["classify"]}


def _dataset(data: str, features: str | list[str], label: str) -> tuple[DatasetInfo, bool]:
    """The checked dataset, and whether its files carry the label (then fully checked)."""
    feature_cols = [features] if isinstance(features, str) else list(features)
    files, fs = resolve_files(data, what="--data")
    try:
        schemas = [pq.read_schema(f, filesystem=fs) for f in files]
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"--data: cannot read {data} ({str(e).splitlines()[0]})") from None
    if all(label in s.names for s in schemas):
        return check_dataset(data, features, label, what="--data"), True
    for f, schema in zip(files, schemas):
        missing = [c for c in feature_cols if c not in schema.names]
        if missing:
            names = ", ".join(schema.names) or "none"
            raise DataError(f"--data: {f}: no feature column {missing[0]!r} (columns: {names})")
    rows = sum(pq.ParquetFile(f, filesystem=fs).metadata.num_rows for f in files)
    info = DatasetInfo(
        files=tuple(files),
        num_rows=rows,
        num_features=0,  # measured batch by batch
        label_kind="none",
        num_classes=None,
        filesystem=fs,
    )
    return info, False


def _with_predictions(
    table: pa.Table, feature_cols: list[str], output: torch.Tensor, classify: bool
) -> pa.Table:
    columns: dict[str, Any] = {
        c: table.column(c) for c in table.column_names if c not in feature_cols
    }
    if classify:
        probabilities = torch.softmax(output.float(), dim=-1).numpy()
        columns["prediction"] = pa.array(output.argmax(dim=-1).numpy())
        columns["probabilities"] = pa.FixedSizeListArray.from_arrays(
            pa.array(probabilities.reshape(-1), pa.float32()), probabilities.shape[1]
        )
    else:
        columns["prediction"] = pa.array(output.float().reshape(-1).numpy())
    return pa.table(columns)
