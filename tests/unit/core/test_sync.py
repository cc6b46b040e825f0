"""Parameter averaging and DiLoCo without Ray: 2 gloo processes against values the test
computes itself (means of what each worker held, the equivalences of docs/design.md)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from conftest import spawn_gloo
from torch import nn

from raymb.config import Config
from raymb.core.step import train_step
from raymb.core.sync import DiLoCoSync, GradSync, ParamSync, build_sync

W = 2
D = 6
ROWS = 8  # per worker per step


def _mlp(seed: int, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(D, 16)] + ([nn.BatchNorm1d(16)] if batchnorm else []) + [nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(16, 1))


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(ROWS, D, generator=g), torch.randn(ROWS, generator=g)


def _run(sync, steps: int, lr: float = 0.1, momentum: float = 0.0, batchnorm=False):
    """Train a fresh model `steps` steps on this worker's batches; return its parameters."""
    model = _mlp(0, batchnorm)
    net = sync.wrap(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    rank = dist.get_rank()
    for step in range(steps):
        x, y = _batch(step, rank)
        micro = [(x[:4], y[:4]), (x[4:], y[4:])]
        assert train_step(net, opt, micro, ROWS, sync=sync, classify=False)[1]
    sync.consolidate(net, opt)
    return [t.detach().clone() for t in model.state_dict().values()], opt


def _averaging(rank: int, out: dict) -> None:
    # Different parameters and BatchNorm statistics on each worker.
    model = _mlp(rank, batchnorm=True)
    model(torch.randn(32, D) * (rank + 1) + rank)  # train-mode forward moves running stats
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, D)).sum().backward()
    opt.step()  # momentum buffers that differ between workers
    sync = ParamSync(W, every=1, average_optimizer_state=True)
    sync.wrap(nn.Identity())  # nothing to broadcast: keep the workers' different values
    out["before"] = {k: v.clone() for k, v in model.state_dict().items()}
    out["momentum_before"] = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    sync.average(model, opt)
    out["after"] = {k: v.clone() for k, v in model.state_dict().items()}
    out["momentum_after"] = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    out["calls"] = sync.comm.calls


def _equivalences(rank: int, out: dict) -> None:
    out["grad"] = _run(GradSync(W), 5)[0]
    out["param_h1"] = _run(ParamSync(W, every=1), 5)[0]
    out["param_h3"] = _run(ParamSync(W, every=3), 7, momentum=0.9)[0]
    diloco = DiLoCoSync(W, every=3, outer_lr=1.0, outer_momentum=0.0, nesterov=False)
    out["diloco_h3"] = _run(diloco, 7, momentum=0.9)[0]
    # Post-local SGD: 3 warm-up steps of gradient all-reduce, then local steps.
    warm = ParamSync(W, every=100, warmup=3)
    out["warm3"] = _run(warm, 3)[0]
    out["grad3"] = _run(GradSync(W), 3)[0]
    # Communication over 64 steps.
    grad = GradSync(W)
    _run(grad, 64)
    param = ParamSync(W, every=8)
    _run(param, 64, batchnorm=False)
    out["bytes"] = (grad.comm.bytes, param.comm.bytes)
    # Default DiLoCo (outer Nesterov SGD) keeps workers together.
    out["diloco_default"] = _run(build_sync(Config.from_dict({"train": {"sync": "diloco"}}), W), 8)[
        0
    ]


def _worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=W)
    torch.set_num_threads(1)
    out: dict = {}
    _averaging(rank, out)
    _equivalences(rank, out)
    results[rank] = out
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def workers() -> dict:
    return spawn_gloo(_worker, W)


def test_averaging_gives_every_worker_the_bitwise_same_mean(workers):
    before = [workers[r]["before"] for r in range(W)]
    for name, value in workers[0]["after"].items():
        assert torch.equal(value, workers[1]["after"][name]), name  # bitwise identical
        if value.is_floating_point():
            mean = (before[0][name].double() + before[1][name].double()) / 2
            torch.testing.assert_close(value.double(), mean, rtol=1e-6, atol=1e-7)
        else:  # BatchNorm's num_batches_tracked is an integer: left alone
            assert torch.equal(value, before[0][name])


def test_batchnorm_running_statistics_are_averaged(workers):
    b0, b1 = workers[0]["before"]["1.running_mean"], workers[1]["before"]["1.running_mean"]
    assert not torch.allclose(b0, b1)  # the workers saw different data
    torch.testing.assert_close(workers[0]["after"]["1.running_mean"], (b0 + b1) / 2)
    v0, v1 = workers[0]["before"]["1.running_var"], workers[1]["before"]["1.running_var"]
    torch.testing.assert_close(workers[1]["after"]["1.running_var"], (v0 + v1) / 2)


def test_optimizer_state_averaged_on_request_in_one_allreduce_per_dtype(workers):
    for m0, m1, a0, a1 in zip(
        workers[0]["momentum_before"],
        workers[1]["momentum_before"],
        workers[0]["momentum_after"],
        workers[1]["momentum_after"],
    ):
        assert torch.equal(a0, a1)
        torch.testing.assert_close(a0, (m0 + m1) / 2)
    # Parameters, buffers and momentum are float32 (one all-reduce); num_batches_tracked is
    # an integer and is not averaged.
    assert workers[0]["calls"] == 1


def test_param_every_step_with_plain_sgd_equals_grad(workers):
    for rank in range(W):
        for p, q in zip(workers[rank]["param_h1"], workers[rank]["grad"]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_diloco_with_outer_sgd_lr1_equals_param(workers):
    for rank in range(W):
        for p, q in zip(workers[rank]["diloco_h3"], workers[rank]["param_h3"]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not all(
        torch.allclose(p, q) for p, q in zip(workers[0]["param_h3"], workers[0]["param_h1"])
    ), "7 steps with momentum and 7 without should differ: the comparison above means something"


def test_post_local_sgd_warmup_is_gradient_allreduce(workers):
    for p, q in zip(workers[0]["warm3"], workers[0]["grad3"]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_consolidated_models_agree_across_workers(workers):
    for key in ("param_h3", "diloco_h3", "diloco_default"):
        for p, q in zip(workers[0][key], workers[1][key]):
            assert torch.equal(p, q), key


def test_param_every_8_sends_an_eighth_of_grads_bytes(workers):
    grad_bytes, param_bytes = workers[0]["bytes"]
    params = sum(p.numel() for p in _mlp(0).parameters()) * 4
    assert grad_bytes == 64 * params  # one all-reduce of every gradient per step
    # 64 / 8 = 8 averagings of the parameters (no buffers in this model); consolidate adds
    # none at step 64, which ends a period. Allow one averaging either way.
    assert abs(param_bytes - grad_bytes / 8) <= params
