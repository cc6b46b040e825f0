"""Files for the online (--follow) tests: arriving parquet files of a noisy linear function
of D features, and the run's config (2 workers, G rows a step, plain SGD at LR)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymb import load_config

D = 2  # features
LR = 0.1
G = 8  # 2 workers x 4 microbatches of 1 row


def write_file(directory: Path, name: str, rows: int, seed: int, classes: bool = False) -> None:
    """As a producer should: a hidden temporary name in DIR, then a rename."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(rows, D)).astype(np.float32)
    y = (x @ np.array([2.0, -3.0], np.float32) + 1 + 0.1 * rng.standard_normal(rows)).astype(
        np.float32
    )
    if classes:
        y = (y > 1).astype(np.int64)
    features = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), D)
    tmp = directory / f".{name}.tmp"
    pq.write_table(pa.table({"features": features, "label": y}), tmp)
    os.replace(tmp, directory / name)


def follow_config(tmp: Path, *overrides: str):
    return load_config(
        None,
        [
            f"run.storage_path={tmp / 'runs'}",
            "data.val=none",
            "checkpoint.metric=train_loss",
            "scale.workers=2",
            f"train.global_batch_size={G}",
            "train.microbatch_size=1",
            "optim.momentum=0.0",
            f"optim.lr={LR}",
            *overrides,
        ],
    )
