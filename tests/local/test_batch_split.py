"""Issue 41's batches on the torch session: microbatches that do not divide a worker's share
of a step, a W that does not divide G, and the full-batch config that names nothing but
global_batch_size = "all" and optim.name = "lbfgs". Each against an independent reference
(plain gradient descent by hand, numpy's least squares).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from local_run import train_local

from raymb import load_config
from raymb.tools.load import load_model


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def _train(runs: Path, data: Path, *sets: str):
    config = load_config(
        None,
        [
            f"data.train={data / 'train'}",
            f"run.storage_path={runs}",
            "data.val=none",
            "checkpoint.metric=train_loss",
            *sets,
        ],
    )
    return load_model(train_local(config).checkpoint)[0]


def _rows(data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    table = pq.read_table(data / "train")  # data.shuffle = "none": the files' order
    x = torch.tensor(table["features"].to_pylist(), dtype=torch.float64)
    y = torch.tensor(table["label"].to_pylist(), dtype=torch.float64)
    return x, y


@pytest.mark.parametrize(
    "G, m",
    [
        (64, 5),  # shares of 32 rows: 6 microbatches of 5 and one of 2 on each worker
        (63, 5),  # shares of 32 and 31 rows: 6 x 5 + 2, and 6 x 5 + 1 (uneven workers)
    ],
)
def test_uneven_microbatches_on_two_workers_are_one_process(runs, linear_data, G, m):
    lr, steps = 0.2, 12
    model = _train(
        runs,
        linear_data,
        f"run.name=uneven-{G}-{m}",
        "scale.workers=2",
        f"train.global_batch_size={G}",
        f"train.microbatch_size={m}",
        f"train.max_steps={steps}",
        "data.shuffle=none",
        f"optim.lr={lr}",
        "optim.momentum=0.0",
    )
    # Independent reference: one process, plain gradient descent on G rows at a time, in the
    # rows' order, on the mean squared error.
    x, y = _rows(linear_data)
    torch.manual_seed(0)
    init = torch.nn.Linear(1, 1)  # raymb seeds train.seed=0 before building the model
    w, b = init.weight.detach().double(), init.bias.detach().double()
    for s in range(steps):
        xs, ys = x[s * G : (s + 1) * G], y[s * G : (s + 1) * G]
        err = (xs @ w.T).squeeze(-1) + b - ys
        w = w - lr * (2 * err[:, None] * xs).mean(0, keepdim=True)
        b = b - lr * (2 * err).mean(0, keepdim=True)
    torch.testing.assert_close(model.weight.detach().double(), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bias.detach().double(), b, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def wide_data(tmp_path_factory) -> Path:
    """y = 2x + 1 + noise for x in [-5, 5), 1000 rows in 2 files. The spread matters: torch's
    L-BFGS stops where its direction's slope is under 1e-9 (tolerance_change), which on x in
    [-1, 1) leaves the slope 3e-5 from the optimum; here under 1e-6."""
    out = tmp_path_factory.mktemp("wide") / "train"
    out.mkdir()
    rng = np.random.default_rng(5)
    x = rng.uniform(-5, 5, 1000).astype(np.float32)
    y = (2 * x + 1 + rng.normal(0, 0.1, 1000)).astype(np.float32)
    for i, part in enumerate((slice(0, 500), slice(500, 1000))):
        features = pa.FixedSizeListArray.from_arrays(pa.array(x[part]), 1)
        table = pa.table({"features": features, "label": pa.array(y[part])})
        pq.write_table(table, out / f"part-{i:05d}.parquet")
    return out.parent


@pytest.mark.parametrize("workers", [1, 2])
def test_full_batch_lbfgs_needs_nothing_else_and_reaches_least_squares(runs, wide_data, workers):
    # Nothing but "all" and "lbfgs": m defaults to a worker's share (it fits the budget), and
    # optim.lr to 1, L-BFGS's own step.
    model = _train(
        runs,
        wide_data,
        f"run.name=lbfgs-w{workers}",
        f"scale.workers={workers}",
        "train.global_batch_size=all",
        "optim.name=lbfgs",
        "train.epochs=2",
    )
    x, y = _rows(wide_data)
    design = np.hstack([x.numpy(), np.ones((len(y), 1))])
    (w, b), *_ = np.linalg.lstsq(design, y.numpy(), rcond=None)
    got = [model.weight.item(), model.bias.item()]
    np.testing.assert_allclose(got, [w, b], rtol=1e-5, atol=1e-6)
