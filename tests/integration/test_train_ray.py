"""Ray integration: real Ray Train workers and Ray Data, one local Ray session for the module.

What Ray does here: the two-worker run with its summary.json and TensorBoard events, a killed
worker replaced while streamed reads are killed and resumed, a resume on other numbers of
workers, bad values found by the workers' first read, the local cluster. raymb's numbers and
loop without Ray (param sync, bytes all-reduced, non-finite losses, full-batch splits, early
stopping's best checkpoint) are in tests/local/; failures exhausted and the run resumed by
name, in tests/integration/test_local.py's launches.

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

from raymb import load_config
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
LOCAL = "scale.launcher=local"  # raymb train --local: the torch session, no Ray


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


def test_a_killed_worker_is_replaced_and_streamed_reads_resume_as_if_never_killed(
    ray_session, linear_data, runs
):
    # Rank 1 dies before step 13, mid-period (4 steps) of param sync: training resumes from
    # the checkpoint at step 10 with each worker's own optimizer state. data.cache=false
    # streams the epoch through Ray Data; shuffle "files" draws the same file order as the
    # cached path, so the rows, and the numbers, are the same. One epoch, checkpoints at 10
    # and 16: each streamed pass starts Ray Data reads in the workers (seconds each on this
    # machine). The reference, the cached run never killed, is on the torch session (its
    # cache is the driver's read, as train_torch's). (A kill under grad sync: the Ray launch
    # of tests/integration/test_local.py, and a whole node lost in
    # tests/system/test_multinode.py.)
    files = (
        *COMMON,
        *PARAM,
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
    assert streamed.summary["steps"] == 16
    _same_model(streamed, cached)
    want, got = _losses(cached), _losses(streamed)
    assert sorted(got) == list(range(1, 17))
    for step in range(1, 17):  # rows 1-10 from before the kill, the rest from after
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
    assert streamed.summary["train_loss"] == pytest.approx(cached.summary["train_loss"], rel=1e-6)


def test_a_run_resumed_with_other_numbers_of_workers_ends_as_the_straight_run(
    linear_data, runs, straight_grad
):
    # Steps 1-10 on 1 worker (k=4, `raymb train --local`), the rest on Ray on 4 workers (k=1):
    # every step takes the same 64 rows whatever W (raymb.core.plan), so the end is the
    # straight 2-worker run's. (Resumed twice, 2 -> 1 -> 4 workers, on the torch session:
    # tests/unit/worker/test_resumed_metrics.py; on Ray from --local and back:
    # tests/integration/test_local.py.)
    name = "run.name=resized"
    first = _train(runs, linear_data, name, *COMMON, "scale.workers=1", "train.max_steps=10", LOCAL)
    assert first.summary["steps"] == 10
    last = _train(runs, linear_data, name, *COMMON, "scale.workers=4")
    assert last.summary["steps"] == straight_grad.summary["steps"] == 32
    assert last.summary["resumed_from_steps"] == [10]
    _same_model(last, straight_grad, rtol=1e-5)
    # metrics.csv and summary.json are the training's, not the invocations': row for row.
    want, got = _losses(straight_grad), _losses(last)
    assert sorted(got) == sorted(want) == list(range(1, 33))
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step
    assert last.summary["train_loss"] == pytest.approx(
        straight_grad.summary["train_loss"], rel=1e-5
    )


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
