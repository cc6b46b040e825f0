"""The worker loop behind its session seam, in one local Ray session:

- one run under Ray Train and the same run on a plain torch.distributed gloo group
  (raymb.worker.session.TorchSession, no Ray in the workers) end with the same parameters and
  the same metrics.csv losses;
- your own code on Ray: raymb.train(config, model=..., loss=<a closure>, metrics=<a closure>)
  carries the callables to Ray Train's workers (cloudpickled, as Ray carries a training
  function) and ends with the parameters and validation metrics of one plain torch process.
  The contract's numerics across W x k, resumes and resizes are on the torch session
  (tests/local/test_custom.py); this is the one Ray behaviour: the callables reach the workers.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from custom_parts import TwoInputs, columns, weighted_loss, write_two_inputs

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


ROWS, G, LR, SEED = 40, 16, 0.5, 4  # the custom run's


def test_closures_from_python_train_on_ray(ray_session, tmp_path) -> None:
    import raymb

    write_two_inputs(tmp_path / "train", ROWS, seed=1)
    write_two_inputs(tmp_path / "val", 12, seed=2, files=1)
    scale = 2.0  # closed over: the loss is scale x each row's weighted cross-entropy

    def loss(outputs, targets):
        sums, counts = weighted_loss(outputs, targets)
        return scale * sums, counts

    def metrics(outputs, targets):
        right = (outputs.argmax(dim=1) == targets["label"]).double()
        return {"acc": (right.sum(), len(right))}

    config = load_config(
        None,
        [
            f"data.train={tmp_path / 'train'}",
            f"data.val={tmp_path / 'val'}",
            f"run.storage_path={tmp_path / 'runs'}",
            'data.inputs=["tab", "ids"]',
            'data.targets=["label", "weight"]',
            "data.shuffle=none",
            "train.epochs=1",
            f"train.global_batch_size={G}",
            "train.microbatch_size=4",
            f"train.seed={SEED}",
            "scale.workers=2",
            "optim.name=sgd",
            f"optim.lr={LR}",
            "optim.momentum=0",
        ],
    )
    factory = lambda shapes, classes: TwoInputs(shapes, classes)  # noqa: E731
    result = raymb.train(config, model=factory, loss=loss, metrics=metrics)

    torch.manual_seed(SEED)
    model = TwoInputs({"tab": (3,), "ids": (6,)}, 3)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rows = columns(tmp_path / "train")
    for start in range(0, ROWS, G):
        step = {k: v[start : start + G] for k, v in rows.items()}
        sums, counts = loss(model(tab=step["tab"], ids=step["ids"]), step)
        opt.zero_grad()
        (sums.sum() / counts.sum()).backward()
        opt.step()
    payload = read(result.checkpoint)
    assert tuple(payload["given"]) == ("model", "loss", "metrics")  # the tools say so
    got = payload["state_dict"]
    for key, want in model.state_dict().items():
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6, msg=key)
    val = columns(tmp_path / "val")
    with torch.no_grad():
        right = model(tab=val["tab"], ids=val["ids"]).argmax(dim=1) == val["label"]
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["val_acc"] == pytest.approx(right.double().mean().item())
