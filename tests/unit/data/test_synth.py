"""raymb.data.synthetic_tables: files, columns and determinism, and that the data says what
truth.json says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymb.data.synthetic_tables import KINDS, generate
from raymb.errors import ConfigError, DataError


def _read(split_dir) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(sorted(split_dir.glob("*.parquet")))
    col = table.column("features").combine_chunks()
    x = col.flatten().to_numpy().reshape(len(col), -1)
    return x, table.column("label").to_numpy()


@pytest.mark.parametrize(
    ("kind", "d", "label_type"),
    [
        ("linear", 1, pa.float32()),
        ("regression", 8, pa.float32()),
        ("classification", 16, pa.int64()),
    ],
)
def test_layout_columns_and_row_counts(tmp_path, kind, d, label_type):
    truth = generate(kind, tmp_path, rows=103, shards=4, val_fraction=0.2)

    train = sorted(p.name for p in (tmp_path / "train").iterdir())
    val = sorted(p.name for p in (tmp_path / "val").iterdir())
    assert train == [f"part-{i:05d}.parquet" for i in range(4)]
    assert val == ["part-00000.parquet", "part-00001.parquet"]  # max(1, 4 // 2)
    # 103 = 26 + 26 + 26 + 25; val: round(103 * 0.2) = 21 = 11 + 10.
    counts = [pq.read_metadata(tmp_path / "train" / n).num_rows for n in train]
    assert counts == [26, 26, 26, 25]
    assert [pq.read_metadata(tmp_path / "val" / n).num_rows for n in val] == [11, 10]

    schema = pq.read_schema(tmp_path / "train" / train[0])
    assert schema.field("features").type == pa.list_(pa.float32(), d)
    assert schema.field("label").type == label_type
    assert json.loads((tmp_path / "truth.json").read_text()) == truth
    assert truth["kind"] == kind
    assert truth["features"] == d
    assert truth["val_rows"] == 21
    assert np.array(truth["weight"]).shape[1] == d


def test_zero_val_fraction_writes_no_val_dir_and_a_rerun_is_refused(tmp_path):
    generate("regression", tmp_path / "a", rows=50, shards=5)
    assert (tmp_path / "a" / "val").is_dir()
    generate("regression", tmp_path / "b", rows=50, shards=2, val_fraction=0)
    assert not (tmp_path / "b" / "val").exists()
    assert sorted(p.name for p in (tmp_path / "b" / "train").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    # A second run into a dataset would overwrite some parts and delete others: refused.
    with pytest.raises(DataError, match="not an empty folder"):
        generate("regression", tmp_path / "a", rows=50, shards=2)
    assert len(list((tmp_path / "a" / "train").iterdir())) == 5


@pytest.mark.parametrize("kind", KINDS)
def test_same_arguments_give_identical_data(tmp_path, kind):
    a = generate(kind, tmp_path / "a", rows=300, shards=3, seed=7)
    b = generate(kind, tmp_path / "b", rows=300, shards=3, seed=7)
    generate(kind, tmp_path / "c", rows=300, shards=3, seed=8)
    assert a == b
    # Same library versions write the same bytes, so files can be compared directly.
    for p in (tmp_path / "a").rglob("*.parquet"):
        assert p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes()
    for split in ("train", "val"):
        xa, ya = _read(tmp_path / "a" / split)
        xb, yb = _read(tmp_path / "b" / split)
        assert np.array_equal(xa, xb)
        assert np.array_equal(ya, yb)
    assert not np.array_equal(
        _read(tmp_path / "a" / "train")[0], _read(tmp_path / "c" / "train")[0]
    )


def test_linear_least_squares_recovers_two_and_one(tmp_path):
    generate("linear", tmp_path, rows=4096, noise=0.1, seed=3)
    x, y = _read(tmp_path / "train")
    design = np.hstack([x.astype(np.float64), np.ones((len(x), 1))])
    (w, b), *_ = np.linalg.lstsq(design, y.astype(np.float64), rcond=None)
    assert abs(w - 2.0) < 0.05
    assert abs(b - 1.0) < 0.05
    # Residuals are the noise: its standard deviation is the requested 0.1.
    assert np.std(y - design @ [w, b]) == pytest.approx(0.1, rel=0.1)


def test_regression_least_squares_recovers_truth(tmp_path):
    truth = generate("regression", tmp_path, rows=4096, features=5, noise=0.1, seed=1)
    x, y = _read(tmp_path / "train")
    design = np.hstack([x.astype(np.float64), np.ones((len(x), 1))])
    coef, *_ = np.linalg.lstsq(design, y.astype(np.float64), rcond=None)
    np.testing.assert_allclose(coef[:-1], truth["weight"][0], atol=0.02)
    assert coef[-1] == pytest.approx(0.5, abs=0.02)


def test_classification_is_learnable_by_a_linear_model(tmp_path):
    classes = 4
    truth = generate("classification", tmp_path, rows=4096, classes=classes, seed=2)
    x, y = _read(tmp_path / "train")
    assert y.min() >= 0
    assert y.max() < classes
    assert set(np.unique(y)) == set(range(classes))
    # One-vs-rest least squares on one-hot targets: a crude linear classifier that needs
    # no training loop, so reaching 80% shows the labels follow a linear rule.
    design = np.hstack([x.astype(np.float64), np.ones((len(x), 1))])
    coef, *_ = np.linalg.lstsq(design, np.eye(classes)[y], rcond=None)
    accuracy = np.mean(np.argmax(design @ coef, axis=1) == y)
    assert accuracy > 0.8
    # The teacher itself (noise-free) agrees with nearly every label at noise 0.1.
    teacher = np.argmax(x @ np.array(truth["weight"]).T, axis=1)
    assert np.mean(teacher == y) > 0.95


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"kind": "tokens"}, "unknown kind 'tokens'"),
        ({"rows": 0}, "--rows"),
        ({"rows": 5, "shards": 10}, "--shards"),
        ({"shards": 0}, "--shards"),
        ({"val_fraction": 1.0}, "--val-fraction"),
        ({"val_fraction": -0.1}, "--val-fraction"),
        ({"kind": "classification", "classes": 1}, "--classes"),
        ({"kind": "linear", "features": 3}, "--features"),
        ({"features": 0}, "--features"),
        ({"noise": -1.0}, "--noise"),
        ({"seed": -1}, "--seed"),
    ],
)
def test_bad_arguments_name_the_flag(tmp_path, kwargs, flag):
    kwargs = {"kind": "regression", **kwargs}
    with pytest.raises(ConfigError, match="^gen-data: .*" + flag) as info:
        generate(kwargs.pop("kind"), tmp_path, **kwargs)
    assert "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())  # nothing written before the check


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def write_half_then_fail(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        generate("linear", tmp_path / "out", rows=10, shards=2)
    assert list(tmp_path.iterdir()) == []  # written into a temporary folder, removed
