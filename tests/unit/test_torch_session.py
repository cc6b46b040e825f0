"""raymb.driver.launch.run_torch: the plain torch.distributed group the numerics tests, the
sweeps' references and `bench` run raymb's loops on."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from raymb.driver.launch import run_torch


def _threads(out: Path, *, session_factory) -> None:
    rank = int(os.environ["RANK"])
    (out / str(rank)).write_text(str(torch.get_num_threads()))


def test_each_process_takes_its_share_of_the_cores(tmp_path, monkeypatch):
    # As Ray gives a worker its CPUs: 2 processes of all-core thread pools on 2 cores made
    # the digits mlp's steps 7x slower.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    run_torch(_threads, (tmp_path,), 2)
    share = max(1, (os.cpu_count() or 1) // 2)
    assert [int((tmp_path / str(r)).read_text()) for r in range(2)] == [share, share]
