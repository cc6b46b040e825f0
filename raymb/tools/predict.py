"""`raymb predict`: a saved model's predictions on a parquet set, written to one parquet file.

The output keeps the input's columns other than the features (ids, the label if there is
one) and adds `prediction`: the class id (int64) and `probabilities` (softmax, one list per
row) for a classifier, the predicted value (float32) for a regressor. Labels are not needed.
The file is written under a temporary name and renamed: a reader never sees half of it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymb.config import Config
from raymb.errors import DataError
from raymb.storage import temp_sibling
from raymb.tools.load import load_model, payload_inputs

if TYPE_CHECKING:
    import torch

    from raymb.core.shape import InputShape
    from raymb.data.checks import DatasetInfo


def predict(
    checkpoint: str,
    data: str,
    out: str | Path,
    batch_rows: int = 65536,
    *,
    trust_model_code: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Write the predictions of the model in `checkpoint` for every row of `data` to `out`
    (a custom model factory runs only with `trust_model_code`: raymb.checkpoint.load_model).
    An existing `out` is replaced only with `force`; never an input, a folder or a device."""
    check_out(out, data, checkpoint, force=force)  # before torch is imported: a refusal is quick
    import torch

    with torch.no_grad():
        return _predict(checkpoint, data, Path(out), batch_rows, trust_model_code)


def _predict(
    checkpoint: str, data: str, out: Path, batch_rows: int, trust_model_code: bool
) -> dict[str, Any]:
    from raymb.core import batch
    from raymb.data.columns import named_tensors
    from raymb.tools.evaluate import check_fits, check_named_inputs, read_batches

    model, payload = load_model(checkpoint, trust_model_code=trust_model_code)
    config = Config.from_saved(payload["config"])
    inputs = payload_inputs(payload)
    if inputs.task == "lm":
        raise DataError(
            f"{checkpoint}: a language model; continue a prompt with raymb sample, or measure "
            "it with raymb eval"
        )
    features, label = config.data.features, config.data.label
    if inputs.columns is not None:  # named inputs: the model reads them by name, as stored
        named = check_named_inputs(data, inputs, label)
        info, labelled, feature_cols = named[0], False, list(named[1].inputs)
    else:
        feature_cols = [features] if isinstance(features, str) else list(features)
        info, labelled = _dataset(data, features, label)
    if labelled:
        check_fits(info, payload, data)
    multilabel = config.loss.name == "bce"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)  # unique: two predicts into one --out do not collide
    model.eval()
    rows = 0
    writer: pq.ParquetWriter | None = None
    try:
        for path, table in read_batches(info, batch_rows):
            if inputs.columns is not None:
                x, _ = named_tensors(table, named[1])
            else:
                x = _features(table, features, label, labelled, inputs, path)
            output = batch.logits(batch.forward(model, x))
            result = _with_predictions(
                table, feature_cols, output, payload["classify"], multilabel=multilabel
            )
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


def _features(
    table: pa.Table,
    features: str | list[str],
    label: str,
    labelled: bool,
    inputs: InputShape,
    path: str,
) -> torch.Tensor:
    """data.features of a batch, as the model takes them (the rows' shape checked)."""
    from raymb.data.columns import table_to_tensors

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
    return x


def check_out(out: str | Path, data: str, checkpoint: str, *, force: bool = False) -> None:
    """Refuse an --out that is, holds or is inside an input (--data, a file its glob matches,
    the --checkpoint's folder), however spelled (links, hard links); that is a folder, a
    device, a FIFO or a socket; or that exists, unless `force` (raymb.tools.checks)."""
    from raymb.tools.checks import check_predict

    check_predict(checkpoint, data, out, force=force)


def _dataset(data: str, features: str | list[str], label: str) -> tuple[DatasetInfo, bool]:
    """The checked dataset, and whether its files carry the label (then fully checked)."""
    from raymb.data.checks import DatasetInfo, check_dataset
    from raymb.data.listing import resolve_files

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
    table: pa.Table,
    feature_cols: list[str],
    output: torch.Tensor,
    classify: bool,
    *,
    multilabel: bool = False,
) -> pa.Table:
    """The table's other columns and `prediction`: the class id and `probabilities`
    (softmax) for a classifier (one per token for a token classifier); 0/1 per label and
    their sigmoid for multi-label (loss.name = "bce"); the value(s) for a regressor."""
    import torch

    columns: dict[str, Any] = {
        c: table.column(c) for c in table.column_names if c not in feature_cols
    }
    output = output.float()
    if multilabel:
        columns["prediction"] = _rows((output > 0).long())
        columns["probabilities"] = _rows(torch.sigmoid(output))
    elif classify:
        columns["prediction"] = _rows(output.argmax(dim=-1))
        columns["probabilities"] = _rows(torch.softmax(output, dim=-1))
    elif output.shape[1:].numel() == 1:  # one value a row
        columns["prediction"] = pa.array(output.reshape(-1).numpy())
    else:
        columns["prediction"] = _rows(output)
    return pa.table(columns)


def _rows(values: torch.Tensor) -> pa.Array:
    """One value a row, or (nested) fixed-size lists of a row's values."""
    array = values.numpy()
    out = pa.array(array.reshape(-1))
    for size in reversed(array.shape[1:]):
        out = pa.FixedSizeListArray.from_arrays(out, size)
    return out
