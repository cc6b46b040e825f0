"""The model families (cnn, gpt; linear and mlp on images) and the registry, without Ray.

The equivalence contract for the new families: W=2 gloo processes x k=2 microbatches and one
process x k=4 give, after every step, the parameters of one process taking each step as
one batch in a plain torch loop (docs/design.md, batch vocabulary). For the gpt the loss is the
mean over the step's tokens, so train_step is given rows x T. With norm = "batch" the
contract cannot hold (statistics per microbatch); there, param averaging must average the
BatchNorm running statistics too.
"""

from __future__ import annotations

import math
import os
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from conftest import spawn_gloo
from torch import nn

from raymb.config import ModelSection
from raymb.core.loss import correct, summed_loss
from raymb.core.step import train_step
from raymb.core.sync import GradSync, ParamSync
from raymb.errors import ConfigError
from raymb.models import build_model

W = 2  # workers of the distributed run
G = 8  # rows per step
STEPS = 3
T, VOCAB = 8, 50  # gpt: tokens per row, vocabulary

MODELS = {
    "gpt": (ModelSection(name="gpt", depth=2, width=32, heads=4), (T,), VOCAB),
    "cnn": (ModelSection(name="cnn", widths=[8, 16], norm="group"), (3, 8, 8), 4),
}
BATCHNORM = (ModelSection(name="cnn", widths=[8, 16], norm="batch"), (3, 8, 8), 4)


def _data(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if name == "gpt":
        tokens = torch.randint(0, VOCAB, (G * STEPS, T + 1), generator=g)
        return tokens[:, :-1], tokens[:, 1:]  # next-token targets
    images = torch.randn(G * STEPS, 3, 8, 8, generator=g)
    return images, torch.randint(0, 4, (G * STEPS,), generator=g)


def _fresh(name: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model(*MODELS[name])
    if name == "gpt":
        # Not Adam: the key bias's gradient is exactly 0 in exact arithmetic (it adds the
        # same q.b to every score of a query), so in float32 it is rounding noise, which
        # Adam divides by its own size; no rtol holds for such a parameter.
        # SGD also sees a wrong loss scale (rows instead of tokens), which Adam would not.
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _reference(name: str) -> list[list[torch.Tensor]]:
    """One process, the textbook loop: mean cross-entropy over the step's rows (tokens)."""
    x, y = _data(name)
    model, opt = _fresh(name)
    history = []
    for step in range(STEPS):
        rows = slice(step * G, (step + 1) * G)
        opt.zero_grad()
        out = model(x[rows])
        loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y[rows].reshape(-1))
        loss.backward()
        opt.step()
        history.append(_params(model))
    return history


def _raymb(name: str, world: int, rank: int, k: int) -> list[list[torch.Tensor]]:
    """train_step on this worker's G/world rows of each step, as k microbatches."""
    x, y = _data(name)
    model, opt = _fresh(name)
    sync = GradSync(world)
    net = sync.wrap(model)
    n, m = G // world, G // world // k
    per_row = T if name == "gpt" else 1  # the loss is the mean over tokens
    history = []
    for step in range(STEPS):
        first = step * G + rank * n
        micro = [(x[i : i + m], y[i : i + m]) for i in range(first, first + n, m)]
        train_step(net, opt, micro, n * per_row, sync=sync, classify=True)
        history.append(_params(model))
    return history


def _batchnorm_average(rank: int) -> dict:
    """Two local SGD steps of the batch-norm cnn on each worker's own rows, then the average;
    the buffers are recorded just before the all-reduce that averages them."""
    x, y = _data("cnn")
    torch.manual_seed(0)
    model = build_model(*BATCHNORM)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sync = ParamSync(W, every=2)
    net = sync.wrap(model)
    before: list[dict[str, torch.Tensor]] = []
    all_reduce_mean = sync.comm.all_reduce_mean

    def spy(tensors, world):
        before.append({k: v.clone() for k, v in model.named_buffers()})
        all_reduce_mean(tensors, world)

    sync.comm.all_reduce_mean = spy
    for step in range(2):
        first = step * G + rank * (G // W)
        micro = [(x[first : first + G // W], y[first : first + G // W])]
        train_step(net, opt, micro, G // W, sync=sync, classify=True)
    after = {k: v.clone() for k, v in model.named_buffers()}
    return {"before": before, "after": after, "params": _params(model)}


def _worker(rank: int, port: int, results: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=W)
    out = {name: _raymb(name, W, rank, k=2) for name in MODELS}
    out["batchnorm"] = _batchnorm_average(rank)
    results[rank] = out
    dist.destroy_process_group()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread only spins, and on a busy 2-core
    machine that made the single-process runs 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def distributed() -> dict:
    return spawn_gloo(_worker, W)


def _assert_same(history, reference, what: str) -> None:
    assert len(history) == len(reference) == STEPS
    for step, (got, want) in enumerate(zip(history, reference)):
        for i, (p, q) in enumerate(zip(got, want)):
            where = f"{what}, step {step}, parameter {i}"
            torch.testing.assert_close(
                p, q, rtol=1e-5, atol=1e-6, msg=lambda m, where=where: f"{where}: {m}"
            )


@pytest.mark.parametrize("name", list(MODELS))
def test_workers_times_microbatches_equal_one_process(distributed, name):
    reference = _reference(name)
    for rank in range(W):
        _assert_same(distributed[rank][name], reference, f"{name} W=2 k=2 rank {rank}")
    _assert_same(_raymb(name, 1, 0, k=4), reference, f"{name} W=1 k=4")


def test_param_averaging_averages_batchnorm_statistics(distributed):
    runs = [distributed[rank]["batchnorm"] for rank in range(W)]
    assert [len(r["before"]) for r in runs] == [1, 1]  # one averaging, after step 2
    before = [r["before"][0] for r in runs]
    stats = [k for k in before[0] if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 * 6  # the stem, 2 + 2 in the stages, the projection: 6 BatchNorm2d
    for key in stats:
        # The workers saw different rows: a real average, not a copy.
        assert not torch.allclose(before[0][key], before[1][key])
        mean = (before[0][key] + before[1][key]) / 2
        for run in runs:
            torch.testing.assert_close(run["after"][key], mean, rtol=1e-6, atol=1e-7)
    for p, q in zip(runs[0]["params"], runs[1]["params"]):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# --- the registry -----------------------------------------------------------------------------


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent(
            """
            import torch
            calls = []

            def make(shape, out):
                calls.append((shape, out))
                return torch.nn.Linear(3, out)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("my_models", None)


def test_custom_factory_gets_d_for_flat_rows_and_the_shape_for_tensors(factory_module):
    section = ModelSection(name="my_models:make")
    build_model(section, 5, 2)
    build_model(section, (6,), 3)
    build_model(section, [3, 32, 32], 10)
    assert sys.modules["my_models"].calls == [(5, 2), (6, 3), ((3, 32, 32), 10)]


def test_gpt_refuses_a_block_size_shorter_than_the_data():
    with pytest.raises(ConfigError, match="model.block_size=4") as e:
        build_model(ModelSection(name="gpt", block_size=4), (8,), VOCAB)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="\\[3, 8, 8\\]"):
        build_model(ModelSection(name="gpt"), (3, 8, 8), VOCAB)
    with pytest.raises(ConfigError, match="\\[C, H, W\\]"):
        build_model(ModelSection(name="cnn"), 16, 4)


def test_gpt_positions_shorter_inputs_tied_head_and_causality():
    section = ModelSection(name="gpt", depth=2, width=32, heads=4, block_size=16)
    model = build_model(section, (8,), VOCAB)
    assert model.positions.weight.shape == (16, 32)
    assert model.head.weight is model.tokens.weight
    assert (
        build_model(ModelSection(name="gpt", width=32), (8,), VOCAB).positions.num_embeddings == 8
    )
    idx = torch.randint(0, VOCAB, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, VOCAB) and model(idx[:, :5]).shape == (2, 5, VOCAB)
    # Changing token 10 leaves the logits of positions 0..9 as they were, and only them.
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % VOCAB
    again = model(changed)
    torch.testing.assert_close(again[:, :10], logits[:, :10])
    assert not torch.allclose(again[:, 10:], logits[:, 10:])
    # The same prefix gives the same logits whatever follows it.
    torch.testing.assert_close(model(idx[:, :5]), logits[:, :5], rtol=1e-5, atol=1e-6)


def test_gpt_initialisation_scales_the_residual_projections():
    torch.manual_seed(0)
    model = build_model(ModelSection(name="gpt", depth=8, width=128, heads=4), (16,), 256)
    assert model.tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    scaled = 0.02 / math.sqrt(2 * 8)
    for block in model.blocks:
        assert block.attn.proj.weight.std().item() == pytest.approx(scaled, rel=0.1)
        assert block.proj.weight.std().item() == pytest.approx(scaled, rel=0.1)
        assert block.fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert not block.fc.bias.any()


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_dense_models_flatten_images(name):
    section = ModelSection(name=name, **({"hidden": [8]} if name == "mlp" else {}))
    model = build_model(section, (3, 4, 4), 5)
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 5)
    flat = build_model(section, 48, 5)
    assert flat(torch.randn(2, 48)).shape == (2, 5)
    # Flat rows keep today's modules, so existing checkpoints still load.
    keys = {"linear": {"weight", "bias"}, "mlp": {"0.weight", "0.bias", "2.weight", "2.bias"}}
    assert set(flat.state_dict()) == keys[name]


def test_cnn_group_norm_for_widths_not_divisible_by_8():
    model = build_model(ModelSection(name="cnn", widths=[12, 6], norm="group"), (1, 9, 9), 3)
    groups = [m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert groups == [4, 4, 4, 2, 2, 2]  # gcd(8, 12), gcd(8, 6)
    assert model(torch.randn(2, 1, 9, 9)).shape == (2, 3)


def test_per_token_loss_and_hits():
    torch.manual_seed(0)
    out, y = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    # Independent reference: -log softmax of each token's target, one token at a time.
    want = sum(-torch.log_softmax(out[b, t], dim=0)[y[b, t]] for b in range(2) for t in range(3))
    torch.testing.assert_close(summed_loss(out, y, classify=True), want)
    hits = sum(int(out[b, t].argmax() == y[b, t]) for b in range(2) for t in range(3))
    assert correct(out, y).item() == hits
