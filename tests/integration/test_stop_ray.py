"""Ctrl-C that saves: the first SIGINT (or SIGTERM) makes the workers checkpoint at the next step
and the run ends `stopped`, saying how to resume; the same command then resumes it to the end of
a straight run. A second signal abandons the run at once, `interrupted`.

The real thing: `python -m raymb.cli train` in its own process, a real SIGINT, its own local
Ray cluster. The straight reference trains on a plain gloo group (raymb.driver.local, no Ray),
which ends as the run under Ray Train does (tests/integration/test_session_ray.py).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import torch

from raymb import load_config
from raymb.driver.local import train_torch
from raymb.rundir.checkpoint import STATE_FILE, load_model, read

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]

# 1024 rows, G=64 in microbatches of 2 (16 a worker a step on 2 workers): 16 steps an epoch,
# 800 in 50 epochs, slow enough per step that the signal lands mid-run. A row every 10 steps;
# 800 is on that grid, so the straight run's last row is its train_loss (the last 10 steps).
COMMON = (
    "scale.workers=2",
    "train.epochs=50",
    "train.global_batch_size=64",
    "train.microbatch_size=2",
    "train.log_every=10",
    "optim.lr=0.05",
    "optim.momentum=0.5",
)
TOTAL = 800


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


def _rows(run_dir: Path) -> dict[int, float]:
    try:
        with open(run_dir / "metrics.csv") as f:
            return {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(f)}
    except (FileNotFoundError, ValueError, KeyError):  # not there yet, or mid-row
        return {}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def test_ctrl_c_checkpoints_and_the_same_command_resumes_to_the_straight_end(
    linear_data, tmp_path
) -> None:
    runs = tmp_path / "runs"
    sets = (
        f"data.train={linear_data / 'train'}",
        f"data.val={linear_data / 'val'}",
        f"run.storage_path={runs}",
        *COMMON,
    )
    command = [
        sys.executable,
        "-m",
        "raymb.cli",
        "train",
        *(f"--set={s}" for s in (*sets, "run.name=stopped")),
    ]
    run_dir = runs / "stopped"
    (tmp_path / "cwd").mkdir()
    proc = subprocess.Popen(
        command,
        cwd=tmp_path / "cwd",
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # the signal goes to the driver alone, as the test sends it
    )
    try:
        deadline = time.monotonic() + 300
        while not _rows(run_dir):  # training is under way
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no metrics.csv row in 300 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        _kill_group(proc)
    assert proc.returncode == 0, out
    assert "Ctrl-C again to abandon it" in out
    found = re.findall(
        r"raymb: stopped at step (\d+) \(checkpoint saved\); run the same command to resume", out
    )
    assert len(found) == 1, out
    stopped_at = int(found[0])
    assert 0 < stopped_at < TOTAL, f"the run ended before the signal: {out}"
    assert json.loads((run_dir / "status.json").read_text())["status"] == "stopped"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == stopped_at
    state = read(Path(summary["checkpoint"]).parent / STATE_FILE)
    assert state["progress"]["step"] == stopped_at  # the checkpoint is the stop's own
    assert not (run_dir / "STOP").exists() and not (run_dir / ".lock").exists()

    again = subprocess.run(
        command,
        cwd=tmp_path / "cwd",
        env=_env(),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["resumed_from_steps"] == [stopped_at] and resumed["steps"] == TOTAL
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"

    straight = train_torch(load_config(None, [*sets, "run.name=straight"]))
    for p, q in zip(
        load_model(resumed["checkpoint"])[0].parameters(), load_model(straight)[0].parameters()
    ):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    want, got = _rows(runs / "straight"), _rows(run_dir)
    assert set(want) <= set(got) and set(got) - set(want) <= {stopped_at}  # its checkpoint's row
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step
    assert resumed["train_loss"] == pytest.approx(want[TOTAL], rel=1e-5)


# ------------------------------------------- the signals themselves, on a stand-in trainer


class Trainer:
    """fit() until the stop file appears (as the workers do), or until `release`."""

    def __init__(self, stop_file) -> None:
        self.stop_file, self.release = stop_file, threading.Event()

    def fit(self) -> str:
        while not self.release.is_set():
            if self.stop_file.exists():
                return "checkpointed"
            time.sleep(0.01)
        return "released"


def _signal_after(signum: int, delay: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay), os.kill(os.getpid(), signum)))
    thread.start()
    return thread


def test_sigterm_asks_for_the_stop_as_the_first_ctrl_c_does(tmp_path) -> None:
    from raymb.driver.cluster import fit_until_stopped
    from raymb.rundir.storage import resolve

    stop_file = resolve(str(tmp_path / "STOP"))
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    err = io.StringIO()
    sender = _signal_after(signal.SIGTERM, 0.3)
    with redirect_stderr(err):
        result = fit_until_stopped(Trainer(stop_file), stop_file, stops="at the next step")
    sender.join()
    assert result == "checkpointed" and stop_file.exists()
    assert err.getvalue() == (
        "raymb: stopping at the next step, then checkpointing (Ctrl-C again to abandon it)\n"
    )
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_second_ctrl_c_abandons_at_once_and_marks_the_run_interrupted(tmp_path) -> None:
    from raymb.driver.cluster import fit_until_stopped
    from raymb.driver.run import _run
    from raymb.rundir import progress
    from raymb.rundir.lock import lock_run
    from raymb.rundir.storage import resolve

    config = load_config(None, [f"run.storage_path={tmp_path}", "run.name=r"])
    run_dir = resolve(str(tmp_path / "r"))
    lock = lock_run(run_dir)
    stop_file = run_dir / "STOP"

    class Stubborn(Trainer):
        def fit(self) -> str:  # a checkpoint that never comes
            self.release.wait()
            return "released"

    trainer = Stubborn(stop_file)
    senders = [_signal_after(signal.SIGINT, 0.3), _signal_after(signal.SIGINT, 0.8)]
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt), redirect_stderr(io.StringIO()):
            shown = progress.Watch(run_dir / "metrics.csv", 10, io.StringIO())
            _run(
                config,
                lock,
                lambda: fit_until_stopped(trainer, stop_file, stops="at the next step"),
                shown=shown,
                close=lambda summary, metrics: "finished",
            )
    finally:
        trainer.release.set()
        for sender in senders:
            sender.join()
        lock.release()
    assert time.monotonic() - started < 5  # at once: not waiting for the stubborn fit
    assert stop_file.exists()  # the first asked to stop
    assert json.loads((tmp_path / "r" / "status.json").read_text())["status"] == "interrupted"
