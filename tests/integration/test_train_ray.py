"""Ray integration: real Ray Train workers and Ray Data, one local Ray session for the module.

What Ray does here: the two-worker run with its summary.json and TensorBoard events, a killed
worker replaced, failures exhausted and the run resumed by name, a resume on other numbers of
workers, streamed reads killed and resumed, bad values found by the workers' first read, the
local cluster, early stopping's best checkpoint. raymb's numbers and loop without Ray (param
sync, bytes all-reduced, non-finite losses, full-batch splits) are in tests/local/.

Runs share a data set and a configuration (2 workers, 16 steps an epoch, a checkpoint every
5 steps) so the straight runs serve as references for the interrupted ones; where a reference
is raymb's numbers alone, it is the same run on the torch session (raymb.driver.local.
train_torch, equal to Ray Train's: test_session_ray.py), which costs no Ray Train fit.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from raymb import RaymbError, load_config
from raymb.driver.local import train_torch
from raymb.errors import DataError
from raymb.rundir.checkpoint import STATE_FILE, read
from raymb.tools.load import load_model

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

# 1024 rows / 2 workers = 512 a worker; G=64 -> 32 rows a worker a step (k=2 microbatches of
# 16): 16 steps an epoch, 32 in 2 epochs. Checkpoints at steps 5, 10, 15, 16 (epoch end), ...
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


def _train(runs: Path, data: Path, *overrides: str):
    import raymb

    return raymb.train(_config(runs, data, *overrides))


def _on_torch(runs: Path, data: Path, *overrides: str) -> SimpleNamespace:
    """The run on the torch session, as a reference: its checkpoint, run_dir and the summary
    keys the tests compare (train.log_every=1: summary.json's train_loss is the last row's)."""
    model_pt = train_torch(_config(runs, data, *overrides))
    progress = read(model_pt.parent / STATE_FILE)["progress"]
    run_dir = model_pt.parent.parent
    last = list(csv.DictReader(open(run_dir / "metrics.csv")))[-1]
    summary = {
        "steps": progress["step"],
        "val_loss": progress["val_loss"],
        "train_loss": float(last["train_loss"]),
    }
    return SimpleNamespace(run_dir=run_dir, checkpoint=str(model_pt), summary=summary)


@pytest.fixture(scope="module")
def straight_grad(ray_session, linear_data, runs):
    return _train(runs, linear_data, "run.name=straight-grad", "log.tensorboard=true", *COMMON)


@pytest.fixture(scope="module")
def straight_param(linear_data, runs):
    """The reference of the killed param run, on the torch session."""
    return _on_torch(runs, linear_data, "run.name=straight-param", *COMMON, *PARAM)


def _same_model(a, b, rtol=1e-6) -> None:
    for p, q in zip(
        load_model(a.checkpoint)[0].parameters(), load_model(b.checkpoint)[0].parameters()
    ):
        torch.testing.assert_close(p, q, rtol=rtol, atol=rtol / 10)


def _losses(result) -> dict[int, float]:
    rows = csv.DictReader(open(result.run_dir / "metrics.csv"))
    return {int(r["step"]): float(r["train_loss"]) for r in rows}


def test_two_workers_learn_the_regression(straight_grad):
    # (Under param sync, on the torch session: tests/local/test_train.py.)
    result = straight_grad
    model, _ = load_model(result.checkpoint)
    assert model.weight.item() == pytest.approx(2.0, abs=0.05)
    assert model.bias.item() == pytest.approx(1.0, abs=0.05)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["steps"] == 32 and summary["samples"] == 2 * 1024
    assert summary["resumed_from_steps"] == [] and summary["val_accuracy"] is None
    assert summary["val_loss"] < 0.02  # noise variance is 0.01
    assert summary["skipped_steps"] == 0 and summary["stopped_early"] is False
    steps = [int(r["step"]) for r in csv.DictReader(open(result.run_dir / "metrics.csv"))]
    assert steps == list(range(1, 33))


def test_tensorboard_events_hold_the_metrics_csv_rows(straight_grad):
    # Read back with TensorBoard's own reader: every metrics.csv row's train_loss, by step.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(
        str(straight_grad.run_dir / "tensorboard"), size_guidance={"scalars": 0}
    )
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train_loss")}
    assert logged.keys() == _losses(straight_grad).keys()
    for step, loss in _losses(straight_grad).items():
        assert logged[step] == pytest.approx(loss, rel=1e-6)


def test_a_session_this_process_started_is_a_local_cluster(straight_grad):
    # ray.init() here, then raymb.train (as the Python API allows): the cluster ends with this
    # process, so its runs leave out Ray Train's preemption watcher, as `raymb train`'s do.
    from ray._private import state

    from raymb.driver.cluster import started_here

    assert started_here()
    started = {a["ActorClassName"] for a in state.actors().values()}
    assert "TrainController" in started and "PreemptionWatcher" not in started, started


def test_killed_worker_is_replaced_and_the_run_ends_as_if_never_killed(
    ray_session, linear_data, runs, straight_param
):
    # Rank 1 dies before step 13, mid-epoch and mid-period (4 steps) of param sync: training
    # resumes from the checkpoint at step 10 with each worker's own optimizer state. (A kill
    # under grad: the exhausted-failures test below, the streamed kill, and a whole node lost
    # in tests/system/test_multinode.py.)
    straight = straight_param
    killed = _train(
        runs,
        linear_data,
        "run.name=killed-param",
        *COMMON,
        *PARAM,
        "fault.kill_worker_at_step=13",
        "fault.rank=1",
        "scale.max_failures=1",
    )
    assert killed.summary["resumed_from_steps"] == [10]
    assert killed.summary["steps"] == 32
    _same_model(killed, straight)
    assert killed.summary["val_loss"] == pytest.approx(straight.summary["val_loss"], rel=1e-6)
    want, got = _losses(straight), _losses(killed)
    assert sorted(got) == list(range(1, 33))
    for step in range(1, 33):  # rows 1-10 from before the kill, the rest from after
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
    assert killed.summary["train_loss"] == pytest.approx(straight.summary["train_loss"], rel=1e-6)


def test_exhausted_failures_keep_the_checkpoint_and_the_run_resumes_by_name(
    linear_data, runs, straight_grad
):
    args = ("run.name=exhausted", *COMMON, "fault.kill_worker_at_step=13")
    with pytest.raises(RaymbError) as info:
        _train(runs, linear_data, *args)  # scale.max_failures=0
    message = str(info.value)
    assert "training failed" in message and "\n" not in message
    assert "latest checkpoint:" in message and "run.name='exhausted'" in message
    latest = Path(message.split("latest checkpoint: ")[1].split(" (run again")[0])
    model, payload = load_model(latest)  # intact and loadable
    assert payload["config"]["run"]["name"] == "exhausted"
    assert not (runs / "exhausted" / "summary.json").exists()

    # Started again with the same name: resumes at step 10 and ends like the straight run.
    resumed = _train(runs, linear_data, *args)
    assert resumed.summary["resumed_from_steps"] == [10]
    _same_model(resumed, straight_grad)


def test_a_run_resumed_with_other_numbers_of_workers_ends_as_the_straight_run(
    linear_data, runs, straight_grad
):
    # Steps 1-10 on 2 workers (k=2), 11-20 on 1 (k=4), the rest on 4 (k=1): every step takes
    # the same 64 rows whatever W (raymb.core.plan), so the end is the straight 2-worker run's.
    name = "run.name=resized"
    first = _train(runs, linear_data, name, *COMMON, "train.max_steps=10")
    assert first.summary["steps"] == 10
    second = _train(runs, linear_data, name, *COMMON, "scale.workers=1", "train.max_steps=20")
    assert second.summary["steps"] == 20
    last = _train(runs, linear_data, name, *COMMON, "scale.workers=4")
    assert last.summary["steps"] == straight_grad.summary["steps"] == 32
    assert last.summary["resumed_from_steps"] == [10, 20]
    _same_model(last, straight_grad, rtol=1e-5)
    # metrics.csv and summary.json are the training's, not the invocations': row for row.
    want, got = _losses(straight_grad), _losses(last)
    assert sorted(got) == sorted(want) == list(range(1, 33))
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step
    assert last.summary["train_loss"] == pytest.approx(
        straight_grad.summary["train_loss"], rel=1e-5
    )


def test_streamed_data_killed_and_resumed_ends_as_the_cached_run(ray_session, linear_data, runs):
    # data.cache=false streams every epoch through Ray Data; shuffle "files" draws the same
    # file order as the cached path, so the rows, and the numbers, are the same. One epoch,
    # checkpoints at 10 and 16: each streamed pass starts Ray Data reads in the workers
    # (seconds each on this machine). The cached run, the reference, is on the torch session
    # (its cache is the driver's read, as train_torch's).
    files = (
        *COMMON,
        "data.shuffle=files",
        "train.epochs=1",
        "checkpoint.every_steps=10",
        "data.val=none",  # a streamed validation pass costs another Ray Data start
        "checkpoint.metric=train_loss",
    )
    cached = _on_torch(runs, linear_data, "run.name=files-cached", "data.cache=true", *files)
    streamed = _train(
        runs,
        linear_data,
        "run.name=files-streamed-killed",
        "data.cache=false",
        *files,
        "fault.kill_worker_at_step=13",
        "fault.rank=1",
        "scale.max_failures=1",
    )
    assert streamed.summary["resumed_from_steps"] == [10]
    _same_model(streamed, cached)
    want, got = _losses(cached), _losses(streamed)
    assert sorted(got) == list(range(1, 17))
    for step in range(1, 17):
        assert got[step] == pytest.approx(want[step], rel=1e-6), step


@pytest.mark.parametrize(
    "cache,columns,expected",
    [
        ("true", "features", "b.parquet: 3 rows with NaN or inf in 'features'"),
        ("false", '["x1", "x2"]', "b.parquet: 3 rows with NaN or inf in 'x2'"),
    ],
)
def test_bad_feature_values_stop_the_first_read_with_one_line(
    ray_session, tmp_path, cache, columns, expected
):
    # Before Ray starts only footers and labels are read; the workers' first read of the
    # features (cached or streamed) finds rows 1, 4 and 6 of b.parquet: NaN, inf and -inf.
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "train"
    data.mkdir()
    for name, bad in (("a.parquet", []), ("b.parquet", [1, 4, 6])):
        x = np.arange(16, dtype=np.float32).reshape(8, 2)
        for row, value in zip(bad, (float("nan"), float("inf"), -float("inf"))):
            x[row, 1] = value
        table = pa.table(
            {
                "features": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 2),
                "x1": x[:, 0],
                "x2": x[:, 1],
                "label": np.zeros(8, dtype=np.float32),
            }
        )
        pq.write_table(table, data / name)
    storage = tmp_path / "runs"
    with pytest.raises(DataError) as info:
        _train(
            storage,
            tmp_path,
            "run.name=bad",
            f"data.features={columns}",
            f"data.cache={cache}",
            "data.shuffle=none",
            "data.val=none",
            "checkpoint.metric=train_loss",
            "train.global_batch_size=16",
        )
    message = str(info.value)
    assert expected in message and message.startswith("data.train: ") and "\n" not in message
    assert not (storage / "bad").exists()  # a fresh run that found bad data leaves nothing


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


def test_early_stopping_reports_the_best_checkpoint(ray_session, runs, tmp_path):
    data = _overfitting_data(tmp_path / "overfit")
    result = _train(
        runs,
        data,
        "run.name=early",
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
    val = {}
    for row in csv.DictReader(open(result.run_dir / "metrics.csv")):
        val[int(row["step"])] = float(row["val_loss"])
    best = min(val, key=val.get)
    assert result.summary["stopped_early"] is True
    # It stops at the third validation without a new best, long before the 40 steps.
    assert result.summary["steps"] == max(val) == best + 3 < 40
    assert result.summary["checkpoint"] == result.summary["best_checkpoint"]
    state = torch.load(
        Path(result.checkpoint).parent / "state.pt", map_location="cpu", weights_only=True
    )
    assert state["progress"]["step"] == best
