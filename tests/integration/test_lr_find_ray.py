"""`raymb lr-find` end to end under Ray Train, through the command line: two workers, the
curve and picture in <run.name>-lr-find/, the run's own directory never made, and the last
line the suggestion to paste; the curve equals the plain torch.distributed run's
(raymb.driver.lr_find with backend="gloo"), which clears the folder Ray Train wrote: it is
recognised as an lr-find's own."""

from __future__ import annotations

import csv
import json
import math

import pytest

from raymb import load_config
from raymb.cli.main import main
from raymb.driver.lr_find import lr_find

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def test_lr_find_on_ray_suggests_a_rate_and_leaves_the_run_alone(
    ray_session, linear_data, tmp_path, capsys
):
    sets = [
        f"data.train={linear_data / 'train'}",
        f"run.storage_path={tmp_path}",
        "run.name=lin",
        "scale.workers=2",
        "train.global_batch_size=64",
    ]
    args = ["lr-find", "--min", "1e-4", "--max", "100", "--steps", "30"]
    assert main([*args, *(a for s in sets for a in ("--set", s))]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("raymb: suggested optim.lr=")
    suggested = float(lines[-1].split("=", 1)[1])
    out = tmp_path / "lin-lr-find"
    assert (out / "lr_find.png").stat().st_size > 0
    assert not (tmp_path / "lin").exists()  # the run's own directory: never made
    with open(out / "lr_find.csv", newline="") as f:
        on_ray = [(float(r["lr"]), float(r["loss"])) for r in csv.DictReader(f)]
    marker = json.loads((out / "lr_find.json").read_text())
    assert marker["status"] == "finished" and marker["steps_done"] == len(on_ray)
    assert not (out / ".lock").exists() and not (out / "STOP").exists()
    config = load_config(None, sets)
    on_torch = lr_find(config, low=1e-4, high=100.0, steps=30, backend="gloo")
    assert [lr for lr, _ in on_ray] == on_torch.lrs
    for (_, a), b in zip(on_ray, on_torch.losses):
        assert math.isclose(a, b, rel_tol=1e-6) or not math.isfinite(a)
    assert float(f"{on_torch.suggested:.3g}") == suggested
