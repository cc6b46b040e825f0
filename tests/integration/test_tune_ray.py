"""Issue 24 on real Ray Tune, in one local Ray session: a grid whose trials equal plain runs
(the loop on a torch.distributed group, raymb.driver.local.train_torch), read back by Ray
Tune's own ExperimentAnalysis; ASHA stopping a diverging trial; and an Optuna draw
cross-validated on k folds, its trial metric the mean of its folds, a fold being an ordinary
run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from raymb.config import Config
from raymb.driver.local import train_torch
from raymb.load import load_config, load_sweep

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _sweep_file(tmp_path: Path, data: Path, name: str, tune: str, *, workers: int) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f"""
[run]
name = "{name}"
storage_path = "{tmp_path / "runs"}"
[data]
train = "{data / "train"}"
val = "{data / "val"}"
[train]
global_batch_size = 256
epochs = 2
[scale]
workers = {workers}
{tune}
"""
    )
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _last_val_loss(run_dir: Path) -> float:
    rows = [r for r in _rows(run_dir / "metrics.csv") if r.get("val_loss")]
    return float(rows[-1]["val_loss"])


def test_a_grid_of_two_equals_two_plain_runs(ray_session, linear_data, tmp_path):
    import ray.tune

    import raymb

    # Two trials (each a Ray Train fit, 10-30 s on 2 cores) show the trials equal their plain
    # runs and the best one is chosen among them; a third would show nothing more.
    lrs = [0.01, 0.2]
    path = _sweep_file(
        tmp_path, linear_data, "grid", f'[tune.space]\n"optim.lr" = {lrs}', workers=2
    )
    result = raymb.tune(path)
    sweep_dir = tmp_path / "runs" / "grid"
    rows = _rows(sweep_dir / "trials.csv")
    assert list(rows[0]) == ["trial", "optim.lr", "val_loss", "steps", "status", "run_dir"]
    assert sorted(float(r["optim.lr"]) for r in rows) == lrs
    assert {r["status"] for r in rows} == {"finished"}
    sweep = load_sweep(path)
    for r in rows:
        # The same values and seed as a plain run: the same numbers.
        raw = sweep.trial_raw(
            {"optim.lr": float(r["optim.lr"])}, storage=str(tmp_path / "refs"), name=r["trial"]
        )
        train_torch(Config.from_dict(raw))
        reference = _last_val_loss(tmp_path / "refs" / r["trial"])
        assert float(r["val_loss"]) == pytest.approx(reference, rel=1e-6)
        assert _last_val_loss(Path(r["run_dir"])) == pytest.approx(reference, rel=1e-6)
        assert int(r["steps"]) == 8
    best = min(rows, key=lambda r: float(r["val_loss"]))
    best_config = load_config(sweep_dir / "best.toml")
    assert best_config.optim.lr == float(best["optim.lr"])
    assert best_config.run.name == "grid-best" and result.best_trial == best["trial"]
    summary = json.loads((sweep_dir / "tune.json").read_text())
    assert summary["best_trial"] == best["trial"] and summary["status"] == "finished"
    assert result.status == "finished"
    # sweep.json: what a resume is compared with (issue 34)
    started = json.loads((sweep_dir / "sweep.json").read_text())
    assert started["space"] == {"optim.lr": lrs} and started["config"]["train"]["epochs"] == 2
    assert (sweep_dir / "tune.png").stat().st_size > 0
    analysis = ray.tune.ExperimentAnalysis(str(sweep_dir))
    assert len(analysis.trials) == 2
    assert sorted(t.config["optim.lr"] for t in analysis.trials) == lrs


def test_asha_stops_the_diverging_trials_early(ray_session, linear_data, tmp_path):
    import raymb

    # 4 grows the loss each epoch. Run in this order (max_concurrent 1), ASHA keeps the first
    # at the rung, then stops a trial whose loss is worse than the rung's cutoff: the
    # percentile (1 - 1/3) of the losses recorded there before it (the first's, here).
    good, diverging = [0.1], [4.0]
    tune = (
        '[tune]\nscheduler = "asha"\ngrace_epochs = 1\nreduction_factor = 3\nmax_concurrent = 1\n'
        f'[tune.space]\n"optim.lr" = {good + diverging}'
    )
    path = _sweep_file(tmp_path, linear_data, "asha", tune + "\n", workers=1)
    path.write_text(path.read_text().replace("epochs = 2", "epochs = 3"))
    result = raymb.tune(path)
    status = {float(r["optim.lr"]): r["status"] for r in result.trials}
    steps = {float(r["optim.lr"]): r["steps"] for r in result.trials}
    for lr in diverging:
        assert status[lr] == "stopped early", result.trials
        assert steps[lr] < 12  # before the last epoch's 4 steps
    assert status[good[0]] == "finished"  # the first at the rung is never stopped
    assert result.best_values["optim.lr"] in good
    # The stopped trials' Train runs left no placement group and no controller or worker.
    import ray
    from ray._private import state
    from ray.util.placement_group import placement_group_table

    left = [g for g in placement_group_table().values() if g["state"] != "REMOVED"]
    assert left == []
    trains = ("TrainController", "RayTrainWorker")
    alive = [a["ActorClassName"] for a in state.actors().values() if a["State"] == "ALIVE"]
    assert not [a for a in alive if a in trains], alive
    free = ray.available_resources().get("CPU", 0)
    assert free == pytest.approx(ray.cluster_resources()["CPU"])


def test_optuna_draws_a_trial_whose_metric_is_the_mean_of_its_folds(
    ray_session, linear_data, tmp_path
):
    pytest.importorskip("optuna")
    import raymb

    # One trial, Optuna's draw, cross-validated on 2 folds (each fold a Ray Train fit).
    tune = (
        '[tune]\nsearch = "optuna"\nsamples = 1\ncv_folds = 2\n[tune.space]\n'
        '"optim.lr" = { loguniform = [0.01, 0.3] }\n"optim.name" = ["sgd", "adam"]\n'
    )
    path = _sweep_file(tmp_path, linear_data, "cv", tune, workers=1)
    result = raymb.tune(path)
    (row,) = result.trials
    assert row["status"] == "finished"
    assert 0.01 <= row["optim.lr"] <= 0.3 and row["optim.name"] in ("sgd", "adam")
    trial_dir = Path(row["run_dir"])
    folds = [json.loads((trial_dir / f"fold-{f}" / "summary.json").read_text()) for f in (0, 1)]
    losses = [s["val_loss"] for s in folds]
    assert row["val_loss"] == pytest.approx(sum(losses) / 2, rel=1e-12)
    assert row["val_loss_std"] == pytest.approx(abs(losses[0] - losses[1]) / 2, rel=1e-9)
    assert losses[0] != losses[1]  # two different held-out halves
    assert folds[0]["steps"] == 2 * math.ceil(512 / 256)  # half of the 1024 rows train
    # A fold is an ordinary run of the trial's draw: its config, trained without Ray, gives
    # its numbers.
    saved = json.loads((trial_dir / "fold-0" / "run.json").read_text())["config"]
    assert saved["optim"]["lr"] == row["optim.lr"] and saved["optim"]["name"] == row["optim.name"]
    saved["run"] = {"storage_path": str(tmp_path / "refs"), "name": "fold-0"}
    train_torch(Config.from_saved(saved))
    assert _last_val_loss(tmp_path / "refs" / "fold-0") == pytest.approx(losses[0], rel=1e-6)
