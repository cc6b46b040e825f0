"""checkpoint.metric and tune.metric name a metric of your own (val_<name>, metrics.name's) with
a direction: checkpoint.mode / tune.mode. Plain Python, no Ray, no torch: the config's part;
the check against the names the metrics return is the driver's dry run
(tests/unit/driver/test_custom_refusals.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_refused

from raymb import ConfigError, load_config
from raymb.load import load_sweep


def test_a_metric_of_your_own_needs_a_mode() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ['checkpoint.metric="val_f1"'])
    line = str(e.value)
    assert len(line.splitlines()) == 1
    assert 'checkpoint.mode must be "min" or "max"' in line and "val_f1" in line


@pytest.mark.parametrize("mode", ["min", "max"])
def test_a_metric_of_your_own_with_a_mode_is_taken(mode: str) -> None:
    config = load_config(None, ['checkpoint.metric="val_f1"', f'checkpoint.mode="{mode}"'])
    assert (config.checkpoint.metric, config.checkpoint.order) == ("val_f1", mode)


@pytest.mark.parametrize(
    ("metric", "mode", "order"),
    [
        ("val_loss", "auto", "min"),
        ("train_loss", "auto", "min"),
        ("val_accuracy", "auto", "max"),
        ("val_loss", "max", "max"),  # said outright, taken as said
    ],
)
def test_auto_is_the_built_in_metrics_own_way(metric: str, mode: str, order: str) -> None:
    config = load_config(None, [f'checkpoint.metric="{metric}"', f'checkpoint.mode="{mode}"'])
    assert config.checkpoint.order == order


@pytest.mark.parametrize("metric", ["f1", "val_", "val_f-1", "accuracy"])
def test_a_metric_that_is_no_val_name_is_refused(metric: str) -> None:
    with pytest.raises(ConfigError, match=r"checkpoint.metric must be val_loss, train_loss"):
        load_config(None, [f'checkpoint.metric="{metric}"', 'checkpoint.mode="max"'])


def _sweep(tmp_path: Path, *sets: str):
    path = tmp_path / "sweep.toml"
    path.write_text('[tune.space]\n"optim.lr" = [0.1, 0.2]\n')
    return load_sweep(str(path), [f"run.storage_path={tmp_path}", *sets])


def test_tune_metric_of_your_own_needs_tune_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r'tune.mode must be "min" or "max" with tune.metric'):
        _sweep(tmp_path, 'tune.metric="val_f1"')
    sweep = _sweep(tmp_path, 'tune.metric="val_f1"', 'tune.mode="max"')
    assert (sweep.metric, sweep.mode) == ("val_f1", "max")


def test_tune_takes_checkpoint_mode_with_checkpoint_metric(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path, 'checkpoint.metric="val_f1"', 'checkpoint.mode="max"')
    assert (sweep.metric, sweep.mode) == ("val_f1", "max")
    # Another metric for tune: its own way, not checkpoint.mode's.
    sweep = _sweep(
        tmp_path, 'checkpoint.metric="val_f1"', 'checkpoint.mode="max"', 'tune.metric="val_loss"'
    )
    assert (sweep.metric, sweep.mode) == ("val_loss", "min")


def test_no_mode_is_refused_in_one_line_before_ray(tmp_path: Path) -> None:
    args = ["train", "--set", 'checkpoint.metric="val_f1"']
    assert_refused(args, tmp_path, "checkpoint.mode", "val_f1")
