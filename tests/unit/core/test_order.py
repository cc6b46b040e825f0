"""Row order: a pure function of (seed, epoch); workers' slices partition every step."""

from __future__ import annotations

import pytest
import torch

from raymb.core.order import epoch_order, worker_rows

pytestmark = pytest.mark.timeout(60)

FILES = [5, 3, 8]  # rows per file: file 0 is rows 0..4, file 1 rows 5..7, file 2 rows 8..15


@pytest.mark.parametrize("shuffle", ["rows", "files", "none"])
def test_every_row_once_per_epoch(shuffle):
    for epoch in range(3):
        order = epoch_order(shuffle, 7, epoch, FILES)
        assert sorted(order.tolist()) == list(range(16))


def test_rows_differ_between_epochs_and_repeat_for_the_same_seed():
    a0, a1 = epoch_order("rows", 7, 0, FILES), epoch_order("rows", 7, 1, FILES)
    assert not torch.equal(a0, a1)
    assert torch.equal(a0, epoch_order("rows", 7, 0, FILES))
    assert not torch.equal(a0, epoch_order("rows", 8, 0, FILES))


def test_rows_leave_the_training_rng_alone():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    epoch_order("rows", 7, 0, FILES)
    assert torch.equal(torch.rand(4), expected)


def test_files_keep_each_file_in_order_and_move_whole_files():
    seen = set()
    for epoch in range(8):
        order = epoch_order("files", 1, epoch, FILES).tolist()
        starts = [i for i, v in enumerate(order) if v in (0, 5, 8)]  # where each file begins
        runs = [order[a:b] for a, b in zip(starts, [*starts[1:], 16])]
        assert sorted(tuple(r) for r in runs) == [
            tuple(range(0, 5)),
            tuple(range(5, 8)),
            tuple(range(8, 16)),
        ]
        seen.add(tuple(order[i] for i in starts))
    assert len(seen) > 1  # the file order changes between epochs


def test_none_is_the_file_order():
    assert epoch_order("none", 7, 3, FILES).tolist() == list(range(16))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_workers_split_each_step_and_the_steps_do_not_depend_on_the_workers(world):
    # 16 rows, G = 8: two steps. Worker r takes the r-th of W near-equal slices of each step's
    # 8 rows (3 workers: 3, 3 and 2), so the union of the workers' rows in a step is the same
    # whatever W.
    order = epoch_order("rows", 2, 0, FILES)
    for step in range(2):
        parts = [worker_rows(order, step, 8, 8, r, world) for r in range(world)]
        assert [len(p) for p in parts] == [8 // world + (r < 8 % world) for r in range(world)]
        assert torch.equal(torch.cat(parts), order[step * 8 : (step + 1) * 8])


def test_short_last_step():
    # 21 rows, G = 8: steps of 8, 8 and 5 rows; on 2 workers the last is split 3 and 2.
    order = torch.arange(21)
    assert worker_rows(order, 2, 8, 5, 0, 2).tolist() == [16, 17, 18]
    assert worker_rows(order, 2, 8, 5, 1, 2).tolist() == [19, 20]
