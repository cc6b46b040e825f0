"""Images and text on the torch session: `raymb prepare`, the cnn and the gpt, sampling.

The runs are raymb's epoch loop on a gloo group of local processes (`train_local`,
raymb.driver.local.train_torch; no Ray). The references are independent of raymb's loop: the
gpt's parameters on one worker against two (the equivalence contract), the digits' labels
for the cnn's accuracy, and a plain single-process torch loop for the gpt's validation loss.
"""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from local_run import train_local

from raymb import load_config
from raymb.cli import main as cli
from raymb.tools.load import load_model


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture
def train(runs):
    """`train(*sets)`: a run on the torch session under `runs`."""
    return lambda *sets: train_local(load_config(None, [f"run.storage_path={runs}", *sets]))


def test_gpt_on_two_workers_equals_one(train, tmp_path):
    """W=2 x k=2 microbatches of 8 blocks and W=1 x k=2 of 16 take the same steps."""
    g = np.random.default_rng(0)
    blocks = g.integers(0, 32, size=(256, 17), dtype=np.int32)  # T = 16 tokens of input
    column = pa.FixedSizeListArray.from_arrays(pa.array(blocks.reshape(-1)), 17)
    (tmp_path / "train").mkdir()
    for i in range(2):
        part = pa.table({"tokens": column[i * 128 : (i + 1) * 128]})
        pq.write_table(part, tmp_path / "train" / f"part-{i}.parquet")
    common = (
        f"data.train={tmp_path / 'train'}",
        "data.features=tokens",
        "data.task=lm",
        "model.name=gpt",
        "model.depth=1",
        "model.width=32",
        "model.heads=2",
        # SGD: Adam divides by the root of a gradient's running square, which turns the
        # rounding noise of a gradient that is zero in exact arithmetic (the attention's key
        # bias) into steps of size lr, so no two summation orders agree there.
        "optim.name=sgd",
        "optim.lr=0.1",
        "train.global_batch_size=32",
        "train.epochs=1",
        "checkpoint.metric=train_loss",
    )
    two = train(*common, "run.name=gpt-w2", "scale.workers=2", "train.microbatch_size=8")
    one = train(*common, "run.name=gpt-w1", "scale.workers=1", "train.microbatch_size=16")
    assert two.summary["steps"] == one.summary["steps"] == 8
    a, b = load_model(two.checkpoint)[0], load_model(one.checkpoint)[0]
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    # ... and those steps moved the parameters away from the shared initialisation.
    from raymb.models import build_model

    torch.manual_seed(0)
    init = build_model(load_config(None, list(common)).model, (16,), 32)
    moved = [not torch.allclose(p, q) for p, q in zip(a.parameters(), init.parameters())]
    assert all(moved)


def _digit_folders(root: Path) -> np.ndarray:
    """scikit-learn's 8x8 digits as PNG files in one folder per class; returns the labels."""
    sklearn = pytest.importorskip("sklearn.datasets")
    from PIL import Image

    digits = sklearn.load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(image * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    return digits.target


def test_digits_cnn_on_two_workers(train, tmp_path):
    labels = _digit_folders(tmp_path / "digits")
    out = tmp_path / "prepared"
    assert cli(["prepare", "images", str(tmp_path / "digits"), "--out", str(out)]) == 0
    classes = json.loads((out / "classes.json").read_text())
    assert classes == [str(c) for c in range(10)]
    val_rows = pq.read_table(out / "val").num_rows
    assert pq.read_table(out / "train").num_rows + val_rows == len(labels)
    result = train(
        "run.name=digits",
        f"data.train={out / 'train'}",
        f"data.val={out / 'val'}",
        "model.name=cnn",
        "model.widths=[16,32]",
        "optim.name=adam",
        "optim.lr=0.005",
        "train.global_batch_size=64",
        "train.epochs=12",
        "scale.workers=2",
    )
    assert result.summary["val_accuracy"] >= 0.97, result.summary

    # raymb predict's class ids against the labels give the accuracy raymb eval reports.
    predictions = tmp_path / "preds.parquet"
    assert (
        cli(
            [
                "predict",
                "--checkpoint",
                result.checkpoint,
                "--data",
                str(out / "val"),
                "--out",
                str(predictions),
            ]
        )
        == 0
    )
    table = pq.read_table(predictions)
    hits = np.mean(table["prediction"].to_numpy() == table["label"].to_numpy())
    assert table["probabilities"].type.list_size == 10
    assert hits >= 0.97


def _corpus() -> list[str]:
    """Python's own standard library sources: text that ships on every machine."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [str(stdlib / "argparse.py"), str(stdlib / "json")]


def _plain_gpt_loss(config, train: np.ndarray, val: np.ndarray, steps: int, batch: int) -> float:
    """The same model trained by a plain single-process torch loop: its val loss per token."""
    from raymb.models import build_model

    torch.manual_seed(config.train.seed)
    T = train.shape[1] - 1
    model = build_model(config.model, (T,), 256)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr)
    g = torch.Generator().manual_seed(123)
    data = torch.from_numpy(train.astype(np.int64))
    for _ in range(steps):
        rows = data[torch.randint(0, len(data), (batch,), generator=g)]
        logits = model(rows[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), rows[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        v = torch.from_numpy(val.astype(np.int64))
        logits = model(v[:, :-1])
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, 256), v[:, 1:].reshape(-1)
        ).item()


def test_text_gpt_learns_like_a_plain_loop_and_samples(train, tmp_path, capsys):
    out = tmp_path / "text"
    argv = [
        "prepare",
        "text",
        *_corpus(),
        "--out",
        str(out),
        "--block-size",
        "64",
        "--glob",
        "*.py",
    ]
    assert cli(argv) == 0
    steps, batch = 240, 32
    sets = (
        "run.name=text",
        f"data.train={out / 'train'}",
        f"data.val={out / 'val'}",
        "model.name=gpt",
        "model.depth=2",
        "model.width=64",
        "model.heads=4",
        "optim.name=adam",
        "optim.lr=0.001",
        f"train.global_batch_size={batch}",
        "train.epochs=100",
        f"train.max_steps={steps}",
        "scale.workers=2",
    )
    result = train(*sets)
    summary = result.summary
    config = load_config(None, list(sets))
    blocks = np.stack(pq.read_table(out / "train")["tokens"].to_numpy(zero_copy_only=False))
    val = np.stack(pq.read_table(out / "val")["tokens"].to_numpy(zero_copy_only=False))
    reference = _plain_gpt_loss(config, blocks, val, steps, batch)
    assert summary["val_loss"] < math.log(256) * 0.6  # it learned: far below uniform bytes
    assert abs(summary["val_loss"] - reference) <= 0.05 * reference, (summary, reference)
    assert summary["val_perplexity"] == pytest.approx(math.exp(summary["val_loss"]))
    assert summary["val_bits_per_byte"] == pytest.approx(summary["val_loss"] / math.log(2))

    capsys.readouterr()
    argv = ["sample", "--checkpoint", result.checkpoint, "--prompt", "def ", "--tokens", "40"]
    assert cli([*argv, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["tokens"]) == 40
    assert cli([*argv, "--seed", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == printed  # seeded: the same draw

    assert cli(["eval", "--checkpoint", result.checkpoint, "--data", str(out / "val")]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["loss"] == pytest.approx(summary["val_loss"], rel=1e-4)
    assert measured["perplexity"] == pytest.approx(math.exp(measured["loss"]))
