"""The torch session never aborts at teardown (issue 37): under an artificial CPU load (busy
processes on every core), groups of 2 gloo processes take lr-find's early-stop path again and
again (every rank leaves its loop at the step they agreed on, in a different step each
time; rank 0, which serves the group's store, returns first) and every run ends cleanly: no
"terminate called without an active exception" (SIGABRT), no hang (raymb.driver.launch's
barrier outside torch, after destroy_process_group)."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from raymb.driver.launch import run_torch

RUNS = 4


def _burn(until: float) -> None:
    while time.time() < until:
        pass


def _early_stop(stop_at: int, *, session_factory) -> int:  # noqa: ARG001 - no session needed
    """A few all-reduces; the ranks agree to stop at `stop_at` (lr-find's curve.add), and
    rank 0 leaves at once, the others after a little more work of their own."""
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    for step in range(100):
        flag = torch.tensor([float(step == stop_at)])
        dist.all_reduce(flag)
        if flag.item() > 0:
            break
    if rank != 0:
        sum(i * i for i in range(200_000))  # the others are still busy as rank 0 leaves
    return step


@pytest.mark.procs
def test_early_stops_under_load_never_abort() -> None:
    ctx = multiprocessing.get_context("fork")
    until = time.time() + 300
    burners = [
        ctx.Process(target=_burn, args=(until,), daemon=True) for _ in range(os.cpu_count() or 2)
    ]
    for b in burners:
        b.start()
    try:
        for run in range(RUNS):
            stop_at = 1 + 3 * run
            assert run_torch(_early_stop, (stop_at,), 2) == stop_at
    finally:
        for b in burners:
            b.kill()
            b.join()
