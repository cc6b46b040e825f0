"""The equivalence contract, without Ray: W=2 gloo processes x k=3 microbatches against one
process on the concatenated batch, step by step (docs/design.md, batch vocabulary)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from conftest import spawn_gloo
from torch import nn

from raymb.config import ModelSection, OptimSection
from raymb.core.optim import build_optimizer
from raymb.core.step import train_step
from raymb.core.sync import GradSync
from raymb.models import build_model

W, K, M = 2, 3, 4  # workers, microbatches per step, rows per microbatch
G = W * K * M  # 24 rows per full step
FULL_STEPS = 5
SHORT = 14  # a sixth step with fewer rows than G: 7 per worker, microbatches of 4 and 3
D = 5

CASES = [
    (model, optim, task)
    for model in ("linear", "mlp")
    for optim in ("sgd", "adam")
    for task in ("regression", "classification")
]


def _optim(name: str) -> OptimSection:
    return (
        OptimSection(name=name, lr=0.05, momentum=0.9)
        if name == "sgd"
        else OptimSection(name=name, lr=0.01)
    )


def _data(task: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    rows = G * FULL_STEPS + SHORT
    x = torch.randn(rows, D, generator=g)
    if task == "classification":
        return x, torch.randint(0, 3, (rows,), generator=g)
    return x, torch.randn(rows, generator=g)


def _fresh(model: str, task: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(
        ModelSection(name=model, **({"hidden": [8]} if model == "mlp" else {})),
        D,
        3 if task == "classification" else 1,
    )


def _steps() -> list[slice]:
    bounds = [G * s for s in range(FULL_STEPS + 1)] + [G * FULL_STEPS + SHORT]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def _reference(model_name: str, optim: str, task: str) -> list[list[torch.Tensor]]:
    """One process, the plain textbook loop: mean loss over the step's rows, one backward."""
    x, y = _data(task)
    model = _fresh(model_name, task)
    opt = build_optimizer(_optim(optim), model.parameters())
    history = []
    for rows in _steps():
        opt.zero_grad()
        out = model(x[rows])
        if task == "classification":
            loss = nn.functional.cross_entropy(out, y[rows])
        else:
            loss = nn.functional.mse_loss(out.squeeze(-1), y[rows])
        loss.backward()
        opt.step()
        history.append([p.detach().clone() for p in model.parameters()])
    return history


def _worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=W)
    torch.set_num_threads(1)
    out = {}
    for model_name, optim, task in CASES:
        x, y = _data(task)
        model = _fresh(model_name, task)
        sync = GradSync(W)
        net = sync.wrap(model)
        opt = build_optimizer(_optim(optim), model.parameters())
        history, calls = [], []
        for rows in _steps():
            # This worker's half of the step, cut into microbatches of at most M rows.
            n = (rows.stop - rows.start) // W
            mine = range(rows.start + rank * n, rows.start + (rank + 1) * n)
            micro = [(x[mine[i : i + M]], y[mine[i : i + M]]) for i in range(0, n, M)]
            before = sync.comm.calls
            train_step(net, opt, micro, n, sync=sync, classify=task == "classification")
            calls.append(sync.comm.calls - before)
            history.append([p.detach().clone() for p in model.parameters()])
        out[(model_name, optim, task)] = (history, calls)
    results[rank] = out
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed() -> dict:
    return spawn_gloo(_worker, W)


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_workers_times_microbatches_equal_one_process(distributed, case):
    reference = _reference(*case)
    for rank in range(W):
        history, _ = distributed[rank][case]
        assert len(history) == len(reference) == FULL_STEPS + 1
        for step, (got, want) in enumerate(zip(history, reference)):
            for p, q in zip(got, want):
                torch.testing.assert_close(
                    p, q, rtol=1e-5, atol=1e-6, msg=f"rank {rank} step {step}"
                )


def test_short_last_step_is_the_mean_over_its_own_rows(distributed):
    # The sixth step has 14 rows, not G=24: weighting by G would shrink its update by 14/24.
    case = ("linear", "sgd", "regression")
    reference = _reference(*case)
    got = distributed[0][case][0][-1]
    for p, q in zip(got, reference[-1]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_exactly_one_gradient_allreduce_per_step(distributed, case):
    for rank in range(W):
        assert distributed[rank][case][1] == [1] * (FULL_STEPS + 1)


def test_hand_worked_accumulation():
    """y_hat = w x with w = 1, squared error, rows (x, y) = (1,2), (2,2), (3,2), (4,2), taken as
    two microbatches of 2 rows in one step. Per-row gradient 2 (w x - y) x:
      x=1: 2(1-2)1 = -2;  x=2: 2(2-2)2 = 0;  x=3: 2(3-2)3 = 6;  x=4: 2(4-2)4 = 16.
    Their mean is (-2 + 0 + 6 + 16) / 4 = 5, so SGD with lr 0.1 gives w = 1 - 0.1 * 5 = 0.5.
    (Averaging each microbatch's mean instead, ((-2+0)/2 + (6+16)/2) / 2 = 5 too; the short
    step below is where the two differ.)"""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    y = torch.full((4,), 2.0)
    micro = [(x[:2], y[:2]), (x[2:], y[2:])]
    train_step(model, opt, micro, 4, sync=GradSync(1), classify=False)
    assert model.weight.grad.item() == pytest.approx(5.0)
    assert model.weight.item() == pytest.approx(0.5)

    # A short step of 3 rows as microbatches of 2 and 1: x = 1, 2, 3 gives gradients -2, 0, 6,
    # mean 4/3 over the step's 3 rows. Averaging per microbatch would give ((-2+0)/2 + 6)/2 = 2.5.
    with torch.no_grad():
        model.weight.fill_(1.0)
    train_step(model, opt, [(x[:2], y[:2]), (x[2:3], y[2:3])], 3, sync=GradSync(1), classify=False)
    assert model.weight.grad.item() == pytest.approx(4 / 3)
