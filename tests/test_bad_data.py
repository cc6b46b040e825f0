"""Bad data stops `raymb train` before Ray starts: one line, non-zero, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def _write(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _good(n: int = 8) -> dict:
    x = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(2 * n, dtype=np.float32)), 2)
    return {"features": x, "label": pa.array(np.zeros(n, dtype=np.float32))}


def _missing_column(d: Path) -> None:
    _write(d / "a.parquet", pa.table({"features": _good()["features"]}))


def _wrong_type(d: Path) -> None:
    _write(d / "a.parquet", pa.table({**_good(), "label": pa.array(["x"] * 8)}))


def _ragged(d: Path) -> None:
    feats = pa.array([[1.0, 2.0], [1.0, 2.0, 3.0]] * 4, type=pa.list_(pa.float32()))
    _write(d / "a.parquet", pa.table({"features": feats, "label": _good()["label"]}))


@pytest.mark.parametrize(
    "make, expected",
    [(_missing_column, "'label'"), (_wrong_type, "'label'"), (_ragged, "ragged")],
    ids=["missing-column", "wrong-type", "ragged-features"],
)
def test_schema_errors_exit_before_anything_is_written(tmp_path, make, expected):
    data = tmp_path / "data"
    make(data)
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "raymb.cli",
            "train",
            "--set",
            f"data.train={data}",
            "--set",
            f"run.storage_path={runs}",
            "--set",
            "checkpoint.metric=train_loss",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raymb: error: data.train:")
    assert expected in lines[0] and "a.parquet" in lines[0]
    assert not runs.exists(), "no run directory, checkpoint or summary.json for bad data"
