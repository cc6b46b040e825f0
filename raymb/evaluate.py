"""`raymb eval`: a saved model's loss and accuracy on a parquet set, in this process."""

from __future__ import annotations

import pyarrow.parquet as pq
import torch

from raymb.checkpoint import load_model
from raymb.columns import table_to_tensors
from raymb.config import Config
from raymb.models import correct, summed_loss
from raymb.schema import check_dataset


@torch.no_grad()
def evaluate(checkpoint: str, data: str, batch_rows: int = 65536) -> dict:
    """Mean loss over every row (and accuracy for classifiers)."""
    model, payload = load_model(checkpoint)
    config = Config.from_dict(payload["config"])
    info = check_dataset(data, config.data.features, config.data.label, what="--data")
    classify = payload["classify"]
    model.eval()
    loss = hits = rows = 0.0
    for path in info.files:
        with info.filesystem.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
                x, y = table_to_tensors(batch, config.data.features, config.data.label)
                out = model(x)
                loss += summed_loss(out, y, classify).item()
                hits += correct(out, y).item() if classify else 0
                rows += len(y)
    return {"loss": loss / rows, "accuracy": hits / rows if classify else None, "rows": int(rows)}
