"""The worker loop behind its session seam: one run under Ray Train and the same run on a plain
torch.distributed gloo group (raymb.worker.session.TorchSession, no Ray in the workers) end
with the same parameters and the same metrics.csv losses."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from raymb import load_config
from raymb.driver.local import train_torch
from raymb.rundir.checkpoint import read

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

# 1024 rows, 2 workers, G=64 in k=2 microbatches of 16: 16 steps an epoch, 32 in all; a
# checkpoint every 10 steps, so the torch session saves and reports as Ray's does.
COMMON = (
    "scale.workers=2",
    "train.epochs=2",
    "train.global_batch_size=64",
    "train.microbatch_size=16",
    "train.log_every=1",
    "checkpoint.every_steps=10",
    "optim.lr=0.2",
    "optim.momentum=0.5",
)


def _config(data: Path, runs: Path, name: str):
    sets = [f"data.train={data / 'train'}", f"data.val={data / 'val'}", f"run.storage_path={runs}"]
    return load_config(None, [*sets, f"run.name={name}", *COMMON])


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    with open(run_dir / "metrics.csv") as f:
        return [(int(r["step"]), float(r["train_loss"])) for r in csv.DictReader(f)]


def test_a_run_under_the_torch_session_equals_the_run_under_ray_train(
    ray_session, linear_data, tmp_path
):
    import raymb

    on_ray = raymb.train(_config(linear_data, tmp_path, "ray"))
    on_torch = train_torch(_config(linear_data, tmp_path, "torch"))

    ray_model = read(on_ray.checkpoint)["state_dict"]
    torch_model = read(on_torch)["state_dict"]
    assert ray_model.keys() == torch_model.keys()
    for key, value in ray_model.items():
        torch.testing.assert_close(torch_model[key], value, rtol=1e-6, atol=0)
    assert read(on_torch)["config"]["run"]["name"] == "torch"
    ray_losses, torch_losses = _losses(tmp_path / "ray"), _losses(tmp_path / "torch")
    assert [s for s, _ in torch_losses] == list(range(1, 33)) == [s for s, _ in ray_losses]
    for (_, a), (_, b) in zip(ray_losses, torch_losses):
        assert a == pytest.approx(b, rel=1e-6)
    # Not a tautology: training moved the parameters far from their initial values.
    assert abs(float(torch_model["weight"].flatten()[0]) - 2.0) < 0.2
