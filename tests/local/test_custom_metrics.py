"""A metric of your own (metrics.name's val_<name>) as checkpoint.metric, with checkpoint.mode:
the kept checkpoint, summary.json's best_checkpoint and early stopping follow its direction.
`raymb train --local` runs (raymb's real loop and closing sequence on gloo processes, no Ray);
the expected checkpoint is picked independently, from metrics.csv's validation rows.

Data: tests/custom_parts.py's two-input rows (60 training, 22 validation), G = 8 with a high
learning rate, so that the metric (the probability given to each row's label, val_sure) goes
up and down from one checkpoint (every step) to the next.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from custom_parts import TWO_INPUTS, write_two_inputs

import raymb
from raymb import load_config
from raymb.rundir.checkpoint import STATE_FILE, read

OWN = (
    *TWO_INPUTS,
    'loss.name="custom_parts:weighted_loss"',
    'metrics.name="custom_parts:sure"',
    'checkpoint.metric="val_sure"',
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("custom-metrics")
    write_two_inputs(root / "train", 60, seed=1)
    write_two_inputs(root / "val", 22, seed=2, files=1)
    return root


def _train(data: Path, tmp: Path, name: str, *sets: str) -> dict:
    config = load_config(
        None,
        [
            f"data.train={data / 'train'}",
            f"data.val={data / 'val'}",
            f"run.storage_path={tmp}",
            f"run.name={name}",
            "scale.launcher=local",
            "scale.workers=2",
            "data.shuffle=none",
            "train.epochs=2",
            "train.global_batch_size=8",
            "train.seed=3",
            "optim.lr=1.0",
            "optim.momentum=0.9",
            "checkpoint.every_steps=1",
            "checkpoint.keep=1",
            *OWN,
            *sets,
        ],
    )
    raymb.train(config)
    return json.loads((tmp / name / "summary.json").read_text())


def _validated(run_dir: Path) -> dict[int, float]:
    """step -> val_sure of metrics.csv's rows with a validation (every checkpoint's)."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["val_sure"]) for r in csv.DictReader(f) if r["val_sure"]}


def _step(model_pt: str) -> int:
    return read(Path(model_pt).parent / STATE_FILE)["progress"]["step"]


def _kept(run_dir: Path) -> set[int]:
    return {_step(str(c / "model.pt")) for c in run_dir.glob("checkpoint_*")}


@pytest.mark.parametrize("mode", ["max", "min"])
def test_the_best_checkpoint_is_the_one_of_the_most_or_least_val_sure(data, tmp_path, mode):
    summary = _train(data, tmp_path, mode, f'checkpoint.mode="{mode}"')
    values = _validated(tmp_path / mode)
    assert len(values) == summary["steps"] == 16  # a validation at every step's checkpoint
    pick = max if mode == "max" else min
    best = pick(values, key=lambda s: (values[s], s))  # a tie: the later, as Ray Train keeps
    assert best != 16, "the metric must move: its best is not the latest checkpoint"
    assert _step(summary["best_checkpoint"]) == best
    assert _kept(tmp_path / mode) == {best, 16}  # checkpoint.keep = 1: the best, and the latest
    assert summary["val_sure"] == pytest.approx(values[16])


def test_early_stopping_waits_for_val_sure_to_go_up(data, tmp_path):
    summary = _train(
        data, tmp_path, "early", 'checkpoint.mode="max"', "train.early_stopping.patience=2"
    )
    values = _validated(tmp_path / "early")
    # By hand: stop at the second validation in a row that does not beat the best so far.
    best, since, stop = None, 0, None
    for step in sorted(values):
        if best is None or values[step] > best:
            best, since = values[step], 0
        else:
            since += 1
            if since == 2:
                stop = step
                break
    assert stop is not None and stop < 16, "the metric must fall twice in a row"
    assert summary["stopped_early"] and summary["steps"] == stop
    assert max(values.values()) == best  # nothing after the stop
    assert summary["checkpoint"] == summary["best_checkpoint"]
    assert values[_step(summary["best_checkpoint"])] == best
