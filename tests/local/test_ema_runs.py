"""train.ema_decay on the torch session: the average of the weights against one by hand over
the same steps of plain gradient descent, on W = 2 x k = 2; a run resumed on W = 1 x k = 4
equal to it; model.pt holding the average, state.pt the weights, validation on the average.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from local_run import train_local

from raymb import load_config
from raymb.rundir.checkpoint import STATE_FILE, read

LR, G, STEPS, DECAY, WARMUP = 0.2, 64, 6, 0.8, 3
COMMON = (
    f"train.global_batch_size={G}",
    "data.shuffle=none",
    f"optim.lr={LR}",
    "optim.momentum=0.0",
    f"train.ema_decay={DECAY}",
    f"train.ema_warmup_steps={WARMUP}",
)


def _run(runs: Path, data: Path, name: str, *sets: str) -> tuple[dict, dict]:
    """(model.pt, state.pt) of the run's last checkpoint."""
    config = load_config(
        None,
        [
            f"data.train={data / 'train'}",
            f"data.val={data / 'val'}",
            f"run.storage_path={runs}",
            f"run.name={name}",
            *COMMON,
            *sets,
        ],
    )
    model_pt = Path(train_local(config).checkpoint)
    return read(model_pt), read(model_pt.parent / STATE_FILE)


def _columns(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    table = pq.read_table(path)
    x = torch.tensor(table["features"].to_pylist(), dtype=torch.float64)
    return x, torch.tensor(table["label"].to_pylist(), dtype=torch.float64)


def _reference(data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, their average) after STEPS steps of gradient descent on G rows at a time,
    the average updated after each: d_t = DECAY x t / WARMUP for t < WARMUP, then DECAY."""
    x, y = _columns(data / "train")
    torch.manual_seed(0)
    init = torch.nn.Linear(1, 1)  # raymb seeds train.seed=0 before building the model
    theta = torch.cat([init.weight.detach().flatten(), init.bias.detach()]).double()
    ema = theta.clone()
    for t in range(STEPS):
        xs, ys = x[t * G : (t + 1) * G, 0], y[t * G : (t + 1) * G]
        err = theta[0] * xs + theta[1] - ys
        theta = theta - LR * torch.stack([(2 * err * xs).mean(), (2 * err).mean()])
        d = DECAY * t / WARMUP if t < WARMUP else DECAY
        ema = d * ema + (1 - d) * theta
    return theta, ema


def _pair(state_dict: dict) -> torch.Tensor:
    return torch.cat([state_dict["weight"].flatten(), state_dict["bias"]]).double()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def test_ema_on_two_workers_and_resumed_on_one_is_the_hand_average(runs, linear_data):
    theta, ema = _reference(linear_data)
    straight = _run(
        runs,
        linear_data,
        "ema",
        "scale.workers=2",
        "train.microbatch_size=16",
        f"train.max_steps={STEPS}",
    )
    # Resumed: W = 1 x k = 4 to step 2, then W = 2 x k = 2 to the end.
    _run(
        runs,
        linear_data,
        "ema-resumed",
        "scale.workers=1",
        "train.microbatch_size=16",
        "train.max_steps=2",
    )
    resumed = _run(
        runs,
        linear_data,
        "ema-resumed",
        "scale.workers=2",
        "train.microbatch_size=16",
        f"train.max_steps={STEPS}",
    )
    assert resumed[1]["progress"]["resumed_from_steps"] == [2]
    for model_pt, state in (straight, resumed):
        assert model_pt["ema_decay"] == DECAY
        torch.testing.assert_close(_pair(model_pt["state_dict"]), ema, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(_pair(state["weights"]), theta, rtol=1e-5, atol=1e-6)
        assert state["ema"]["updates"] == STEPS
        # Validation is of the average: its mean squared error on data.val, by hand.
        x, y = _columns(linear_data / "val")
        mse = ((ema[0] * x[:, 0] + ema[1] - y) ** 2).mean().item()
        assert state["progress"]["val_loss"] == pytest.approx(mse, rel=1e-5)
