"""summary.json's train_loss and metrics.csv's rows are defined by the training alone: the same
for a run straight and one resumed twice on other numbers of workers, and, for full-batch
gradient descent, the means of the per-step losses worked out here by hand.

The real epoch loop on gloo processes (raymb.worker.session.TorchSession, no Ray): a run is
interrupted by train.max_steps and resumed with another scale.workers, as `raymb train` is.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from raymb import load_config
from raymb.driver.closing import summarize
from raymb.driver.launch import run_torch
from raymb.driver.local import local_spec
from raymb.driver.preflight import run_location
from raymb.worker.epochs import train_loop

pytestmark = pytest.mark.timeout(600)

REPORT = "last-report.json"


def _loop(spec, *, session_factory) -> None:
    """train_loop on a TorchSession; rank 0 keeps the last report, what fit() returns."""
    session = session_factory(Path(spec.run_dir.path))
    train_loop({"spec": spec}, session)
    if session.rank == 0:
        (Path(spec.run_dir.path) / REPORT).write_text(json.dumps(session.reports[-1]))


def _train(data: Path, runs: Path, name: str, *overrides: str) -> tuple[dict, dict[int, float]]:
    """(summary.json as the driver writes it, metrics.csv's train_loss by step)."""
    sets = [
        f"data.train={data / 'train'}",
        f"data.val={data / 'val'}",
        f"run.storage_path={runs}",
        f"run.name={name}",
        *overrides,
    ]
    config = load_config(None, sets)
    spec = local_spec(config)
    run_dir = Path(spec.run_dir.path)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_torch(_loop, (spec,), config.scale.max_workers)
    report = json.loads((run_dir / REPORT).read_text())
    result = SimpleNamespace(metrics=report, checkpoint=None, best_checkpoints=[])
    summary = summarize(result, 0.0, config, run_location(config))
    with open(run_dir / "metrics.csv") as f:
        losses = {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(f)}
    return summary, losses


# 1024 rows, G=64: 16 steps an epoch, 32 in all; a row every 5 steps, and at each checkpoint
# (every epoch's end: min_interval_s=0, so no clock decides).
MINIBATCH = (
    "train.epochs=2",
    "train.global_batch_size=64",
    "train.microbatch_size=16",
    "train.log_every=5",
    "checkpoint.min_interval_s=0",
    "optim.lr=0.2",
    "optim.momentum=0.5",
)


def test_a_run_resumed_twice_on_other_worker_counts_has_the_straight_runs_rows_and_summary(
    linear_data, tmp_path
) -> None:
    # Straight on 1 worker (one process: the cheapest reference).
    straight, straight_rows = _train(
        linear_data, tmp_path, "straight", "scale.workers=1", *MINIBATCH
    )
    # Steps 1-13 on 2 workers, 14-23 on 1, 24-32 on 2: the rows of 15 and 25 reach back past
    # a resume, into steps the invocation before trained.
    _train(linear_data, tmp_path, "resumed", "scale.workers=2", "train.max_steps=13", *MINIBATCH)
    _train(linear_data, tmp_path, "resumed", "scale.workers=1", "train.max_steps=23", *MINIBATCH)
    resumed, resumed_rows = _train(linear_data, tmp_path, "resumed", "scale.workers=2", *MINIBATCH)

    assert resumed["resumed_from_steps"] == [13, 23]
    assert straight["steps"] == resumed["steps"] == 32
    assert sorted(straight_rows) == [5, 10, 15, 16, 20, 25, 30, 32]
    # The resumed run checkpointed at 13 and 23 as well; those rows are its only extra ones.
    assert sorted(resumed_rows) == sorted([*straight_rows, 13, 23])
    for step, loss in straight_rows.items():
        assert resumed_rows[step] == pytest.approx(loss, rel=1e-5), step
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-5)
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], rel=1e-5)


def test_full_batch_rows_and_train_loss_are_means_of_the_per_step_losses(
    linear_data, tmp_path
) -> None:
    # 12 full-batch steps of plain gradient descent on 2 workers; a row every 5 steps and at
    # the end. An epoch is 1 step, fewer than log_every: train_loss is the last step's loss.
    summary, rows = _train(
        linear_data,
        tmp_path,
        "full",
        "scale.workers=2",
        "train.global_batch_size=all",
        "train.microbatch_size=512",
        "train.epochs=12",
        "train.log_every=5",
        "optim.lr=0.5",
        "optim.momentum=0.0",
        "checkpoint.min_interval_s=3600",  # no epoch-end checkpoint: rows at 5, 10, 12 only
    )

    # Independent reference: the loss before each step of plain gradient descent, float64.
    import pyarrow.parquet as pq

    table = pq.read_table(linear_data / "train")
    x = torch.tensor(table["features"].to_pylist(), dtype=torch.float64)
    y = torch.tensor(table["label"].to_pylist(), dtype=torch.float64)
    torch.manual_seed(0)
    init = torch.nn.Linear(1, 1)  # raymb seeds train.seed=0 before building the model
    w, b = init.weight.detach().double(), init.bias.detach().double()
    losses = []
    for _ in range(12):
        err = (x @ w.T).squeeze(-1) + b - y
        losses.append(float((err**2).mean()))
        w = w - 0.5 * (2 * err[:, None] * x).mean(0, keepdim=True)
        b = b - 0.5 * (2 * err).mean(0, keepdim=True)

    assert sorted(rows) == [5, 10, 12]
    assert rows[5] == pytest.approx(sum(losses[0:5]) / 5, rel=1e-5)
    assert rows[10] == pytest.approx(sum(losses[5:10]) / 5, rel=1e-5)
    assert rows[12] == pytest.approx(sum(losses[10:12]) / 2, rel=1e-5)  # since the grid's 10
    assert summary["train_loss"] == pytest.approx(losses[11], rel=1e-5)
    assert summary["steps"] == 12
