"""The row-keyed generator (raymb.core.rng) against a scalar reference written from its spec,
its statistics, and the dropout that draws from it; no processes, no Ray."""

from __future__ import annotations

import math

import pytest
import torch

from raymb.core import rng
from raymb.models.dropout import RowDropout

# --- the reference: Python integers, one number at a time, from rng's docstring ---------------

U64 = 2**64 - 1


def ref_mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
    return z ^ (z >> 31)


def ref_absorb(h: int, v: int) -> int:
    return ref_mix(((h ^ v) + 0x9E3779B97F4A7C15) & U64)


def ref_word(seed: int, stream: int, epoch: int, row: int, i: int) -> int:
    h = 0x6A09E667F3BCC909
    for v in (seed, stream, epoch, row):
        h = ref_absorb(h, v)
    return ref_mix((h + (i + 1) * 0x9E3779B97F4A7C15) & U64)


def ref_uniform(*key: int) -> float:
    return (ref_word(*key) >> 40) / 2**24


def ref_normal(*key: int) -> float:
    w = ref_word(*key)
    u1 = ((w >> 40) + 1) / 2**24
    u2 = ((w >> 16) & (2**24 - 1)) / 2**24
    return math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)


KEYS = [(0, 0, 0), (1, 7, 3), (2**53 - 1, 2**32 + 3, 2**31 - 1), (12345, 1, 0)]
ROWS = [0, 1, 2, 1000, 2**40 + 17, 2**63 - 1]
N = 7  # elements per row


@pytest.mark.parametrize("key", KEYS)
def test_words_and_uniforms_are_bitwise_the_reference(key):
    seed, stream, epoch = key
    rows = torch.tensor(ROWS)
    words = rng.words(seed, stream, epoch, rows, N)
    assert words.dtype == torch.int64 and words.shape == (len(ROWS), N)
    for r, row in enumerate(ROWS):
        for i in range(N):
            assert int(words[r, i]) & U64 == ref_word(seed, stream, epoch, row, i), (row, i)
    u = rng.uniform(seed, stream, epoch, rows, (N,))
    assert u.dtype == torch.float32
    want = [[ref_uniform(seed, stream, epoch, row, i) for i in range(N)] for row in ROWS]
    assert u.tolist() == want  # exactly: multiples of 2**-24


@pytest.mark.parametrize("key", KEYS[:2])
def test_normals_are_box_muller_of_the_reference_words(key):
    rows = torch.tensor(ROWS)
    z = rng.normal(*key, rows, (N,))
    want = torch.tensor([[ref_normal(*key, row, i) for i in range(N)] for row in ROWS])
    torch.testing.assert_close(z, want.float(), rtol=1e-6, atol=1e-6)


def test_element_index_is_row_major_over_the_row_shape():
    rows = torch.tensor([5, 9])
    u = rng.uniform(3, 1, 2, rows, (2, 3, 4))
    assert u.shape == (2, 2, 3, 4)
    assert u[1, 1, 2, 3].item() == ref_uniform(3, 1, 2, 9, 1 * 12 + 2 * 4 + 3)


def test_a_row_draws_the_same_in_any_batch_in_any_order():
    alone = rng.uniform(4, 2, 1, torch.tensor([6]), (50,))
    among = rng.uniform(4, 2, 1, torch.tensor([9, 6, 3, 6]), (50,))
    assert torch.equal(among[1], alone[0]) and torch.equal(among[3], alone[0])
    assert not torch.equal(among[0], alone[0])


def test_the_cpu_and_cuda_draw_the_same_bits():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rows = torch.tensor(ROWS)
    for key in KEYS:
        cpu = rng.words(*key, rows, 1000)
        assert torch.equal(rng.words(*key, rows.cuda(), 1000).cpu(), cpu)
        torch.testing.assert_close(
            rng.normal(*key, rows.cuda(), (1000,)).cpu(), rng.normal(*key, rows, (1000,))
        )


# --- statistics --------------------------------------------------------------------------------


def _chi_square(u: torch.Tensor, bins: int = 64) -> float:
    counts = torch.bincount((u.flatten() * bins).long(), minlength=bins).double()
    expected = u.numel() / bins
    return float(((counts - expected) ** 2 / expected).sum())


# 63 degrees of freedom: mean 63, sd sqrt(126) ~ 11.2; 63 + 6 sd ~ 130 fails by chance with
# probability well under 1e-6.
CHI2_MAX = 130.0


@pytest.mark.parametrize(
    "what, draws",
    [
        ("along a row", lambda: rng.uniform(0, 1, 0, torch.tensor([3]), (2**20,))),
        ("down the rows", lambda: rng.uniform(0, 1, 0, torch.arange(2**20), (1,))),
        (
            "over epochs",
            lambda: torch.cat([rng.uniform(5, 1, e, torch.arange(2**12)) for e in range(256)]),
        ),
        (
            "over streams",
            lambda: torch.cat([rng.uniform(5, s, 0, torch.arange(2**12)) for s in range(256)]),
        ),
        (
            "over seeds",
            lambda: torch.cat([rng.uniform(s, 1, 0, torch.arange(2**12)) for s in range(256)]),
        ),
    ],
)
def test_uniforms_are_uniform(what, draws):
    u = draws()
    n = u.numel()
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.double().mean()) - 0.5) < 6 * math.sqrt(1 / 12 / n), what
    assert _chi_square(u) < CHI2_MAX, what


def test_neighbouring_keys_are_uncorrelated():
    rows = torch.arange(2**14)
    base = rng.uniform(9, 1, 0, rows, (64,)).double() - 0.5
    for other in (
        rng.uniform(9, 2, 0, rows, (64,)),  # the next stream
        rng.uniform(9, 1, 1, rows, (64,)),  # the next epoch
        rng.uniform(10, 1, 0, rows, (64,)),  # the next seed
        rng.uniform(9, 1, 0, rows + 1, (64,)),  # the next row
    ):
        corr = float((base * (other.double() - 0.5)).mean() / (1 / 12))
        assert abs(corr) < 6 / math.sqrt(base.numel())
    # The next element of the same row.
    corr = float((base[:, :-1] * base[:, 1:]).mean() / (1 / 12))
    assert abs(corr) < 6 / math.sqrt(base[:, 1:].numel())
    # Pairs (u_i, u_i+1) fill the unit square evenly: 16 x 16 cells.
    pairs = (base[:, ::2] + 0.5) * 16
    cells = pairs[:, ::2].long().flatten() * 16 + pairs[:, 1::2].long().flatten()
    counts = torch.bincount(cells, minlength=256).double()
    expected = cells.numel() / 256
    assert float(((counts - expected) ** 2 / expected).sum()) < 255 + 6 * math.sqrt(510)


def test_normals_are_standard_normal():
    z = rng.normal(2, 3, 1, torch.arange(2**10), (2**10,)).double().flatten()
    n = z.numel()
    assert abs(float(z.mean())) < 6 / math.sqrt(n)
    assert abs(float(z.std()) - 1) < 6 * math.sqrt(2 / n)
    # The fraction beyond 1.96 sd is 5%.
    tail = float((z.abs() > 1.959964).double().mean())
    assert abs(tail - 0.05) < 6 * math.sqrt(0.05 * 0.95 / n)


def test_key_parts_must_be_64_bit():
    with pytest.raises(ValueError, match="2\\*\\*64"):
        rng.key(-1, 0, 0)


# --- dropout -----------------------------------------------------------------------------------


def _keys(rows) -> rng.RowKeys:
    return rng.RowKeys(seed=11, epoch=2, rows=torch.tensor(rows))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 2**-24, 1 - 2**-25])
def test_dropout_keeps_an_element_when_its_uniform_is_at_least_p(p):
    x = torch.rand(3, 4, 5) + 1
    with rng.row_keys(_keys([4, 0, 2**33])):
        out = rng.dropout(x, p, stream=3)
    for b, row in enumerate([4, 0, 2**33]):
        for j in range(20):
            kept = ref_uniform(11, 3, 2, row, j) >= p
            got = out[b].flatten()[j]
            want = float(x[b].flatten()[j]) / (1 - p) if kept else 0.0
            torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))


def test_dropout_rate_scaling_eval_and_fallback():
    x = torch.ones(256, 512)
    layer = RowDropout(0.25, stream=1)
    with rng.row_keys(_keys(range(256))):
        out = layer(x)
        assert abs(float((out == 0).double().mean()) - 0.25) < 0.005
        assert out.unique().tolist() == [0.0, torch.tensor(4 / 3).item()]
        # The same rows, the same mask: a pure function.
        assert torch.equal(layer(x), out)
        assert not torch.equal(RowDropout(0.25, stream=2)(x), out)
        layer.eval()
        assert layer(x) is x
        layer.train()
        with pytest.raises(RuntimeError, match="batch of 3 rows"):
            layer(x[:3])
        # A microbatch sees its own rows' masks: the same as in the whole batch.
        with rng.microbatch(100, 50):
            assert torch.equal(layer(x[100:150]), out[100:150])
    # Outside the loop (no keys): torch's dropout.
    torch.manual_seed(0)
    out = layer(x)
    assert abs(float((out == 0).double().mean()) - 0.25) < 0.01


def test_dropout_gradient_goes_through_the_kept_elements():
    x = torch.randn(8, 16, requires_grad=True)
    with rng.row_keys(_keys(range(8))):
        out = RowDropout(0.5, stream=1)(x)
    out.sum().backward()
    torch.testing.assert_close(x.grad, (out != 0).float() * 2)


def test_a_models_stream_is_below_the_augmentation_streams():
    with pytest.raises(ValueError, match="2\\*\\*32"):
        RowDropout(0.1, stream=2**32)
    with pytest.raises(ValueError, match="\\[0, 1\\)"):
        RowDropout(1.0, stream=1)
