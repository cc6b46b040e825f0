"""The driver's stop signals (raymb.driver.signals), without Ray: the first SIGINT or SIGTERM asks
for the stop, the same signal delivered twice at once (as `timeout -s INT` does: to the command,
then to its process group) is one request, a later one abandons at once and the run is marked
`interrupted`. tests/integration/test_stop_ray.py sends the group signal to a real run."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import redirect_stderr
from pathlib import Path

import pytest

from raymb import load_config
from raymb.driver.signals import REPEAT_S, StopSignals, in_thread

ROOT = Path(__file__).resolve().parents[3]


class Fit:
    """fit() until the stop file appears (as the workers do), or until `release`."""

    def __init__(self, stop_file: Path, *, stubborn: bool = False) -> None:
        self.stop_file, self.stubborn, self.release = stop_file, stubborn, threading.Event()

    def __call__(self) -> str:
        while not self.release.is_set():
            if self.stop_file.exists() and not self.stubborn:
                return "checkpointed"
            time.sleep(0.01)
        return "released"


def _signal_after(signum: int, delay: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay), os.kill(os.getpid(), signum)))
    thread.start()
    return thread


def test_sigterm_asks_for_the_stop_and_the_handlers_are_restored(tmp_path) -> None:
    stop = tmp_path / "STOP"
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    sender = _signal_after(signal.SIGTERM, 0.3)
    with StopSignals(lambda: stop.write_text("")) as signals:
        result = in_thread(Fit(stop))
    sender.join()
    assert result == "checkpointed" and signals.asked
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_the_same_signal_twice_at_once_is_one_request(tmp_path) -> None:
    stop, asked = tmp_path / "STOP", []
    fit = Fit(stop, stubborn=True)
    senders = [_signal_after(signal.SIGINT, 0.3), _signal_after(signal.SIGINT, 0.35)]
    threading.Timer(0.3 + REPEAT_S + 0.5, fit.release.set).start()
    with StopSignals(lambda: asked.append(stop.write_text(""))):
        assert in_thread(fit) == "released"  # not abandoned by the repeat
    for sender in senders:
        sender.join()
    assert len(asked) == 1


def test_a_second_ctrl_c_abandons_at_once_and_marks_the_run_interrupted(tmp_path) -> None:
    from raymb.driver.report import progress
    from raymb.driver.run import _run
    from raymb.rundir.lock import lock_run
    from raymb.storage import resolve

    config = load_config(None, [f"run.storage_path={tmp_path}", "run.name=r"])
    run_dir = resolve(str(tmp_path / "r"))
    lock = lock_run(run_dir)
    stop = tmp_path / "r" / "STOP"
    fit = Fit(stop, stubborn=True)  # a checkpoint that never comes
    senders: list[threading.Thread] = []

    def fit_and_signal() -> str:  # the signals come once training is under way
        senders.extend(_signal_after(signal.SIGINT, d) for d in (0.3, 0.3 + REPEAT_S + 0.2))
        return fit()

    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt), redirect_stderr(io.StringIO()):
            shown = progress.Watch(run_dir / "metrics.csv", 10, io.StringIO())
            with StopSignals(lambda: stop.write_text("")):
                _run(
                    config,
                    lock,
                    lambda: in_thread(fit_and_signal),
                    shown=shown,
                    close=lambda summary, metrics: "finished",
                )
    finally:
        fit.release.set()
        for sender in senders:
            sender.join()
        lock.release()
    assert time.monotonic() - started < 5  # at once: not waiting for the stubborn fit
    assert stop.exists()  # the first asked to stop
    assert json.loads((tmp_path / "r" / "status.json").read_text())["status"] == "interrupted"


CHILD = """
import sys, time, pathlib
from raymb.driver.signals import StopSignals, in_thread
stop = pathlib.Path(sys.argv[1])
def fit():
    while not stop.exists():
        time.sleep(0.002)
    time.sleep(0.05)  # the checkpoint
    return "checkpointed"
with StopSignals(lambda: stop.write_text("")):
    print("ready", flush=True)
    print(in_thread(fit), flush=True)
"""


def test_a_group_signal_sent_as_timeout_sends_it_always_checkpoints(tmp_path) -> None:
    """Many times, at varied moments: the signal to the driver, then to its whole process group
    (coreutils `timeout`'s way): one request, never the second that abandons."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    for i in range(20):
        stop = tmp_path / f"STOP{i}"
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(stop)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            assert proc.stdout.readline() == "ready\n"
            time.sleep(0.002 * (i % 7))
            os.kill(proc.pid, signal.SIGINT)
            os.killpg(proc.pid, signal.SIGINT)
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert (proc.returncode, out) == (0, "checkpointed\n"), i


def test_a_ctrl_c_that_code_inside_caught_is_raised_at_the_blocks_end() -> None:
    """Ray's start-up waits catch every exception, a KeyboardInterrupt too: the start-up's
    guard (raymb.driver.signals.Interrupts) raises it again when the block ends."""
    from raymb.driver.signals import Interrupts

    before = signal.getsignal(signal.SIGINT)
    swallowed = []
    with pytest.raises(KeyboardInterrupt), Interrupts():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here
        except BaseException as e:  # noqa: BLE001 - as a wait that catches everything does
            swallowed.append(type(e).__name__)
    assert swallowed == ["KeyboardInterrupt"]
    assert signal.getsignal(signal.SIGINT) == before
