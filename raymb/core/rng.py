"""Random numbers keyed by the row: a pure function of (seed, stream, epoch, row, element).

Dropout masks and data augmentation draw from here, so a row gets the same draws whichever
worker trains on it, in whichever microbatch, before or after a resume: W workers x k
microbatches still give the parameters of one process. Rows are named by their position in
the epoch's order (raymb.core.order), which the epoch loop passes with each step.

The generator is counter-based, in vectorised int64 torch ops that give the same bits on CPU
and CUDA (integer adds, multiplies that wrap modulo 2**64, shifts, xors). With SplitMix64's
finaliser `mix` (Stafford's variant 13) and GAMMA, the golden-ratio increment:

    absorb(h, v) = mix((h ^ v) + GAMMA)                         all mod 2**64
    key          = absorb(absorb(absorb(ROOT, seed), stream), epoch)
    word(i)      = mix(absorb(key, row) + (i + 1) * GAMMA)     element i of the row
    uniform(i)   = (word(i) >> 40) / 2**24                       in [0, 1), 24 bits

so each row has its own SplitMix64 sequence. A forward reads the rows it sees from a
`RowKeys` context (`row_keys`); `dropout` (and raymb.models.dropout.RowDropout) mask with it.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch.nn import functional as F

MASK64 = 2**64 - 1
GAMMA = 0x9E3779B97F4A7C15
M1 = 0xBF58476D1CE4E5B9
M2 = 0x94D049BB133111EB
ROOT = 0x6A09E667F3BCC909
"""The first absorb's starting state (the fraction of sqrt(2)): any odd constant would do."""
AUGMENT_STREAMS = 2**32
"""Streams from here on are the collate's (raymb.data.augment); a model's are below."""


def _signed(v: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits (what torch takes)."""
    return v - 2**64 if v >= 2**63 else v


def _low(bits: int) -> int:
    return (1 << bits) - 1


_GAMMA_S, _M1_S, _M2_S = _signed(GAMMA), _signed(M1), _signed(M2)


# --- scalars: the key of (seed, stream, epoch), in Python's exact integers --------------------


def mix(z: int) -> int:
    """SplitMix64's finaliser of a 64-bit value."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * M1) & MASK64
    z = ((z ^ (z >> 27)) * M2) & MASK64
    return z ^ (z >> 31)


def absorb(h: int, v: int) -> int:
    """The state h after taking in the value v (0 <= v < 2**64)."""
    return mix(((h ^ v) + GAMMA) & MASK64)


def key(seed: int, stream: int, epoch: int) -> int:
    """The 64-bit key of one stream of one epoch: what every row's sequence starts from."""
    for v in (seed, stream, epoch):
        if not 0 <= v < 2**64:
            raise ValueError(f"a key part must be in [0, 2**64), not {v}")
    return absorb(absorb(absorb(ROOT, seed), stream), epoch)


# --- tensors: every row's words at once ----------------------------------------------------


def _mix_(z: torch.Tensor) -> torch.Tensor:
    """mix, in place on an int64 tensor: torch's >> is arithmetic, so the sign bits a logical
    shift would not bring in are masked off."""
    z.bitwise_xor_(z.bitwise_right_shift(30).bitwise_and_(_low(34)))
    z.mul_(_M1_S)
    z.bitwise_xor_(z.bitwise_right_shift(27).bitwise_and_(_low(37)))
    z.mul_(_M2_S)
    z.bitwise_xor_(z.bitwise_right_shift(31).bitwise_and_(_low(33)))
    return z


@functools.lru_cache(maxsize=32)
def _steps(n: int, device: torch.device) -> torch.Tensor:
    """(i + 1) * GAMMA mod 2**64 for the n elements of a row, as int64."""
    return torch.arange(n, dtype=torch.int64, device=device).add_(1).mul_(_GAMMA_S)


def words(seed: int, stream: int, epoch: int, rows: torch.Tensor, n: int) -> torch.Tensor:
    """The 64-bit words (int64, shape (len(rows), n)) of elements 0..n-1 of each row: `rows`
    holds the rows' ids (non-negative int64), on the device the words are made on."""
    h = _signed(key(seed, stream, epoch))
    row_state = _mix_((rows.to(torch.int64) ^ h).add_(_GAMMA_S))  # absorb(key, row)
    return _mix_(row_state[:, None] + _steps(n, rows.device))


def uniform(
    seed: int, stream: int, epoch: int, rows: torch.Tensor, shape: Sequence[int] = ()
) -> torch.Tensor:
    """float32 uniforms in [0, 1), shape (len(rows), *shape): multiples of 2**-24, the same
    bits on every device."""
    w = words(seed, stream, epoch, rows, math.prod(shape))
    u = w.bitwise_right_shift_(40).bitwise_and_(_low(24)).to(torch.float32).mul_(2.0**-24)
    return u.view(len(rows), *shape)


def normal(
    seed: int, stream: int, epoch: int, rows: torch.Tensor, shape: Sequence[int] = ()
) -> torch.Tensor:
    """float32 standard normals, shape (len(rows), *shape), by Box-Muller from the two 24-bit
    halves of each word (in float64, then rounded: the devices' log and cos agree to far
    below float32's precision; the uniforms under them are bitwise the same)."""
    w = words(seed, stream, epoch, rows, math.prod(shape))
    u1 = (w.bitwise_right_shift(40).bitwise_and_(_low(24)) + 1).to(torch.float64) * 2.0**-24
    u2 = w.bitwise_right_shift_(16).bitwise_and_(_low(24)).to(torch.float64) * 2.0**-24
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2 * math.pi) * u2)  # u1 in (0, 1]
    return z.to(torch.float32).view(len(rows), *shape)


# --- the rows a forward sees ---------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # holds a tensor: no field-wise ==
class RowKeys:
    """Who the rows of a batch are: train.seed, the epoch, and each row's id (its position in
    the epoch's order), in batch order."""

    seed: int
    epoch: int
    rows: torch.Tensor
    """int64 row ids, one per row of the batch (dimension 0 of every tensor the model sees)."""

    def narrow(self, start: int, length: int) -> RowKeys:
        """The keys of rows [start, start + length) of the batch: one microbatch's."""
        return RowKeys(self.seed, self.epoch, self.rows[start : start + length])

    def uniform(self, stream: int, shape: Sequence[int] = ()) -> torch.Tensor:
        return uniform(self.seed, stream, self.epoch, self.rows, shape)

    def normal(self, stream: int, shape: Sequence[int] = ()) -> torch.Tensor:
        return normal(self.seed, stream, self.epoch, self.rows, shape)


_CURRENT: ContextVar[RowKeys | None] = ContextVar("raymb_row_keys", default=None)


@contextlib.contextmanager
def row_keys(keys: RowKeys | None) -> Iterator[RowKeys | None]:
    """Within it, forwards draw the row-keyed numbers of these rows (None: no keys)."""
    token = _CURRENT.set(keys)
    try:
        yield keys
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def microbatch(start: int, length: int) -> Iterator[RowKeys | None]:
    """Narrow the current keys to one microbatch's rows (nothing to do without keys)."""
    keys = _CURRENT.get()
    with row_keys(None if keys is None else keys.narrow(start, length)) as narrowed:
        yield narrowed


def current() -> RowKeys | None:
    """The keys of the rows the forward in progress sees; None outside the training loop."""
    return _CURRENT.get()


def dropout(x: torch.Tensor, p: float, stream: int, training: bool = True) -> torch.Tensor:
    """Inverted dropout of rate p whose mask is keyed by (seed, stream, epoch, row, element):
    element j of row b is kept, scaled by 1 / (1 - p), when uniform(...)[b, j] >= p. Without
    current keys (a loop of your own) it is torch's dropout, drawn from torch's generator."""
    if not training or p == 0:
        return x
    keys = _CURRENT.get()
    if keys is None:
        return F.dropout(x, p, training=True)
    if len(keys.rows) != len(x):
        raise RuntimeError(
            f"row-keyed dropout got a batch of {len(x)} rows under keys of {len(keys.rows)} rows: "
            "dimension 0 must be the batch's rows"
        )
    return x * keep_mask(keys, stream, x.shape[1:], p, x.device).to(x.dtype).mul_(1 / (1 - p))


def keep_mask(
    keys: RowKeys, stream: int, shape: Sequence[int], p: float, device: torch.device
) -> torch.Tensor:
    """uniform(...) >= p as a bool tensor (len(rows), *shape), compared on the words: top24 >=
    ceil(p * 2**24) is, with the top bit flipped so that int64 order is unsigned order,
    word ^ 2**63 >= ceil(p * 2**24) << 40 (two ops instead of five)."""
    top = math.ceil(p * 2**24)
    if top >= 2**24:  # p within 2**-24 of 1: no word reaches it
        return torch.zeros(len(keys.rows), *shape, dtype=torch.bool, device=device)
    w = words(keys.seed, stream, keys.epoch, keys.rows.to(device), math.prod(shape))
    threshold = top << 40
    keep = w.bitwise_xor_(-(2**63)).ge_(threshold - 2**63)  # ge_ keeps int64: 0 or 1
    return keep.to(torch.bool).view(len(keys.rows), *shape)
