"""Online training (--follow): files arriving while the run goes, exactly once across a restart.

The tests share one local Ray session; the parts that need no Ray:
tests/unit/worker/test_online.py.
"""

from __future__ import annotations

import csv
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from online_files import LR, D, G, follow_config, write_file

from raymb import load_config
from raymb.driver.run import follow
from raymb.rundir.checkpoint import STATE_FILE, read
from raymb.tools.load import load_model

pytestmark = pytest.mark.timeout(600)


def _reference(directory: Path, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """One process, plain gradient descent: steps of G rows over each file in turn."""
    torch.manual_seed(0)  # raymb seeds train.seed=0 before building the model
    init = torch.nn.Linear(D, 1)
    w, b = init.weight.detach().clone(), init.bias.detach().clone()
    for name in names:
        table = pq.read_table(directory / name)
        x = torch.tensor(table["features"].to_pylist(), dtype=torch.float32)
        y = torch.tensor(table["label"].to_pylist(), dtype=torch.float32)
        for s in range(0, len(y), G):
            xb, yb = x[s : s + G], y[s : s + G]
            err = (xb @ w.T).squeeze(-1) + b - yb
            w = w - LR * (2 * err[:, None] * xb).mean(0, keepdim=True)
            b = b - LR * (2 * err).mean(0, keepdim=True)
    return w, b


def _files_recorded(run_dir: Path) -> int:
    """Files the run has checkpointed so far, from metrics.csv (epoch counts files)."""
    try:
        with open(run_dir / "metrics.csv", newline="") as f:
            return max((int(r["epoch"]) for r in csv.DictReader(f) if r.get("epoch")), default=0)
    except (FileNotFoundError, ValueError):  # not there yet, or a row half-written
        return 0


@pytest.mark.ray
def test_arriving_files_are_trained_exactly_once_across_a_restart(ray_session, tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    run_dir = tmp_path / "runs" / "stream"
    # Arrival order differs from name order; 37 and 1 rows give short last steps that do not
    # split evenly over 2 workers (1 row: one worker trains on an empty batch).
    first = [("c.parquet", 64), ("a.parquet", 37), ("d.parquet", 1), ("b.parquet", 50)]
    val = tmp_path / "val"
    val.mkdir()
    write_file(val, "val.parquet", 40, seed=99)
    failures: list[BaseException] = []

    def producer() -> None:
        try:
            (incoming / "_SUCCESS").write_text("")  # markers and temporaries are not data
            (incoming / ".e.parquet.tmp").write_bytes(b"PAR1 half")
            for i, (name, rows) in enumerate(first):
                write_file(incoming, name, rows, seed=i)
                deadline = time.monotonic() + 120
                while _files_recorded(run_dir) < i + 1:
                    assert time.monotonic() < deadline, f"{name} was never checkpointed"
                    time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: stop after the file in hand
        except BaseException as e:
            failures.append(e)

    thread = threading.Thread(target=producer)
    thread.start()
    config = follow_config(
        tmp_path,
        "run.name=stream",
        f"data.val={val}",
        "checkpoint.metric=val_loss",
        "log.tensorboard=true",  # --follow tracks as train does (one driver path)
    )
    try:
        stopped = follow(config, incoming, idle_timeout=20)
    finally:
        thread.join()
    assert not failures, failures
    s = stopped.summary
    assert s["stop_reason"] == "interrupted" and s["files_consumed"] == 4
    assert s["steps"] == 8 + 5 + 1 + 7 and s["samples"] == 64 + 37 + 1 + 50

    # Restart with two more files: a name that sorts before every consumed one, and one after.
    write_file(incoming, "e.parquet", 23, seed=10)
    write_file(incoming, "0-late.parquet", 64, seed=11)
    resumed = follow(config, incoming, idle_timeout=1)
    s = resumed.summary
    assert s["stop_reason"] == "idle" and s["resumed_from_steps"] == [21]
    assert s["steps"] == 21 + 8 + 3 and s["samples"] == 152 + 64 + 23
    order = [n for n, _ in first] + ["0-late.parquet", "e.parquet"]
    state = read(Path(s["checkpoint"]).parent / STATE_FILE)
    assert state["progress"]["files"] == [
        [n, pq.read_metadata(incoming / n).num_rows] for n in order
    ]

    model, _ = load_model(s["checkpoint"])
    w, b = _reference(incoming, order)
    torch.testing.assert_close(model.weight.detach(), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bias.detach(), b, rtol=1e-5, atol=1e-6)
    table = pq.read_table(val / "val.parquet")
    x = torch.tensor(table["features"].to_pylist(), dtype=torch.float32)
    y = torch.tensor(table["label"].to_pylist(), dtype=torch.float32)
    val_loss = (((x @ w.T).squeeze(-1) + b - y) ** 2).mean().item()
    assert s["val_loss"] == pytest.approx(val_loss, rel=1e-4)
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 32

    # TensorBoard's own reader finds every metrics.csv row's train_loss, across the restart,
    # and the run's loss.png is drawn, as for `raymb train`.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train_loss")}
    losses = {int(r["step"]): float(r["train_loss"]) for r in rows if r["train_loss"]}
    assert logged.keys() == losses.keys() and 32 in losses  # both invocations logged
    for step, loss in losses.items():
        assert logged[step] == pytest.approx(loss, rel=1e-6)
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.ray
def test_local_sgd_with_follow(ray_session, tmp_path):
    # train.sync = "param" with H = 1 and plain SGD is gradient all-reduce when every step
    # splits evenly (G = 8 over 2 workers, files of 16 and 24 rows): the single-process
    # reference again. No data.val and no data.train: no validation, metric train_loss.
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for i, (name, rows) in enumerate([("a.parquet", 16), ("b.parquet", 24)]):
        write_file(incoming, name, rows, seed=20 + i)
    config = load_config(
        None,
        [
            f"run.storage_path={tmp_path / 'runs'}",
            "run.name=param",
            "data.features=features",
            "scale.workers=2",
            f"train.global_batch_size={G}",
            "train.sync=param",
            "train.average_every=1",
            "optim.momentum=0.0",
            f"optim.lr={LR}",
        ],
    )
    result = follow(config, incoming, idle_timeout=1)
    assert result.summary["files_consumed"] == 2 and result.summary["steps"] == 5
    assert result.summary["val_loss"] is None
    model, _ = load_model(result.summary["checkpoint"])
    w, b = _reference(incoming, ["a.parquet", "b.parquet"])
    torch.testing.assert_close(model.weight.detach(), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bias.detach(), b, rtol=1e-5, atol=1e-6)
