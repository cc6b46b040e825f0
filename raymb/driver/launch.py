"""The launcher of raymb's loops on a plain torch.distributed group of local processes, no Ray.

`run_torch` (or a `TorchGroup`, started and waited for apart) starts `world` processes with
multiprocessing's spawn, each in a fresh gloo (or NCCL) group on this machine with its share
of the cores, and runs a loop in each with a `TorchSession` (raymb.worker.session, the seam's
torch side). `raymb train --local` (raymb.driver.run, `epochs_process`) and `raymb lr-find
--local` run on it; the numerics tests run their own loops too.

The processes are the driver's children, in its process group:
- they ignore SIGINT (blocked from before they start, and ignored): a terminal's Ctrl-C goes
  to the whole group, and the driver asks them to stop through the run's STOP file, as Ray's
  workers are asked;
- they die with the driver (Linux: PR_SET_PDEATHSIG), and a failed one ends the others: the
  error is what it raised (its traceback), or the signal that killed it.

This module imports neither torch nor the driver's checks: the driver starts the processes
without torch, and a spawned process imports torch itself (the seconds it takes are each
process's own, in parallel).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

END_GRACE_S = 2.0
"""How long a process of a group that is ending (a failed peer, a second Ctrl-C) has after
SIGTERM before SIGKILL."""


class WorkerFailed(RuntimeError):
    """A process of the group raised or died; the others were ended. The message's last line
    is what it raised (as a traceback's last line reads), or how it died."""


def run_torch(
    loop: Callable[..., Any], args: tuple, world: int, *, backend: str = "gloo", port: int = 0
) -> Any:
    """`loop(*args, session_factory=TorchSession)` on `world` processes of a fresh gloo (or
    NCCL) group on this machine; returns what rank 0's loop returned (something small and
    picklable), or raises WorkerFailed if any process failed."""
    group = TorchGroup(loop, args, world, backend=backend, port=port)
    group.start()
    return group.wait()


class TorchGroup:
    """The processes of one run_torch: `start()` and `wait()` on the same thread (a process
    dies with the thread that started it)."""

    def __init__(
        self,
        loop: Callable[..., Any],
        args: tuple,
        world: int,
        *,
        backend: str = "gloo",
        port: int = 0,
    ) -> None:
        self.loop, self.args, self.world, self.backend, self.port = loop, args, world, backend, port
        self.processes: list[Any] = []
        self.result: Any = None
        self.errors: dict[int, str] = {}
        self._queue: Any = None

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._queue = ctx.SimpleQueue()
        self._left = ctx.Barrier(self.world)  # every rank past its teardown (_torch_process)
        port = self.port or _free_port()
        with _sigint_blocked(), _without_cli_main():
            for rank in range(self.world):
                process = ctx.Process(
                    target=_torch_process,
                    args=(
                        rank,
                        self.loop,
                        self.args,
                        self.world,
                        self.backend,
                        port,
                        os.getpid(),
                        self._queue,
                        self._left,
                    ),
                    name=f"raymb-worker-{rank}",
                    daemon=True,  # ended, not waited for, by a driver that exits
                )
                process.start()
                self.processes.append(process)

    def wait(self, poll_s: float = 0.2) -> Any:
        """Until every process has returned (rank 0's result) or one failed (WorkerFailed,
        the others ended). Signal handlers run between polls; whatever they raise (a second
        Ctrl-C) ends the processes and is raised here."""
        try:
            while True:
                self._drain()
                failed = [p for p in self.processes if p.exitcode not in (None, 0)]
                if failed:
                    raise self._failure(failed)
                alive = [p.sentinel for p in self.processes if p.exitcode is None]
                if not alive:
                    break
                multiprocessing.connection.wait(alive, timeout=poll_s)
            self._drain()
            return self.result
        finally:
            self.end()

    def end(self) -> None:
        """Every process still running: SIGTERM, then SIGKILL after END_GRACE_S."""
        running = [p for p in self.processes if p.exitcode is None]
        for p in running:
            p.terminate()
        for p in running:
            p.join(END_GRACE_S)
            if p.exitcode is None:
                p.kill()
                p.join()

    def _drain(self) -> None:
        queue = self._queue
        while queue is not None and not queue.empty():
            kind, rank, value = queue.get()
            if kind == "result":
                self.result = value
            else:
                self.errors.setdefault(rank, value)  # in the order they came

    def _failure(self, failed: list[Any]) -> WorkerFailed:
        """The first failure: a process killed by a signal (its peers then raise), else the
        one whose error came first (its peers' errors follow), else the lowest rank."""
        self._drain()
        killed = [r for r, p in enumerate(self.processes) if (p.exitcode or 0) < 0]
        failed_ranks = [self.processes.index(p) for p in failed]
        rank = (killed or list(self.errors) or failed_ranks)[0]
        first = self.processes[rank]
        if (first.exitcode or 0) < 0:
            try:
                how = f"killed by {signal.Signals(-first.exitcode).name}"
            except ValueError:
                how = f"killed by signal {-first.exitcode}"
            return WorkerFailed(f"worker rank {rank} (pid {first.pid}) died: {how}")
        if rank in self.errors:
            return WorkerFailed(
                f"worker rank {rank} (pid {first.pid}) failed:\n{self.errors[rank]}"
            )
        return WorkerFailed(
            f"worker rank {rank} (pid {first.pid}) exited with status {first.exitcode}"
        )


def epochs_process(spec: Any, *, session_factory: Callable[..., Any]) -> dict[str, Any] | None:
    """`raymb train --local`'s loop in one process: the epoch loop (raymb.worker.epochs) with a
    TorchSession that keeps checkpoint.keep checkpoints as Ray Train does; returns the last
    report's metrics (what Ray Train's Result.metrics holds)."""
    from raymb.worker.epochs import train_loop

    config = spec.config
    session = session_factory(
        Path(spec.run_dir.path),
        device=_device(config.scale.use_gpu),
        keep=config.checkpoint.keep,
        metric=config.checkpoint.metric,
        mode=config.checkpoint.order,
    )
    train_loop({"spec": spec}, session)
    return session.reports[-1] if session.reports else None


def _device(use_gpu: bool):
    import torch

    if use_gpu:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _torch_process(
    rank: int,
    loop: Callable[..., Any],
    args: tuple,
    world: int,
    backend: str,
    port: int,
    parent: int,
    queue: Any,
    left: Any,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver's to take (see the module)
    _die_with(parent)
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    try:
        import torch
        import torch.distributed as dist

        from raymb.worker.session import TorchSession

        if "OMP_NUM_THREADS" not in os.environ:
            # Each process its share of the cores, as Ray gives a worker its CPUs and torchrun
            # one thread: `world` processes of all-core thread pools fight over the cores (7x
            # slower steps for the digits mlp on 2 workers and 2 cores).
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
        out = loop(*args, session_factory=TorchSession)
        # No rank leaves while another still talks to the group (rank 0 also serves its
        # store): a peer gone mid-teardown aborts gloo ("terminate called without an active
        # exception"). A rank that raised is not waited for: the driver ends the others.
        dist.barrier()
        dist.destroy_process_group()
        # Rank 0 serves the group's store: a process that exits while a peer is still inside
        # destroy_process_group closes sockets under the peer's gloo threads, which then end
        # it with SIGABRT ("terminate called without an active exception"; seen in a fresh
        # clone's suite). So no rank exits before every rank is past its teardown; the
        # barrier is the driver's, outside torch.
        try:
            left.wait(timeout=60)
        except threading.BrokenBarrierError:
            pass  # a peer failed: the driver ends the group
        if rank == 0:
            queue.put(("result", rank, out))
    except BaseException:  # noqa: BLE001 - told to the driver first, which ends the others
        # Before anything else: its peers fail in turn once it is gone, and the driver names
        # the process whose error came first.
        queue.put(("error", rank, traceback.format_exc()))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def _die_with(parent: int) -> None:
    """End this process when the driver dies (killed, out of memory): no orphan trains on."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread while the processes start: they inherit the mask, so a
    Ctrl-C while they import is not theirs (Ray starts its processes so). One sent meanwhile
    reaches this process once unblocked."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextmanager
def _without_cli_main() -> Iterator[None]:
    """A spawned process runs the parent's main script again, as __mp_main__, before its
    target. For the `raymb` console script that is an import of every command (about 0.5 s a
    process here) for nothing: its loops live in raymb's modules, never in __main__. Another
    main (a user's script, pytest) is left as it is."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    hide = (
        main is not None
        and getattr(main, "__spec__", None) is None
        and path is not None
        and os.path.basename(path) == "raymb"
    )
    if not hide:
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
