"""Ray integration: real Ray Train workers and Ray Data, one local Ray session for the module."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from raymb import load_config
from raymb.checkpoint import load_model
from raymb.synth import generate

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def linear_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("linear")
    generate("linear", out, rows=1024, shards=4, noise=0.1, seed=3)
    return out


def _train(tmp: Path, data: Path, *overrides: str):
    import raymb

    sets = [f"data.train={data / 'train'}", f"run.storage_path={tmp / 'runs'}", *overrides]
    if not any(s.startswith("data.val=") for s in overrides):
        sets.append(f"data.val={data / 'val'}")
    return raymb.train(load_config(None, sets))


def test_two_workers_learn_the_regression(ray_session, linear_data, tmp_path):
    result = _train(
        tmp_path,
        linear_data,
        "run.name=fit",
        "scale.workers=2",
        "train.epochs=3",
        "train.global_batch_size=32",
        "train.microbatch_size=8",
        "optim.lr=0.1",
    )
    model, _ = load_model(result.checkpoint)
    assert model.weight.item() == pytest.approx(2.0, abs=0.05)
    assert model.bias.item() == pytest.approx(1.0, abs=0.05)

    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert set(summary) == {
        "train_loss",
        "val_loss",
        "val_accuracy",
        "steps",
        "samples",
        "samples_per_s",
        "wall_s",
        "checkpoint",
        "resumed_from_steps",
        "bytes_allreduced",
    }
    # 1024 rows / 2 workers = 512 per worker, 16 per worker per step: 32 steps an epoch.
    assert summary["steps"] == 3 * 32 and summary["samples"] == 3 * 1024
    assert summary["resumed_from_steps"] == [] and summary["val_accuracy"] is None
    # One all-reduce of the 2 float32 parameters per step.
    assert summary["bytes_allreduced"] == 3 * 32 * 2 * 4
    assert summary["val_loss"] < 0.02  # noise variance is 0.01
    rows = list(csv.DictReader(open(result.run_dir / "metrics.csv")))
    assert [int(r["step"]) for r in rows][-1] == 96
    assert all(float(r["samples_per_s"]) > 0 for r in rows)


def test_full_batch_is_the_same_for_any_split(ray_session, linear_data, tmp_path):
    # 1024 rows, "all": 2 workers x k=2 microbatches of 256, 1 worker x k=4, and 4 workers x k=1
    # (4 workers on this 2-core machine: raymb must leave Ray Data a CPU, or the run hangs).
    common = (
        "train.global_batch_size=all",
        "train.microbatch_size=256",
        "train.epochs=3",
        "optim.momentum=0.0",
        "optim.lr=0.5",
        "data.val=none",
        "checkpoint.metric=train_loss",
    )
    runs = [
        _train(tmp_path, linear_data, f"run.name=w{w}", f"scale.workers={w}", *common)
        for w in (2, 1, 4)
    ]
    assert [r.summary["steps"] for r in runs] == [3, 3, 3]
    models = [load_model(r.checkpoint)[0] for r in runs]

    # Independent reference: three steps of plain gradient descent on all rows at once.
    import pyarrow.parquet as pq

    table = pq.read_table(linear_data / "train")
    x = torch.tensor(table["features"].to_pylist(), dtype=torch.float32)
    y = torch.tensor(table["label"].to_pylist(), dtype=torch.float32)
    torch.manual_seed(0)
    init = torch.nn.Linear(1, 1)  # raymb seeds train.seed=0 before building the model
    w, b = init.weight.detach().clone(), init.bias.detach().clone()
    for _ in range(3):
        err = (x @ w.T).squeeze(-1) + b - y
        w = w - 0.5 * (2 * err[:, None] * x).mean(0, keepdim=True)
        b = b - 0.5 * (2 * err).mean(0, keepdim=True)
    for model in models:
        torch.testing.assert_close(model.weight.detach(), w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.bias.detach(), b, rtol=1e-5, atol=1e-6)


def test_stopped_run_resumes_at_its_step(ray_session, linear_data, tmp_path):
    common = (
        "scale.workers=2",
        "train.epochs=2",
        "train.global_batch_size=64",
        "train.microbatch_size=16",
        "train.log_every=4",
    )
    straight = _train(tmp_path, linear_data, "run.name=straight", *common)
    stopped = _train(tmp_path, linear_data, "run.name=again", "train.max_steps=11", *common)
    assert stopped.summary["steps"] == 11  # mid-epoch: 16 steps an epoch
    resumed = _train(tmp_path, linear_data, "run.name=again", *common)
    assert resumed.summary["resumed_from_steps"] == [11]
    assert resumed.summary["steps"] == straight.summary["steps"] == 32
    assert resumed.summary["samples"] == straight.summary["samples"]
    assert resumed.summary["val_loss"] == pytest.approx(straight.summary["val_loss"], rel=1e-6)
    a, _ = load_model(straight.checkpoint)
    b, _ = load_model(resumed.checkpoint)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    steps = [int(r["step"]) for r in csv.DictReader(open(resumed.run_dir / "metrics.csv"))]
    assert steps == sorted(set(steps)), "each step appears once in metrics.csv after a resume"
