"""Tensor feature columns, the collate, and the one-line errors of images and text, without
Ray: every error here is raised before Ray starts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raymb.cli import main as cli
from raymb.core.shape import InputShape
from raymb.data.checks import check_dataset, describe_shape
from raymb.data.columns import table_to_tensors
from raymb.errors import DataError

IMAGES = np.arange(5 * 3 * 4 * 4, dtype=np.uint8).reshape(5, 3, 4, 4)
LABELS = pa.array([0, 1, 2, 1, 0], pa.int64())


def _tensor_column(kind: str, images: np.ndarray = IMAGES) -> tuple[pa.Field, pa.Array]:
    """The same images in each of the layouts a feature column may have."""
    n, shape = len(images), list(images.shape[1:])
    flat = pa.array(images.reshape(-1))
    if kind == "arrow_tensor":
        t = pa.fixed_shape_tensor(pa.uint8(), shape)
        storage = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(shape)))
        return pa.field("image", t), pa.ExtensionArray.from_storage(t, storage)
    if kind == "ray_tensor":  # as Ray Data writes it: a large list, the shape in metadata
        offsets = pa.array(np.arange(n + 1) * int(np.prod(shape)), pa.int64())
        meta = {b"ARROW:extension:name": b"ray.data.arrow_tensor_v2"}
        meta[b"ARROW:extension:metadata"] = json.dumps(shape).encode()
        array = pa.LargeListArray.from_arrays(offsets, flat)
        return pa.field("image", array.type, metadata=meta), array
    if kind == "nested":
        array = pa.array(images.tolist(), pa.list_(pa.list_(pa.list_(pa.uint8(), 4), 4), 3))
        return pa.field("image", array.type), array
    raise AssertionError(kind)


def _write(path: Path, field: pa.Field, column: pa.Array, labels=LABELS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([field, pa.field("label", labels.type)])
    pq.write_table(pa.table([column, labels], schema=schema), path)
    return path


@pytest.mark.parametrize("kind", ["arrow_tensor", "ray_tensor", "nested"])
def test_tensor_columns_read_as_their_shape(tmp_path, kind) -> None:
    path = _write(tmp_path / "d" / "a.parquet", *_tensor_column(kind))
    info = check_dataset(str(tmp_path / "d"), "image", "label")
    assert info.feature_shape == (3, 4, 4)
    assert describe_shape(info, "image") == "image: uint8[3, 4, 4]"
    assert info.num_features == 48 and info.num_classes == 3
    x, y = table_to_tensors(pq.read_table(path), "image", "label")
    assert x.dtype == torch.uint8  # kept as stored: a cache of images is 4x smaller
    assert torch.equal(x, torch.from_numpy(IMAGES))
    assert y.tolist() == [0, 1, 2, 1, 0]
    x2, _ = table_to_tensors(pq.read_table(path).slice(2, 2), "image", "label")
    assert torch.equal(x2, torch.from_numpy(IMAGES[2:4]))  # a slice keeps its offset


def test_collate_scales_and_normalises_per_channel() -> None:
    x = torch.from_numpy(IMAGES[:2])
    inputs = InputShape(
        task="classify", shape=(3, 4, 4), scale=0.5, mean=(1.0, 2.0, 3.0), std=(2.0,) * 3
    )
    out, _ = inputs.collate(x, torch.zeros(2))
    # By hand: channel c of image i: (v * 0.5 - (c + 1)) / 2.
    expected = (IMAGES[:2].astype(np.float32) * 0.5 - np.array([1, 2, 3]).reshape(1, 3, 1, 1)) / 2
    torch.testing.assert_close(out, torch.from_numpy(expected.astype(np.float32)))


def test_lm_collate_splits_a_block_into_input_and_target() -> None:
    blocks = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]], dtype=torch.int32)
    inputs = InputShape(task="lm", shape=(4,))
    x, y = inputs.collate(blocks, torch.zeros(2, 0))
    assert x.tolist() == [[5, 6, 7], [1, 2, 3]] and y.tolist() == [[6, 7, 8], [2, 3, 4]]
    assert x.dtype == torch.long and inputs.units_per_row == 3 and inputs.model_shape == (3,)


def test_ragged_tensors_are_one_line_naming_file_and_column(tmp_path) -> None:
    ragged = pa.array([[[1, 2], [3]], [[4, 5], [6, 7]]], pa.list_(pa.list_(pa.uint8())))
    path = _write(tmp_path / "a" / "x.parquet", pa.field("image", ragged.type), ragged, LABELS[:2])
    lengths = pa.array([[1, 2, 3], [4, 5]], pa.list_(pa.float32()))
    other = _write(
        tmp_path / "b" / "y.parquet", pa.field("image", lengths.type), lengths, LABELS[:2]
    )
    shapes = [
        (tmp_path / "c" / "1.parquet", _tensor_column("arrow_tensor")),
        (tmp_path / "c" / "2.parquet", _tensor_column("arrow_tensor", IMAGES[:, :, :2, :2])),
    ]
    for p, (field, column) in shapes:
        _write(p, field, column)
    for where, file, words in [
        (tmp_path / "a", path, ["'image'", "ragged"]),
        (tmp_path / "b", other, ["'image'", "ragged", "lengths 2..3"]),
        (
            tmp_path / "c",
            shapes[1][0],
            ["'image'", "[3, 2, 2]", "expected rows of shape [3, 4, 4]"],
        ),
    ]:
        with pytest.raises(DataError) as e:
            check_dataset(str(where), "image", "label")
        msg = str(e.value)
        assert "\n" not in msg and str(file) in msg, msg
        for w in words:
            assert w in msg, (w, msg)


def _images(tmp_path: Path) -> Path:
    _write(tmp_path / "images" / "a.parquet", *_tensor_column("arrow_tensor"))
    return tmp_path / "images"


def _floats(tmp_path: Path) -> Path:
    column = pa.array(np.random.default_rng(0).random((6, 9)).tolist(), pa.list_(pa.float32(), 9))
    labels = pa.array(np.arange(6) % 2, pa.int64())
    return _write(
        tmp_path / "floats" / "a.parquet", pa.field("tokens", column.type), column, labels
    )


def _tokens(tmp_path: Path) -> Path:
    column = pa.array(np.arange(6 * 9).reshape(6, 9).tolist(), pa.list_(pa.int32(), 9))
    labels = pa.array(np.zeros(6), pa.int64())
    return _write(
        tmp_path / "tokens" / "a.parquet", pa.field("tokens", column.type), column, labels
    )


BAD_TRAINING = [
    # (data, overrides, words the one line must hold)
    (_floats, ["data.features=tokens", "data.task=lm"], ["integer token ids", "float"]),
    (_images, ["model.name=gpt", "data.features=image"], ['data.task = "lm"']),
    (_tokens, ["model.name=cnn", "data.features=tokens"], ["[C, H, W]", "tokens: int32[9]"]),
    (
        _tokens,
        ["model.name=gpt", "data.features=tokens", "data.task=lm", "model.block_size=4"],
        ["model.block_size=4", "8 tokens"],
    ),
    (_images, ["data.features=image", "data.mean=[0.5]", "data.std=[0.2]"], ["3 channels"]),
    (_images, ["data.features=image", "data.task=regress"], ["floating label"]),
]


@pytest.mark.parametrize(
    "make, sets, words", BAD_TRAINING, ids=lambda v: getattr(v, "__name__", None)
)
def test_bad_image_and_text_training_is_one_line_and_writes_nothing(
    tmp_path, capsys, make, sets, words
) -> None:
    data = make(tmp_path)
    runs = tmp_path / "runs"
    argv = ["train", "--set", f"data.train={data}", "--set", f"run.storage_path={runs}"]
    argv += ["--set", "checkpoint.metric=train_loss"]
    for s in sets:
        argv += ["--set", s]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raymb: error: ") and "\n" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert not runs.exists()
