"""The worker's rules, each against values worked out by hand: when a checkpoint is due
(raymb.worker.checkpointer.Checkpointer.due), the stop request and the abort on a non-finite
loss (raymb.worker.stopping.StopRequest), early stopping (EarlyStopper), and the fault.*
drills that wrap the epoch loop's step batches (raymb.worker.drills)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from raymb import storage
from raymb.config import Config
from raymb.worker.checkpointer import Checkpointer, Progress
from raymb.worker.drills import with_drills
from raymb.worker.stopping import STOP_FILE, EarlyStopper, StopRequest


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def session() -> SimpleNamespace:
    reports: list = []
    return SimpleNamespace(
        rank=0,
        world=1,
        device=torch.device("cpu"),
        reports=reports,
        report=lambda metrics, checkpoint: reports.append(metrics),
    )


def saved_steps(config: Config, *, mode="epochs", epochs=2, steps_per_epoch=5, seconds=1.0):
    """The steps an epoch loop of `epochs` x `steps_per_epoch` checkpoints at, a step taking
    `seconds` (a report restarts the interval, as Checkpointer.report does)."""
    clock = Clock()
    checkpointer = Checkpointer(config, session(), mode=mode, clock=clock)
    total, saved = epochs * steps_per_epoch, []
    for step in range(1, total + 1):
        clock.now += seconds
        epoch_end = step % steps_per_epoch == 0
        if checkpointer.due(step, end=step == total, epoch_end=epoch_end):
            saved.append(step)
            checkpointer.report({"step": step}, None)
    return saved


def config(**checkpoint) -> Config:
    return Config.from_dict({"checkpoint": checkpoint})


def test_every_steps_epoch_ends_and_the_end():
    # every_steps=3 over 2 epochs of 5: the multiples of 3 (3, 6, 9), the epoch ends (5, 10)
    # with no interval to wait, and the end (10).
    assert saved_steps(config(every_steps=3, min_interval_s=0)) == [3, 5, 6, 9, 10]
    # Unset every_steps: the epoch ends only.
    assert saved_steps(config(min_interval_s=0)) == [5, 10]


def test_an_epoch_end_waits_for_min_interval_under_grad_sync():
    # 1 s a step, 60 s apart: the epoch end at step 5 comes 2 s after step 3's checkpoint and
    # is skipped; the end (10) always checkpoints.
    assert saved_steps(config(every_steps=3, min_interval_s=60)) == [3, 6, 9, 10]
    # 30 s a step: step 5 comes 150 s after the start (>= 60): it checkpoints.
    assert saved_steps(config(min_interval_s=60), seconds=30) == [5, 10]
    # 10 s a step: step 5 at 50 s (< 60) is skipped.
    assert saved_steps(config(min_interval_s=60), seconds=10) == [10]
    # Under param sync a checkpoint averages the workers: every epoch end checkpoints.
    param = Config.from_dict({"checkpoint": {"min_interval_s": 60}, "train": {"sync": "param"}})
    assert saved_steps(param, seconds=10) == [5, 10]


def test_a_stop_checkpoints_the_next_step_and_follow_only_after_each_file():
    checkpointer = Checkpointer(config(every_steps=3), session(), mode="epochs")
    assert not checkpointer.due(7)
    assert checkpointer.due(7, stop=True)
    # --follow: a checkpoint after each file (end=True), never every_steps within one.
    follow = Checkpointer(config(every_steps=3), session(), mode="follow")
    assert not follow.due(3) and not follow.due(6)
    assert follow.due(4, end=True)


def test_stop_request_and_the_abort_on_a_non_finite_loss(tmp_path):
    stop_file = storage.resolve(tmp_path) / STOP_FILE
    clock = Clock()
    assert not StopRequest(stop_file, rank=1, clock=clock).look()  # only rank 0 looks
    assert not StopRequest(None, rank=0, clock=clock).look()  # nowhere to look
    stop = StopRequest(stop_file, rank=0, clock=clock)
    assert not stop.look()  # looked at t=0: no file
    stop_file.write_bytes(b"")
    clock.now = 0.4
    assert not stop.look()  # at most every 0.5 s locally
    clock.now = 0.5
    assert stop.look()
    stop.heard(None, False)
    assert not stop.requested
    stop.heard(None, True)
    assert stop.requested
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 5"):
        stop.heard(5, False)
    assert stop.requested  # once asked, asked


def early(metric: str, values: list[float | None], *, patience=2, min_delta=0.1):
    """(best, since_best, stopped_early) after each checkpoint's `metric`."""
    raw = {
        "checkpoint": {"metric": metric},
        "train": {"early_stopping": {"patience": patience, "min_delta": min_delta}},
    }
    stopper, progress, seen = EarlyStopper.of(Config.from_dict(raw)), Progress(), []
    for value in values:
        metrics = {metric: value, "stopped_early": progress.stopped_early}
        stopper.update(progress, metrics)
        assert metrics["stopped_early"] == progress.stopped_early
        seen.append((progress.best, progress.since_best, progress.stopped_early))
    return seen


def test_early_stopping_counts_checkpoints_without_improvement():
    # min: 0.95 improves on 1.0 by 0.05, 0.75 and 0.74 on 0.8 by 0.05 and 0.06 (< 0.1: not
    # better); 0.8 improves by 0.2.
    assert early("val_loss", [1.0, 0.95, 0.8, 0.75, 0.74]) == [
        (1.0, 0, False),
        (1.0, 1, False),
        (0.8, 0, False),
        (0.8, 1, False),
        (0.8, 2, True),
    ]
    # max (val_accuracy): higher is better; 0.65 beats 0.5 by 0.15, 0.7 beats 0.65 by 0.05.
    assert early("val_accuracy", [0.5, 0.65, 0.7, 0.6]) == [
        (0.5, 0, False),
        (0.65, 0, False),
        (0.65, 1, False),
        (0.65, 2, True),
    ]
    # A checkpoint without the metric counts for nothing; unset patience, never.
    assert early("val_loss", [None, 1.0, None]) == [
        (None, 0, False),
        (1.0, 0, False),
        (1.0, 0, False),
    ]
    assert early("val_loss", [1.0, 2.0, 3.0], patience=None) == [(None, 0, False)] * 3


def test_drills_wrap_the_batches_of_their_rank_and_fire_once(tmp_path):
    run_dir = storage.resolve(tmp_path)
    progress = Progress(step=2)

    def batches(batch, step_in_epoch, epoch):
        return [(torch.ones(2, 3), torch.zeros(2))], "keys"

    nan = Config.from_dict({"fault": {"nan_at_step": 3, "rank": 1}}).fault
    assert with_drills(batches, Config().fault, run_dir, 0, progress) is batches  # none set
    assert with_drills(batches, nan, run_dir, 0, progress) is batches  # another rank's
    drilled = with_drills(batches, nan, run_dir, 1, progress)
    microbatches, keys = drilled(None, 2, 0)  # step 3 is the next: its x is NaN
    assert torch.isnan(microbatches[0][0]).all() and keys == "keys"
    assert (tmp_path / ".fault-nan-at-step-3").exists()
    again = with_drills(batches, nan, run_dir, 1, progress)  # a replacement worker
    microbatches, _ = again(None, 2, 0)
    assert not torch.isnan(microbatches[0][0]).any()  # once per run directory
    progress.step = 3
    microbatches, _ = with_drills(batches, nan, run_dir, 1, progress)(None, 3, 0)
    assert not torch.isnan(microbatches[0][0]).any()  # step 4: not the drill's
