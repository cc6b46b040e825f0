"""Ctrl-C that saves: the first SIGINT (or SIGTERM) makes the workers checkpoint at the next step
and the run ends `stopped`, saying how to resume; the same command (here with --local) then
resumes it to the end of a straight run. A second signal abandons the run at once,
`interrupted`.

The real thing: `python -m raymb.cli train` in its own process, a real SIGINT, its own local
Ray cluster. The straight reference trains on a plain gloo group (raymb.driver.local, no Ray),
which ends as the run under Ray Train does (tests/integration/test_session_ray.py).
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raymb import load_config
from raymb.driver.local import train_torch
from raymb.rundir.checkpoint import STATE_FILE, read
from raymb.tools.load import load_model

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]

# 1024 rows, G=64 in microbatches of 2 (16 a worker a step on 2 workers): 16 steps an epoch,
# 480 in 30 epochs, slow enough per step that the signal lands mid-run (sent at the first row,
# step 10, it stopped the run near step 200 on 2 busy cores: ~9 ms a step). A row every 10
# steps; 480 is on that grid, so the straight run's last row is its train_loss (the last 10).
COMMON = (
    "scale.workers=2",
    "train.epochs=30",
    "train.global_batch_size=64",
    "train.microbatch_size=2",
    "train.log_every=10",
    "optim.lr=0.05",
    "optim.momentum=0.5",
    # Checkpoints (and their rows) by step only: an epoch-end one decided by the clock
    # (min_interval_s, 10 s by default) came at step 368 of a resume on a loaded machine and
    # not in the straight run, an extra metrics.csv row.
    "checkpoint.min_interval_s=1e9",
)
TOTAL = 480


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


def _group_members(pgid: int) -> list[tuple[int, str]]:
    """The processes of a process group other than its leader, with their command lines."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == pgid:
            continue
        try:
            if os.getpgid(int(name)) == pgid:
                found.append((int(name), Path(f"/proc/{name}/cmdline").read_text()[:80]))
        except (OSError, ProcessLookupError):
            continue  # gone meanwhile
    return found


def _blocks_sigint(pid: int) -> bool:
    """Whether a process blocks or ignores SIGINT (a process gone meanwhile counts as one)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    masks = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    bit = 1 << (signal.SIGINT - 1)
    return bool((int(masks["SigBlk"], 16) | int(masks["SigIgn"], 16)) & bit)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def test_ctrl_c_checkpoints_and_the_run_resumes_to_the_straight_end(linear_data, tmp_path) -> None:
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
        start_new_session=True,  # its own group, as a terminal gives a command
    )
    try:
        deadline = time.monotonic() + 300
        while not _rows(run_dir):  # training is under way
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no metrics.csv row in 300 s"
            time.sleep(0.05)
        others = _group_members(proc.pid)
        assert others, "a local cluster's processes share the driver's process group"
        unblocked = [cmd for pid, cmd in others if not _blocks_sigint(pid)]
        assert not unblocked, f"a terminal's Ctrl-C would reach {unblocked}"
        # As a terminal's Ctrl-C reaches it, and as `timeout -s INT` sends it: to the driver,
        # then to its whole process group, at once.
        os.kill(proc.pid, signal.SIGINT)
        os.killpg(proc.pid, signal.SIGINT)
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

    # Resumed on the torch session (`--local`, no second Ray cluster to start): a stopped run
    # is an ordinary run to resume, whichever launcher (test_local.py resumes one on Ray).
    again = subprocess.run(
        [*command[:4], "--local", *command[4:]],
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
