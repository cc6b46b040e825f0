"""train.noise_scale (raymb.core.noise, the probe in raymb.core.noise_probe): the estimate of
the real loop on gloo processes (raymb.driver.local.train_torch, no Ray) against B_simple
worked out from every row's own gradient, and the parameters with the flag on equal those
with it off, bit for bit."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import assert_refused

from raymb import load_config
from raymb.config.toml import to_toml
from raymb.core.noise import NoiseScale, batch_advice, unbiased_pair
from raymb.driver.local import train_torch
from raymb.driver.report.summary import format_summary
from raymb.rundir.checkpoint import read

pytestmark = pytest.mark.timeout(600)

ROWS, D, NOISE_SD = 4096, 4, 1.5


@pytest.fixture(scope="module")
def regression(tmp_path_factory):
    """y = x . w + noise with w = 0: near a freshly made linear model's parameters, so the
    gradient is small beside its noise (B_simple of the order of the batch)."""
    out = tmp_path_factory.mktemp("noise") / "train"
    out.mkdir()
    rng = np.random.default_rng(11)
    x = rng.standard_normal((ROWS, D)).astype(np.float32)
    y = (NOISE_SD * rng.standard_normal(ROWS)).astype(np.float32)
    flat = pa.array(x.reshape(-1))
    table = pa.table({"features": pa.FixedSizeListArray.from_arrays(flat, D), "label": y})
    pq.write_table(table, out / "part-00000.parquet")
    return out, x.astype(np.float64), y.astype(np.float64)


def _config(data, tmp_path, name, *sets):
    return load_config(
        None,
        [
            f"data.train={data}",
            "model.name=linear",
            "checkpoint.metric=train_loss",
            f"run.storage_path={tmp_path}",
            f"run.name={name}",
            "train.log_every=1",
            *sets,
        ],
    )


def _exact_b_simple(model_pt, x, y) -> float:
    """tr(Sigma) / |G|^2 over every row's own gradient of (w.x + b - y)^2, at the model's
    parameters: numpy, nothing of raymb's."""
    state = read(model_pt)["state_dict"]
    w = state["weight"].double().numpy().reshape(-1)
    b = float(state["bias"].double().numpy().reshape(-1)[0])
    residual = x @ w + b - y
    grads = 2 * residual[:, None] * np.hstack([x, np.ones((len(y), 1))])
    mean = grads.mean(axis=0)
    trace = ((grads - mean) ** 2).sum(axis=1).mean()
    return float(trace / (mean @ mean))


def _last_estimate(run_dir) -> float:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["grad_noise_scale"] == "" or float(rows[0]["grad_noise_scale"]) >= 0
    return float(rows[-1]["grad_noise_scale"])


@pytest.mark.parametrize(
    "layout",
    [
        ["scale.workers=2"],  # B_small: one worker's 32 rows
        ["scale.workers=1", "train.microbatch_size=16"],  # B_small: half a step, 32 rows
    ],
    ids=["W2", "W1k4"],
)
def test_estimate_is_within_a_quarter_of_b_simple(regression, tmp_path, layout):
    data, x, y = regression
    config = _config(
        data,
        tmp_path,
        "est",
        "optim.lr=1e-7",  # the parameters barely move: one B_simple for the whole run
        "train.global_batch_size=64",
        "train.epochs=8",  # 512 steps: the moving average settles
        "train.noise_scale=true",
        *layout,
    )
    model_pt = train_torch(config)
    exact = _exact_b_simple(model_pt, x, y)
    assert 20 < exact < 500, exact  # the set-up gives a B_simple the test can resolve
    estimate = _last_estimate(tmp_path / "est")
    assert abs(estimate / exact - 1) < 0.25, (estimate, exact)


@pytest.mark.parametrize(
    "layout",
    [
        ["scale.workers=2", "train.microbatch_size=8"],
        ["scale.workers=1", "train.microbatch_size=8"],
    ],
    ids=["W2k2", "W1k4"],
)
def test_parameters_equal_with_the_flag_off(regression, tmp_path, layout):
    data, _, _ = regression
    common = [
        "model.name=mlp",
        "model.hidden=[8]",
        "optim.name=adam",
        "optim.lr=0.01",
        "train.global_batch_size=32",
        "train.max_steps=12",
        *layout,
    ]
    off = read(train_torch(_config(data, tmp_path, "off", *common)))["state_dict"]
    on_pt = train_torch(_config(data, tmp_path, "on", *common, "train.noise_scale=true"))
    on = read(on_pt)["state_dict"]
    assert off.keys() == on.keys()
    for key in off:
        assert torch.equal(off[key], on[key]), key
    with open(tmp_path / "off" / "metrics.csv", newline="") as f:
        assert "grad_noise_scale" not in next(csv.reader(f))  # off: metrics.csv as before
    assert _last_estimate(tmp_path / "on") > 0


def test_unbiased_pair_inverts_the_expectations():
    # E|G_b|^2 = |G|^2 + tr / b, at b = 8 and 64: the pair gives back |G|^2 = 3, tr = 40.
    grad_sq, trace = 3.0, 40.0
    small, big = grad_sq + trace / 8, grad_sq + trace / 64
    assert unbiased_pair(small, 1 / 8, big, 1 / 64) == pytest.approx((grad_sq, trace))
    noise = NoiseScale()
    noise.add(small, 1 / 8, big, 1 / 64)
    noise.add(small, 1 / 64, big, 1 / 64)  # one batch size twice: no information, left out
    assert noise.steps == 1 and noise.value == pytest.approx(trace / grad_sq)
    assert NoiseScale.from_state(noise.state()) == noise


def test_the_result_table_says_when_g_is_far_from_the_estimate():
    assert batch_advice(2000.0, 64) == (
        "critical batch ≈ 2,000 rows: the global batch G = 64 is far below it"
    )
    assert batch_advice(3.0, 64).endswith("is far above it")
    assert batch_advice(300.0, 64) is None and batch_advice(None, 64) is None
    summary = {"grad_noise_scale": 2000.0, "global_batch_size": 64, "wall_s": 1.0}
    table = format_summary(summary, "runs/x")
    assert "noise scale" in table and "far below it" in table
    assert "noise scale" not in format_summary({"wall_s": 1.0}, "runs/x")


def test_print_config_says_when_one_worker_has_nothing_to_compare(tmp_path):
    one = load_config(None, ["scale.workers=1", "train.noise_scale=true"])
    assert "no second batch size" in to_toml(one)
    split = load_config(
        None, ["scale.workers=1", "train.noise_scale=true", "train.microbatch_size=16"]
    )
    assert "no second batch size" not in to_toml(split)
    json.dumps(split.to_dict())


@pytest.mark.parametrize("sync", ["param", "diloco"])
def test_noise_scale_needs_gradient_all_reduce(tmp_path, sync):
    args = ["train", "--set", f"train.sync={sync}", "--set", "train.noise_scale=true"]
    assert_refused(args, tmp_path, "train.sync", "train.noise_scale")
