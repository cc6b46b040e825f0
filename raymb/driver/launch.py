"""The launcher of raymb's loops on a plain torch.distributed group of local processes, no Ray.

`run_torch` starts `world` processes with torch.multiprocessing, each in a fresh gloo (or
NCCL) group on this machine with its share of the cores, and runs a loop in each with a
`TorchSession` (raymb.worker.session, the seam's torch side). raymb.driver.local runs
`raymb train` and `raymb lr-find` on it; the numerics tests run their own loops too. Spawned
processes import the module that holds their entry point: this one imports torch and the
session only, not the driver's checks and data reading.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from raymb.worker.session import TorchSession


def run_torch(
    loop: Callable[..., Any], args: tuple, world: int, *, backend: str = "gloo", port: int = 0
) -> None:
    """`loop(*args, session)` on `world` processes of a fresh gloo (or NCCL) group on this
    machine, as torch.multiprocessing starts them; raises if any process failed."""
    import torch.multiprocessing as mp

    if port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    mp.start_processes(
        _torch_process,
        args=(loop, args, world, backend, port),
        nprocs=world,
        join=True,
        start_method="spawn",
    )


def _torch_process(
    rank: int, loop: Callable[..., Any], args: tuple, world: int, backend: str, port: int
) -> None:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    if "OMP_NUM_THREADS" not in os.environ:
        # Each process its share of the cores, as Ray gives a worker its CPUs and torchrun
        # one thread: `world` processes of all-core thread pools fight over the cores (7x
        # slower steps for the digits mlp on 2 workers and 2 cores).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        loop(*args, session_factory=TorchSession)
        # No rank leaves while another still talks to the group (rank 0 also serves its
        # store): a peer gone mid-teardown aborts gloo ("terminate called without an active
        # exception"). A rank that raised is not waited for: the others are terminated.
        dist.barrier()
    finally:
        dist.destroy_process_group()
