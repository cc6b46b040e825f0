"""RMSprop, optim.l1's proximal step, model.init and the new keys' refusals, against values
worked out by hand (issue 26, items 4 and 5). The real loop's runs: test_optim_loop.py."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
from conftest import assert_refused, spawn_gloo
from torch import nn

from raymb import ConfigError, load_config
from raymb.config import ModelSection, OptimSection
from raymb.core.optim import build_optimizer, build_scheduler, l1_step
from raymb.core.step import train_step
from raymb.core.sync import GradSync
from raymb.models import build_model

# ---------------------------------------------------------------- RMSprop


@pytest.mark.parametrize(
    ("momentum", "centered", "weight_decay"),
    [(0.0, False, 0.0), (0.9, False, 0.0), (0.0, True, 0.0), (0.5, True, 0.1)],
    ids=["plain", "momentum", "centered", "all"],
)
def test_rmsprop_steps_as_its_formula(momentum: float, centered: bool, weight_decay: float):
    """Two steps of the update, written out (Hinton's RMSprop as torch defines it):
    g += wd p; v = alpha v + (1 - alpha) g^2; centered: m = alpha m + (1 - alpha) g and the
    denominator sqrt(v - m^2) + eps, else sqrt(v) + eps; with momentum, b = mu b + g / den
    and p -= lr b, else p -= lr g / den. The state starts at 0."""
    lr, alpha, eps = 0.01, 0.9, 1e-3  # eps large enough to matter in the numbers
    section = OptimSection(
        name="rmsprop",
        lr=lr,
        alpha=alpha,
        eps=eps,
        momentum=momentum,
        centered=centered,
        weight_decay=weight_decay,
    )
    start = [0.5, -1.0, 2.0]
    grads = [[0.2, -0.4, 1.0], [-0.1, 0.3, 0.5]]
    param = nn.Parameter(torch.tensor(start, dtype=torch.float64))
    optimizer = build_optimizer(section, [param])
    assert type(optimizer) is torch.optim.RMSprop

    p, v, m, b = list(start), [0.0] * 3, [0.0] * 3, [0.0] * 3
    for g in grads:
        param.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
        for i in range(3):
            gi = g[i] + weight_decay * p[i]
            v[i] = alpha * v[i] + (1 - alpha) * gi * gi
            if centered:
                m[i] = alpha * m[i] + (1 - alpha) * gi
                den = math.sqrt(v[i] - m[i] * m[i]) + eps
            else:
                den = math.sqrt(v[i]) + eps
            if momentum:
                b[i] = momentum * b[i] + gi / den
                p[i] -= lr * b[i]
            else:
                p[i] -= lr * gi / den
        torch.testing.assert_close(param.detach(), torch.tensor(p, dtype=torch.float64))
    # Not a tautology: the parameters moved by more than the tolerance.
    assert max(abs(a - s) for a, s in zip(p, start)) > 1e-3


def test_rmsprop_through_train_step():
    """y = w x with w = 1, squared error, rows (1, 2), (2, 2) as two microbatches: the mean
    gradient is ((-2) + 0) / 2 = -1, so one plain RMSprop step (alpha 0.99) moves w by
    lr * 1 / (sqrt(0.01 * 1) + eps) = 0.01 / 0.1 = 0.1 (eps 1e-8 aside): w = 1.1."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    optimizer = build_optimizer(
        OptimSection(name="rmsprop", lr=0.01, momentum=0.0), [*model.parameters()]
    )
    x, y = torch.tensor([[1.0], [2.0]]), torch.full((2,), 2.0)
    train_step(
        model, optimizer, [(x[:1], y[:1]), (x[1:], y[1:])], 2, sync=GradSync(1), classify=False
    )
    assert model.weight.item() == pytest.approx(1.1, rel=1e-6)


# ---------------------------------------------------------------- L1 as a proximal step


def test_l1_soft_thresholds_the_weights_by_the_current_lr():
    """optim.lr 0.2 times the schedule's factor 0.5, lambda 1: the threshold is 0.1. Weights
    move 0.1 towards 0 and stop there; biases and a norm's parameters are not touched."""
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.35, -0.05], [0.1, -0.3]]))
        model[0].bias.copy_(torch.tensor([0.05, -0.02]))
        model[1].weight.fill_(0.04)
        model[1].bias.fill_(-0.04)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert scheduler.get_last_lr() == [0.1]
    l1_step(optimizer, 1.0)
    expected = torch.tensor([[0.25, 0.0], [0.0, -0.2]])
    torch.testing.assert_close(model[0].weight.detach(), expected)
    assert (model[0].weight == 0).sum() == 2  # exactly zero, not a small number
    torch.testing.assert_close(model[0].bias.detach(), torch.tensor([0.05, -0.02]))
    assert model[1].weight.tolist() == pytest.approx([0.04, 0.04])
    assert model[1].bias.tolist() == pytest.approx([-0.04, -0.04])


def test_l1_in_train_step_is_one_ista_step():
    """w = 3, b = 0 on rows (x, y) = (1, 1), (1, 1): the mean gradient of (w x + b - y)^2 is
    2 (3 - 1) = 4 for w and for b. SGD lr 0.1: w = 3 - 0.4 = 2.6, b = -0.4; then the
    proximal step of lambda = 2 takes w to 2.6 - 0.1 x 2 = 2.4, b stays -0.4."""
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.bias.fill_(0.0)
    section = OptimSection(name="sgd", lr=0.1, momentum=0.0, l1=2.0)
    optimizer = build_optimizer(section, model.parameters())
    build_scheduler(section, optimizer, total_steps=1)
    x, y = torch.ones(2, 1), torch.ones(2)
    train_step(model, optimizer, [(x, y)], 2, sync=GradSync(1), classify=False, l1=section.l1)
    assert model.weight.item() == pytest.approx(2.4)
    assert model.bias.item() == pytest.approx(-0.4)


# ---------------------------------------------------------------- model.init


def _layers(model: nn.Module, kind=nn.Linear) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def test_xavier_and_kaiming_have_their_standard_deviations():
    torch.manual_seed(0)
    xavier = build_model(ModelSection(name="mlp", hidden=[400], init="xavier"), 600, 10)
    first = _layers(xavier)[0]  # 600 in, 400 out
    assert first.weight.shape == (400, 600)
    # Glorot uniform: U(-a, a) with a = sqrt(6 / (fan_in + fan_out)), std a / sqrt(3).
    assert first.weight.std().item() == pytest.approx(math.sqrt(2 / (600 + 400)), rel=0.02)
    assert first.weight.abs().max().item() <= math.sqrt(6 / 1000)
    kaiming = build_model(ModelSection(name="mlp", hidden=[400], init="kaiming"), 600, 10)
    first = _layers(kaiming)[0]
    assert first.weight.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert first.weight.std().item() == pytest.approx(math.sqrt(2 / 600), rel=0.02)
    # A convolution's fan-in counts its kernel: 32 channels x 3 x 3.
    cnn = build_model(ModelSection(name="cnn", widths=[32, 64], init="kaiming"), (3, 8, 8), 10)
    conv = [c for c in _layers(cnn, nn.Conv2d) if c.weight.shape == (64, 32, 3, 3)][0]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (32 * 9)), rel=0.05)
    for model in (xavier, kaiming, cnn):
        for layer in _layers(model) + _layers(model, nn.Conv2d):
            assert layer.bias is None or not layer.bias.any()  # biases 0


def test_orthogonal_rows_are_orthonormal():
    torch.manual_seed(0)
    model = build_model(ModelSection(name="mlp", hidden=[64, 32], init="orthogonal"), 100, 3)
    for layer in _layers(model):
        w = layer.weight.detach().double()
        rows, cols = w.shape
        gram = w @ w.T if rows <= cols else w.T @ w
        eye = torch.eye(min(rows, cols), dtype=torch.float64)
        torch.testing.assert_close(gram, eye, rtol=0, atol=1e-5)  # float32 weights
        assert not layer.bias.any()
    cnn = build_model(ModelSection(name="cnn", widths=[8], init="orthogonal"), (3, 8, 8), 4)
    conv = _layers(cnn, nn.Conv2d)[0].weight.detach().double().flatten(1)  # 8 x 27
    torch.testing.assert_close(conv @ conv.T, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-5)


def test_default_keeps_each_familys_own_and_the_gpt_keeps_its_embeddings():
    torch.manual_seed(0)
    default = build_model(ModelSection(name="mlp", hidden=[16]), 8, 2)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    for p, q in zip(default.parameters(), plain.parameters()):
        assert torch.equal(p, q)  # torch's own init, its biases not 0
    torch.manual_seed(0)
    gpt = build_model(
        ModelSection(name="gpt", depth=1, width=64, heads=2, init="xavier"), (16,), 50
    )
    # The head is the token embedding (tied): GPT-2's N(0, 0.02), not Glorot's.
    assert gpt.head.weight is gpt.tokens.weight
    assert gpt.tokens.weight.std().item() == pytest.approx(0.02, rel=0.1)
    fc = gpt.blocks[0].fc.weight  # 64 -> 256
    assert fc.std().item() == pytest.approx(math.sqrt(2 / (64 + 256)), rel=0.05)
    assert not gpt.blocks[0].fc.bias.any()
    assert gpt.blocks[0].ln1.weight.eq(1).all()  # norms keep theirs


def test_init_draws_from_the_seed_the_same_on_every_worker():
    """Two gloo processes seeded alike build the model: every parameter is the same (the
    init draws from torch's seeded generator, nothing of the rank), and differs from
    another seed's."""
    results = spawn_gloo(_init_worker, 2)  # waits until both ranks are past their teardown
    for init in ("xavier", "kaiming", "orthogonal"):
        mine, theirs, other_seed = results[init]
        assert mine == theirs, init
        assert mine != other_seed, init


def _init_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    for init in ("xavier", "kaiming", "orthogonal"):
        section = ModelSection(name="cnn", widths=[8, 16], norm="group", init=init)
        flat = []
        for seed in (7, 8):
            torch.manual_seed(seed)
            model = build_model(section, (3, 8, 8), 5)
            flat.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        gathered = [torch.empty_like(flat[0]) for _ in range(2)]
        dist.all_gather(gathered, flat[0])
        if rank == 0:
            results[init] = (gathered[0].tolist(), gathered[1].tolist(), flat[1].tolist())
    dist.destroy_process_group()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["optim.l1=-0.1"], "optim.l1 must be >= 0 (got -0.1)"),
        (["optim.alpha=1.0"], "optim.alpha must be in [0, 1) (got 1.0)"),
        (["optim.eps=0"], "optim.eps must be > 0 (got 0)"),
        (["optim.centered=1"], "optim.centered must be true or false (got 1)"),
        (["optim.max_iter=0"], "optim.max_iter must be > 0 (got 0)"),
        (["optim.history_size=0"], "optim.history_size must be > 0 (got 0)"),
        (
            ["optim.name=lbfgs"],
            'train.global_batch_size must be "all" with optim.name = "lbfgs" (full batch '
            "only) (got 64)",
        ),
        (
            [
                "optim.name=lbfgs",
                "train.global_batch_size=all",
                "train.microbatch_size=32",
                "train.sync=diloco",
            ],
            'train.sync must be "grad" with optim.name = "lbfgs" (one line search for all) '
            "(got 'diloco')",
        ),
        (
            [
                "optim.name=lbfgs",
                "train.global_batch_size=all",
                "train.microbatch_size=32",
                "train.on_nan=skip",
            ],
            'train.on_nan must be "abort" with optim.name = "lbfgs" (got \'skip\')',
        ),
        (
            ["optim.name=lbfgs", "optim.l1=0.1"],
            'optim.l1 must be 0 with optim.name = "lbfgs" (its line search follows the loss '
            "alone) (got 0.1)",
        ),
        (
            ["optim.name=lbfgs", "optim.weight_decay=0.01"],
            'optim.weight_decay must be 0 with optim.name = "lbfgs"',
        ),
        (["optim.name=lbfgs", "optim.grad_clip=1"], "optim.grad_clip must be unset with"),
        (
            ["model.name=mlp", "model.init=he"],
            "model.init must be one of 'default', 'xavier', 'kaiming', 'orthogonal' (got 'he')",
        ),
        (
            ["model.name=my.models:make", "model.init=xavier"],
            "model.init is not a key of model.name = 'my.models:make' (its keys: num_classes, "
            "init_from, init_allow_missing, init_allow_unexpected, freeze)",
        ),
    ],
)
def test_bad_values_are_one_line(sets: list[str], message: str):
    with pytest.raises(ConfigError) as info:
        load_config(None, sets)
    text = str(info.value)
    assert "\n" not in text and text.startswith(message), text


def test_full_batch_lbfgs_and_rmsprop_are_taken():
    full = ["train.global_batch_size=all", "train.microbatch_size=32"]
    config = load_config(None, ["optim.name=lbfgs", *full])
    assert (config.optim.name, config.optim.max_iter, config.optim.history_size) == (
        "lbfgs",
        20,
        100,
    )
    optimizer = build_optimizer(config.optim, [nn.Parameter(torch.zeros(2))])
    assert type(optimizer) is torch.optim.LBFGS
    assert optimizer.defaults["line_search_fn"] == "strong_wolfe"
    config = load_config(None, ["optim.name=rmsprop", "optim.centered=true", "model.init=xavier"])
    assert config.optim.centered and config.model.init == "xavier"


@pytest.mark.parametrize(
    ("sets", "words"),
    [
        (
            ["optim.name=lbfgs", "train.global_batch_size=64"],
            ('train.global_batch_size must be "all"',),
        ),
        (["optim.l1=-1"], ("optim.l1 must be >= 0 (got -1)",)),
        (["model.name=cnn", "model.init=uniform"], ("model.init must be one of",)),
        (["optim.name=rmsprop", "optim.alpha=1.5"], ("optim.alpha must be in [0, 1)",)),
    ],
    ids=["lbfgs-mini-batch", "l1-negative", "init-unknown", "alpha-one-and-a-half"],
)
def test_refused_by_raymb_train(tmp_path, sets: list[str], words: tuple[str, ...]):
    args = ["train", *(a for item in sets for a in ("--set", item))]
    assert_refused(args, tmp_path, *words)
