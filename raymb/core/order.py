"""Which rows each worker trains on in each step: a pure function of (seed, epoch, step, rank, W).

An epoch's order is a permutation of the training set's row indices drawn from (seed,
epoch) alone, by its own generator (the training RNG is left untouched). Step s takes the
next G rows of the order (the short last step the rest), and worker r of W trains on the
r-th of W near-equal contiguous slices of the step's rows. Nothing depends on timing, on how
Ray Data split blocks, on whether the run was resumed, or on W.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where an order is drawn: the plan's checks need none
    import torch

SHUFFLES = ("rows", "files", "none")


def epoch_order(shuffle: str, seed: int, epoch: int, file_rows: Sequence[int]) -> torch.Tensor:
    """Row indices (int64) of one epoch, in the order it trains on them.

    `file_rows` is the row count of each file, in the files' sorted order: the rows of file i
    are the indices after those of files 0..i-1.
    """
    import torch

    total = sum(file_rows)
    if shuffle == "none":
        return torch.arange(total)
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    if shuffle == "rows":
        return torch.randperm(total, generator=generator)
    starts = torch.tensor([0, *file_rows]).cumsum(0)
    files = torch.randperm(len(file_rows), generator=generator).tolist()
    return torch.cat([torch.arange(int(starts[f]), int(starts[f + 1])) for f in files])


def worker_rows(
    order: torch.Tensor, step_in_epoch: int, step_total: int, rows: int, rank: int, world: int
) -> torch.Tensor:
    """Indices worker `rank` of `world` trains on in a step: the rank-th of W near-equal
    contiguous slices (sizes differ by at most one) of the step's `rows` rows, which follow
    the `step_total` rows of each earlier step in the order. Which rows a step takes never
    depends on W, so a run may resume with another number of workers and stay exact."""
    return order[rank_rows(step_in_epoch * step_total, rows, world, rank)]


def rank_rows(start: int, n: int, world: int, rank: int) -> slice:
    """Rank's contiguous part of rows [start, start + n) split W ways: sizes differ by <= 1."""
    base, extra = divmod(n, world)
    first = start + rank * base + min(rank, extra)
    return slice(first, first + base + (rank < extra))


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's order: distinct for every (seed, epoch) below a million epochs."""
    return (seed * 1_000_003 + epoch * 7_919 + 0x5EED) % (2**63)


def fold_rows(seed: int, total: int, folds: int, fold: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, held-out rows) of fold `fold` of k-fold cross-validation (data.folds),
    both ascending: the held-out rows are those whose position in a permutation of the
    `total` rows, drawn from `seed` alone, is `fold` mod `folds`. The k folds partition the
    rows; a fold's training rows are then a data set of their own, in file order."""
    import torch

    generator = torch.Generator().manual_seed(fold_seed(seed))
    held = torch.randperm(total, generator=generator)[fold::folds].sort().values
    keep = torch.ones(total, dtype=torch.bool)
    keep[held] = False
    return torch.arange(total)[keep], held


def held_out_count(total: int, folds: int, fold: int) -> int:
    """How many rows fold `fold` holds out: the positions fold, fold + k, ... below total."""
    return len(range(fold, total, folds))


def fold_seed(seed: int) -> int:
    """The seed of the folds' permutation: apart from every epoch's (epoch_seed)."""
    return (seed * 1_000_003 + 0xF01D5) % (2**63)  # no epoch * 7_919 + 0x5EED is 0xF01D5
