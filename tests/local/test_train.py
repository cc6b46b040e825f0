"""raymb's loop and numbers on the torch session: the regression learned under param sync,
the bytes all-reduced, a non-finite loss aborted or skipped on every worker, full-batch
equality for an uneven split, early stopping's best checkpoint (`raymb train --local`). The
runs are the real epoch loop on a gloo group of local processes (`train_local`,
raymb.driver.local.train_torch; no Ray); what only Ray or the Ray driver does (workers killed
and replaced, resumes on another W, streaming, the driver's one-line error) is in
tests/integration/test_train_ray.py and test_local.py, with the same configuration.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from local_run import train_local

from raymb import load_config
from raymb.driver.launch import run_torch
from raymb.driver.local import local_spec
from raymb.tools.load import load_model
from raymb.worker.epochs import train_loop
from raymb.worker.spec import EpochsSpec

# 1024 rows / 2 workers = 512 a worker; G=64 -> 32 rows a worker a step (k=2 microbatches of
# 16): 16 steps an epoch, 32 in 2 epochs. Checkpoints at steps 5, 10, 15, 16 (epoch end), ...
# (test_train_ray.py's COMMON and PARAM).
COMMON = (
    "scale.workers=2",
    "train.epochs=2",
    "train.global_batch_size=64",
    "train.microbatch_size=16",
    "train.log_every=1",
    "checkpoint.every_steps=5",
    "optim.lr=0.2",
    "optim.momentum=0.5",
)
PARAM = ("train.sync=param", "train.average_every=4")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def _config(runs: Path, data: Path, *overrides: str):
    sets = [f"data.train={data / 'train'}", f"run.storage_path={runs}", *overrides]
    if not any(s.startswith("data.val=") for s in overrides):
        sets.append(f"data.val={data / 'val'}")
    return load_config(None, sets)


@pytest.fixture(scope="module")
def train(linear_data, runs):
    """`train(*sets)`: a run on linear_data on the torch session, under `runs`."""
    return lambda *sets: train_local(_config(runs, linear_data, *sets))


@pytest.fixture(scope="module")
def straight_grad(train):
    return train("run.name=straight-grad", *COMMON)


@pytest.fixture(scope="module")
def straight_param(train):
    return train("run.name=straight-param", *COMMON, *PARAM)


def test_two_workers_learn_the_regression_under_param_sync(straight_param):
    # (Under grad sync, on Ray Train with summary.json: test_train_ray.py.)
    result = straight_param
    model, _ = load_model(result.checkpoint)
    assert model.weight.item() == pytest.approx(2.0, abs=0.05)
    assert model.bias.item() == pytest.approx(1.0, abs=0.05)
    summary = result.summary
    assert summary["steps"] == 32 and summary["samples"] == 2 * 1024
    assert summary["resumed_from_steps"] == [] and summary["val_accuracy"] is None
    assert summary["val_loss"] < 0.02  # noise variance is 0.01
    assert summary["skipped_steps"] == 0 and summary["stopped_early"] is False
    steps = [int(r["step"]) for r in csv.DictReader(open(result.run_dir / "metrics.csv"))]
    assert steps == list(range(1, 33))


def test_bytes_allreduced(straight_grad, straight_param):
    # grad: one all-reduce of the 2 float32 parameters (8 bytes) per step.
    assert straight_grad.summary["bytes_allreduced"] == 32 * 8
    # param, H=4: 8 averagings at steps 4, 8, ..., 32, and one more before each checkpoint
    # that falls mid-period (steps 5, 10, 15, 25, 30; 16 and 20 end periods).
    assert straight_param.summary["bytes_allreduced"] == (8 + 5) * 8


def _loop_noting_errors(spec: EpochsSpec, out: Path, *, session_factory) -> None:
    """The epoch loop (as train_torch runs it), each rank writing the FloatingPointError it
    raised, if any, to out/<rank>."""
    session = session_factory(Path(spec.run_dir.path))
    try:
        train_loop({"spec": spec}, session)
    except FloatingPointError as e:
        (out / str(session.rank)).write_text(str(e))


def test_non_finite_loss_aborts_every_worker(runs, linear_data, tmp_path):
    # Only rank 1's loss is NaN at step 3: both workers learn it at the same gather and stop.
    # (The driver's one-line error for a failed run: tests/integration/test_local.py.)
    config = _config(
        runs,
        linear_data,
        "run.name=nan-abort",
        *COMMON,
        *PARAM,
        "fault.nan_at_step=3",
        "fault.rank=1",
        "train.epochs=1",
    )
    spec = local_spec(config)
    Path(spec.run_dir.path).mkdir(parents=True, exist_ok=True)
    run_torch(_loop_noting_errors, (spec, tmp_path), 2)
    for rank in (0, 1):
        message = (tmp_path / str(rank)).read_text()
        assert "non-finite loss or gradient at step 3" in message, (rank, message)


def test_non_finite_loss_skipped_on_every_worker(train):
    result = train(
        "run.name=nan-skip",
        *COMMON,
        "train.on_nan=skip",
        "fault.nan_at_step=3",
        "fault.rank=1",
        "train.epochs=1",
    )
    assert result.summary["skipped_steps"] == 1 and result.summary["steps"] == 16
    model, _ = load_model(result.checkpoint)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_full_batch_is_the_same_for_any_split(train, linear_data):
    # 1024 rows, "all", 30 epochs on W=3 (342, 341 and 341 rows: uneven) x k=3 microbatches
    # of up to 128 against plain gradient descent. (W=2 and W=1, with elastic workers, a lost
    # node and a bucket: tests/system/test_multinode.py.)
    common = (
        "train.global_batch_size=all",
        "train.epochs=30",
        "optim.momentum=0.0",
        "optim.lr=0.5",
        "data.val=none",
        "checkpoint.metric=train_loss",
    )
    splits = ((3, 128),)
    results = [
        train(
            f"run.name=full-w{w}-m{m}",
            f"scale.workers={w}",
            f"train.microbatch_size={m}",
            *common,
        )
        for w, m in splits
    ]
    assert [r.summary["steps"] for r in results] == [30]
    models = [load_model(r.checkpoint)[0] for r in results]

    # Independent reference: 30 steps of plain gradient descent on all rows at once.
    import pyarrow.parquet as pq

    table = pq.read_table(linear_data / "train")
    x = torch.tensor(table["features"].to_pylist(), dtype=torch.float32)
    y = torch.tensor(table["label"].to_pylist(), dtype=torch.float32)
    torch.manual_seed(0)
    init = torch.nn.Linear(1, 1)  # raymb seeds train.seed=0 before building the model
    w, b = init.weight.detach().clone(), init.bias.detach().clone()
    for _ in range(30):
        err = (x @ w.T).squeeze(-1) + b - y
        w = w - 0.5 * (2 * err[:, None] * x).mean(0, keepdim=True)
        b = b - 0.5 * (2 * err).mean(0, keepdim=True)
    for model in models:
        torch.testing.assert_close(model.weight.detach(), w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.bias.detach(), b, rtol=1e-5, atol=1e-6)


def _overfitting_data(out: Path) -> Path:
    """32 noisy rows of a 16-feature regression, repeated 40 times (each step sees the same
    rows again, as in 40 epochs), and 256 fresh validation rows from the same distribution."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(5)
    w = rng.standard_normal(16)
    for split, rows, repeat in (("train", 32, 40), ("val", 256, 1)):
        x = rng.standard_normal((rows, 16)).astype(np.float32)
        y = (x @ w + 2 * rng.standard_normal(rows)).astype(np.float32)
        x, y = np.tile(x, (repeat, 1)), np.tile(y, repeat)
        features = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 16)
        (out / split).mkdir(parents=True)
        pq.write_table(pa.table({"features": features, "label": y}), out / split / "0.parquet")
    return out


def test_early_stopping_reports_the_best_checkpoint(runs, tmp_path):
    # `raymb train --local`: the driver's summary.json and status, from the checkpoints the
    # workers kept (checkpoint.keep=1: the best by val_loss, and the latest).
    import raymb

    data = _overfitting_data(tmp_path / "overfit")
    result = raymb.train(
        _config(
            runs,
            data,
            "run.name=early",
            "scale.launcher=local",
            "scale.workers=2",
            "train.epochs=1",
            "train.global_batch_size=32",
            "model.name=mlp",
            "model.hidden=[128, 128]",
            "optim.name=adam",
            "optim.lr=0.01",
            "checkpoint.every_steps=1",
            "checkpoint.keep=1",
            "train.early_stopping.patience=3",
        )
    )
    val = {}
    for row in csv.DictReader(open(Path(result.run_dir.path) / "metrics.csv")):
        val[int(row["step"])] = float(row["val_loss"])
    best = min(val, key=val.get)
    assert result.summary["stopped_early"] is True
    # It stops at the third validation without a new best, long before the 40 steps.
    assert result.summary["steps"] == max(val) == best + 3 < 40
    assert result.summary["checkpoint"] == result.summary["best_checkpoint"]
    state = torch.load(
        Path(result.summary["checkpoint"]).parent / "state.pt",
        map_location="cpu",
        weights_only=True,
    )
    assert state["progress"]["step"] == best
