"""`raymb eval` on a real run's checkpoint of your own model, loss and metrics (named columns,
custom_parts): the numbers its validation wrote, on the same rows, from the file alone. The run
is raymb's epoch loop on the torch session (one gloo process, no Ray)."""

from __future__ import annotations

import json

import pytest
from custom_parts import write_two_inputs
from local_run import train_local

from raymb import load_config
from raymb.cli import main
from raymb.rundir.checkpoint import STATE_FILE, read

OWN = (
    'data.inputs=["tab", "ids"]',
    'data.targets=["label", "weight"]',
    'model.name="custom_parts:two_inputs"',
    'loss.name="custom_parts:weighted_loss"',
    'metrics.name="custom_parts:hits"',
)


def test_eval_prints_the_runs_validation_numbers(tmp_path, capsys) -> None:
    write_two_inputs(tmp_path / "train", 40, seed=1)
    write_two_inputs(tmp_path / "val", 11, seed=2, files=2)
    config = load_config(
        None,
        [
            f"data.train={tmp_path / 'train'}",
            f"data.val={tmp_path / 'val'}",
            f"run.storage_path={tmp_path / 'runs'}",
            "train.epochs=1",
            "train.global_batch_size=16",
            "scale.workers=1",
            *OWN,
        ],
    )
    run = train_local(config)
    progress = read(run.checkpoint.replace("model.pt", STATE_FILE))["progress"]
    args = ["eval", "--checkpoint", run.checkpoint, "--data", str(tmp_path / "val")]
    assert main(args) == 2  # the file names code: consent first
    assert "--trust-model-code" in capsys.readouterr().err
    assert main([*args, "--trust-model-code"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["loss"] == pytest.approx(progress["val_loss"], rel=1e-6)
    assert got["accuracy"] == pytest.approx(progress["val_accuracy"], rel=1e-6)
    for name, value in got["metrics"].items():
        assert value == pytest.approx(progress["val_metrics"][f"val_{name}"], rel=1e-6)
    assert set(got["metrics"]) == {"acc", "werr"}
