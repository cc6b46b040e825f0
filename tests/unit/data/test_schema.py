"""raymb.data.checks: what a good dataset reports, and one clear line for each way data goes
wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymb.data.checks import check_dataset
from raymb.data.listing import resolve_files
from raymb.data.synthetic import generate
from raymb.errors import ConfigError, DataError


def _fixed(rows: int, d: int, label: pa.Array | None = None) -> pa.Table:
    flat = pa.array(np.arange(rows * d, dtype=np.float32))
    labels = label if label is not None else pa.array(np.arange(rows) % 3, pa.int64())
    return pa.table({"features": pa.FixedSizeListArray.from_arrays(flat, d), "label": labels})


def _write(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


# --- datasets that pass -------------------------------------------------------------


@pytest.fixture
def classification_dir(tmp_path) -> Path:
    generate("classification", tmp_path, rows=100, shards=4, features=6, classes=5)
    return tmp_path


@pytest.mark.parametrize("form", ["dir", "file", "glob", "uri"])
def test_generated_classification_data(classification_dir, form):
    train = classification_dir / "train"
    path = {
        "dir": str(train),
        "file": str(train / "part-00000.parquet"),
        "glob": str(train / "*.parquet"),
        "uri": train.as_uri(),
    }[form]
    info = check_dataset(path, "features", "label")
    expected = sorted(train.glob("*.parquet")) if form != "file" else [train / "part-00000.parquet"]
    assert info.files == tuple(str(p) for p in expected)
    assert info.num_rows == (100 if form != "file" else 25)
    assert info.num_features == 6
    assert info.label_kind == "int"
    # Labels come from an independent read, not from the code under test.
    labels = pq.read_table(list(info.files)).column("label").to_numpy()
    assert info.num_classes == labels.max() + 1


def test_regression_data_has_float_labels_and_no_classes(tmp_path):
    generate("regression", tmp_path, rows=40, shards=2, features=3)
    info = check_dataset(str(tmp_path / "val"), "features", "label", what="data.val")
    assert (info.num_rows, info.num_features, info.label_kind) == (8, 3, "float")
    assert info.num_classes is None


def test_scalar_feature_columns_and_equal_length_lists(tmp_path):
    table = pa.table(
        {
            "x1": pa.array([1.0, 2.0, 3.0]),
            "x2": pa.array([1, 2, 3], pa.int32()),
            "v": pa.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], pa.large_list(pa.float64())),
            "y": pa.array([0.5, 1.5, 2.5], pa.float32()),
        }
    )
    f = _write(tmp_path / "a.parquet", table)
    info = check_dataset(str(f), ["x1", "x2"], "y")
    assert (info.num_features, info.label_kind, info.num_rows) == (2, "float", 3)
    assert check_dataset(str(f), "v", "y").num_features == 2


def test_directory_walk_skips_metadata_and_recurses_sorted(tmp_path):
    _write(tmp_path / "b" / "part-1.parquet", _fixed(3, 2))
    _write(tmp_path / "a" / "part-2.parquet", _fixed(0, 2))  # an empty shard is fine
    _write(tmp_path / "a" / "part-1.parquet", _fixed(4, 2))
    (tmp_path / "_SUCCESS").touch()
    (tmp_path / ".part-3.parquet.crc").write_text("x")
    (tmp_path / "_tmp").mkdir()
    (tmp_path / "_tmp" / "junk.txt").write_text("x")
    files, fs = resolve_files(str(tmp_path))
    rel = [str(Path(f).relative_to(tmp_path)) for f in files]
    assert rel == ["a/part-1.parquet", "a/part-2.parquet", "b/part-1.parquet"]
    assert fs.type_name == "local"
    info = check_dataset(str(tmp_path), "features", "label")
    assert (info.num_rows, info.num_features, info.num_classes) == (7, 2, 3)


def test_recursive_glob(tmp_path):
    _write(tmp_path / "x" / "y" / "p.parquet", _fixed(2, 2))
    _write(tmp_path / "p.parquet", _fixed(2, 2))
    files, _ = resolve_files(str(tmp_path / "**" / "*.parquet"))
    assert files == [str(tmp_path / "p.parquet"), str(tmp_path / "x" / "y" / "p.parquet")]
    files, _ = resolve_files(str(tmp_path / "*" / "*" / "*.parquet"))
    assert files == [str(tmp_path / "x" / "y" / "p.parquet")]


# --- datasets that fail: (build(tmp_path) -> (path, features, label), words in message) ---


def _missing(tmp: Path):
    return str(tmp / "nope"), "features", "label"


def _unknown_uri_scheme(tmp: Path):
    return "nosuch://bucket/train", "features", "label"


def _empty_dir(tmp: Path):
    (tmp / "d").mkdir()
    return str(tmp / "d"), "features", "label"


def _glob_nothing(tmp: Path):
    _write(tmp / "d" / "a.parquet", _fixed(2, 2))
    return str(tmp / "d" / "*.parq"), "features", "label"


def _readme_in_dir(tmp: Path):
    _write(tmp / "d" / "a.parquet", _fixed(2, 2))
    (tmp / "d" / "README.txt").write_text("hello")
    return str(tmp / "d"), "features", "label"


def _fake_parquet(tmp: Path):
    _write(tmp / "d" / "a.parquet", _fixed(2, 2))
    (tmp / "d" / "b.parquet").write_text("not really")
    return str(tmp / "d"), "features", "label"


def _empty_dataset(tmp: Path):
    _write(tmp / "d" / "a.parquet", _fixed(0, 2))
    _write(tmp / "d" / "b.parquet", _fixed(0, 2))
    return str(tmp / "d"), "features", "label"


def _no_label(tmp: Path):
    _write(tmp / "d" / "a.parquet", _fixed(2, 2))
    _write(tmp / "d" / "b.parquet", _fixed(2, 2).rename_columns(["features", "target"]))
    return str(tmp / "d"), "features", "label"


def _misnamed_features(tmp: Path):
    return str(_write(tmp / "a.parquet", _fixed(2, 2))), "feats", "label"


def _string_label(tmp: Path):
    return str(_write(tmp / "a.parquet", _fixed(2, 2, pa.array(["a", "b"])))), "features", "label"


def _string_feature_column(tmp: Path):
    table = pa.table({"x1": [1.0, 2.0], "x2": ["a", "b"], "label": [0, 1]})
    return str(_write(tmp / "a.parquet", table)), ["x1", "x2"], "label"


def _string_list_features(tmp: Path):
    table = pa.table({"features": [["a"], ["b"]], "label": [0, 1]})
    return str(_write(tmp / "a.parquet", table)), "features", "label"


def _scalar_as_single_name(tmp: Path):
    table = pa.table({"x": [1.0, 2.0], "label": [0.0, 1.0]})
    return str(_write(tmp / "a.parquet", table)), "x", "label"


def _ragged(tmp: Path):
    table = pa.table({"features": [[1.0, 2.0, 3.0], [1.0] * 5, [1.0] * 4], "label": [0, 1, 2]})
    return str(_write(tmp / "a.parquet", table)), "features", "label"


def _width_differs(tmp: Path):
    _write(tmp / "d" / "a.parquet", _fixed(2, 3))
    _write(tmp / "d" / "b.parquet", _fixed(2, 4))
    return str(tmp / "d"), "features", "label"


def _label_kind_differs(tmp: Path):
    _write(tmp / "d" / "a.parquet", _fixed(2, 2))
    _write(tmp / "d" / "b.parquet", _fixed(2, 2, pa.array([0.5, 1.5])))
    return str(tmp / "d"), "features", "label"


def _negative_label(tmp: Path):
    return str(_write(tmp / "a.parquet", _fixed(2, 2, pa.array([0, -1])))), "features", "label"


def _null_fixed_features(tmp: Path):
    flat = pa.array([1.0, None, 3.0, 4.0], pa.float32())
    table = pa.table({"features": pa.FixedSizeListArray.from_arrays(flat, 2), "label": [0, 1]})
    return str(_write(tmp / "a.parquet", table)), "features", "label"


def _null_list_features(tmp: Path):
    table = pa.table({"features": [[1.0, 2.0], [3.0, None]], "label": [0, 1]})
    return str(_write(tmp / "a.parquet", table)), "features", "label"


def _null_label(tmp: Path):
    table = _fixed(2, 2, pa.array([0.5, None], pa.float32()))
    return str(_write(tmp / "a.parquet", table)), "features", "label"


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (_missing, ["no such file or directory", "nope"]),
        (_unknown_uri_scheme, ["cannot open nosuch://bucket/train"]),
        (_empty_dir, ["no parquet files under", "d"]),
        (_glob_nothing, ["no files match", "*.parq"]),
        (_readme_in_dir, ["not a parquet file", "README.txt"]),
        (_fake_parquet, ["not a parquet file", "b.parquet"]),
        (_empty_dataset, ["is empty", "0 rows"]),
        (_no_label, ["b.parquet", "no label column 'label'", "columns: features, target"]),
        (
            _misnamed_features,
            ["a.parquet", "no feature column 'feats'", "columns: features, label"],
        ),
        (_string_label, ["a.parquet", "label column 'label'", "string", "integer"]),
        (_string_feature_column, ["a.parquet", "column 'x2'", "string", "numeric scalar"]),
        (_string_list_features, ["a.parquet", "column 'features'", "list<", "list of numbers"]),
        (_scalar_as_single_name, ["a.parquet", "column 'x'", "give a list of names"]),
        (_ragged, ["a.parquet", "column 'features' is ragged: lengths 3..5"]),
        (_width_differs, ["b.parquet", "column 'features'", "4 features", "expected 3"]),
        (_label_kind_differs, ["b.parquet", "label column 'label'", "as in", "a.parquet"]),
        (_negative_label, ["a.parquet", "label column 'label'", "negative value -1"]),
        (_null_fixed_features, ["a.parquet", "column 'features'", "null values"]),
        (_null_list_features, ["a.parquet", "column 'features'", "null values"]),
        (_null_label, ["a.parquet", "column 'label'", "1 null values"]),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_bad_data_is_one_line_naming_file_and_column(tmp_path, build, words):
    path, features, label = build(tmp_path)
    with pytest.raises(DataError) as info:
        check_dataset(path, features, label, what="data.val")
    msg = str(info.value)
    assert msg.startswith("data.val: ")
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize(
    ("features", "label", "key"),
    [
        ([], "label", "data.features"),
        (["a", "a"], "label", "data.features"),
        ("y", "y", "data.label"),
    ],
)
def test_bad_column_arguments_are_config_errors(tmp_path, features, label, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        check_dataset(str(tmp_path), features, label)


# --- NaN and inf: counted per file, a row once however many of its values are bad ----------


def _nonfinite_rows(values: np.ndarray) -> int:
    """Independent reference: numpy's count of rows holding any NaN or inf."""
    return int((~np.isfinite(values.reshape(len(values), -1))).any(axis=1).sum())


def test_nonfinite_rows_are_counted_in_a_fixed_size_list(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    x[1] = [np.nan, np.inf]  # two bad values, one row
    x[4, 0] = -np.inf
    table = pa.table(
        {
            "features": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 2),
            "label": pa.array(np.zeros(6, np.int64)),
        }
    )
    f = _write(tmp_path / "a.parquet", table)
    assert _nonfinite_rows(x) == 2
    with pytest.raises(DataError) as info:
        check_dataset(str(f), "features", "label")
    assert str(info.value) == (
        f"data.train: {f}: 2 rows with NaN or inf in 'features', expected finite numbers"
    )


def test_nonfinite_rows_are_counted_in_a_variable_list_and_a_label(tmp_path):
    table = pa.table(
        {
            "v": pa.array([[1.0, 2.0], [3.0, float("-inf")], [5.0, 6.0]], pa.list_(pa.float64())),
            "y": pa.array([0.5, 1.5, 2.5], pa.float32()),
        }
    )
    f = _write(tmp_path / "a.parquet", table)
    with pytest.raises(DataError, match=r"a\.parquet: 1 row with NaN or inf in 'v'"):
        check_dataset(str(f), "v", "y")
    table = table.set_column(1, "y", pa.array([np.nan, np.inf, 2.5], pa.float32()))
    table = table.set_column(0, "v", pa.array([[1.0, 2.0]] * 3, pa.list_(pa.float64())))
    f = _write(tmp_path / "b.parquet", table)
    with pytest.raises(DataError, match=r"b\.parquet: 2 rows with NaN or inf in 'y'"):
        check_dataset(str(f), "v", "y")


def test_nonfinite_scalar_columns_name_the_column(tmp_path):
    table = pa.table(
        {
            "x1": pa.array([1.0, 2.0, 3.0]),
            "x2": pa.array([np.nan, 2.0, np.inf], pa.float32()),
            "n": pa.array([1, 2, 3]),  # integers cannot be NaN
            "y": pa.array([0.0, 1.0, 2.0]),
        }
    )
    f = _write(tmp_path / "a.parquet", table)
    with pytest.raises(DataError, match=r"a\.parquet: 2 rows with NaN or inf in 'x2'"):
        check_dataset(str(f), ["x1", "n", "x2"], "y")
    assert check_dataset(str(f), ["x1", "n"], "y").num_features == 2


def test_nonfinite_count_spans_row_groups_and_batches_and_names_the_file(tmp_path):
    rng = np.random.default_rng(0)
    rows = 70_000  # more than one scan batch, in several row groups
    x = rng.normal(size=(rows, 3)).astype(np.float32)
    bad = rng.choice(rows * 3, size=500, replace=False)
    x.reshape(-1)[bad] = rng.choice([np.nan, np.inf, -np.inf], size=500)
    x[rows - 1] = [np.nan, np.inf, -np.inf]  # a row with several bad values counts once
    table = pa.table(
        {
            "features": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 3),
            "label": pa.array(np.zeros(rows, np.float32)),
        }
    )
    (tmp_path / "d").mkdir()
    pq.write_table(_fixed(5, 3, pa.array(np.zeros(5), pa.float32())), tmp_path / "d" / "a.parquet")
    pq.write_table(table, tmp_path / "d" / "b.parquet", row_group_size=16_384)
    expected = _nonfinite_rows(x)
    with pytest.raises(DataError) as info:
        check_dataset(str(tmp_path / "d"), "features", "label", what="data.val")
    assert f"b.parquet: {expected} rows with NaN or inf in 'features'" in str(info.value)
