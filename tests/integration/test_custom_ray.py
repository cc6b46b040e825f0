"""Your own code on Ray: raymb.train(config, model=..., loss=<a closure>, metrics=<a closure>)
carries the callables to Ray Train's workers (cloudpickled, as Ray carries a training
function) and ends with the parameters and validation metrics of one plain torch process.
The contract's numerics across W x k, resumes and resizes are on the torch session
(tests/local/test_custom.py); this is the one Ray behaviour: the callables reach the workers."""

from __future__ import annotations

import json

import pytest
import torch
from custom_parts import TwoInputs, columns, weighted_loss, write_two_inputs

from raymb import load_config
from raymb.rundir.checkpoint import read

ROWS, G, LR, SEED = 40, 16, 0.5, 4

pytestmark = pytest.mark.ray


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
    got = read(result.checkpoint)["state_dict"]
    for key, want in model.state_dict().items():
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6, msg=key)
    val = columns(tmp_path / "val")
    with torch.no_grad():
        right = model(tab=val["tab"], ids=val["ids"]).argmax(dim=1) == val["label"]
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["val_acc"] == pytest.approx(right.double().mean().item())
