"""Write the example's data: rows of (tab, ids, weight, label) as parquet, a train and a val
folder. The label depends on both inputs, so the model needs both."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write(folder: str, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    tab = rng.normal(size=(rows, 4)).astype(np.float32)  # 4 numbers a row
    ids = rng.integers(0, 50, size=(rows, 10))  # 10 ids a row, 50 distinct
    weight = rng.uniform(0.5, 2.0, size=rows).astype(np.float32)
    label = (tab[:, 0] + (ids < 10).sum(axis=1) / 2 > 1).astype(np.int64)
    Path(folder).mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "tab": pa.FixedSizeListArray.from_arrays(pa.array(tab.ravel()), 4),
            "ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel()), 10),
            "weight": weight,
            "label": label,
        }
    )
    pq.write_table(table, f"{folder}/part-0.parquet")


write("data/mine/train", 2000, seed=0)
write("data/mine/val", 500, seed=1)
