"""`raymb train --local` (scale.launcher = "local"): the same run without Ray, on processes of a
gloo group on this machine (raymb.driver.local, raymb.driver.launch).

- It equals the run on Ray: the default linear job ends with the same parameters and
  metrics.csv rows.
- One run, either launcher: a run started with --local resumes on Ray by name (on another W),
  and back, ending as a straight run; the Ray launch's failures exhausted say so in one line
  naming the latest checkpoint, which is intact.
- Ctrl-C, sent to the whole process group as a terminal sends it, checkpoints; the same command
  resumes. The workers ignore it (the driver asks them through the STOP file), and no Ray is
  loaded in the driver.
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
from raymb.errors import RaymbError
from raymb.rundir.checkpoint import read
from raymb.tools.load import load_model

ROOT = Path(__file__).resolve().parents[2]
RAY_POLL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # raymb.worker.worker.POLL_ENV, POLL_S
# Checkpoints by step only (not by the clock), so that every run has the same metrics rows.
STEADY = ("checkpoint.every_steps=40", "checkpoint.min_interval_s=1e9")
TIMED = {"samples_per_s", "step_time_s", "data_wait_s"}
"""metrics.csv's columns measured by the clock: the only ones two runs may differ in."""


@pytest.fixture(scope="module")
def default_data(tmp_path_factory):
    """The default job's data (raymb train with no config: y = 2x + 1, 4096 rows)."""
    from raymb.data.synthetic import generate

    out = tmp_path_factory.mktemp("default")
    generate("linear", out)
    return out


def _config(data: Path, runs: Path, name: str, *sets: str):
    paths = [f"data.train={data / 'train'}", f"data.val={data / 'val'}"]
    return load_config(None, [*paths, f"run.storage_path={runs}", f"run.name={name}", *sets])


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k not in TIMED} for r in csv.DictReader(f)]


def _assert_same_rows(got: list[dict[str, str]], want: list[dict[str, str]], skip=()) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        for key, value in b.items():
            if key in skip:
                continue
            if value and a[key] != value:
                assert float(a[key]) == pytest.approx(float(value), rel=1e-5), (b["step"], key)
            else:
                assert a[key] == value, (b["step"], key)


def _assert_same_model(got: str | Path, want: str | Path) -> None:
    a, b = read(got)["state_dict"], read(want)["state_dict"]
    assert a.keys() == b.keys()
    for key, value in b.items():
        torch.testing.assert_close(a[key], value, rtol=1e-5, atol=1e-7)


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_local_equals_ray_and_a_run_resumes_across_launchers(
    ray_session, default_data, tmp_path, monkeypatch
):
    import raymb

    monkeypatch.setenv(*RAY_POLL)  # the drills wait 5 polls before a kill
    runs = tmp_path / "runs"
    on_ray = raymb.train(_config(default_data, runs, "ray", *STEADY))
    local = _config(default_data, runs, "local", *STEADY, "scale.launcher=local")
    on_local = raymb.train(local)
    assert on_local.summary["steps"] == on_ray.summary["steps"] == 320
    assert on_local.summary["workers"] == 2
    _assert_same_model(on_local.checkpoint, on_ray.checkpoint)
    _assert_same_rows(_rows(runs / "local"), _rows(runs / "ray"))
    # checkpoint.keep = 2: the best by val_loss and the latest, as Ray Train keeps them.
    kept = sorted(p.name for p in (runs / "local").glob("checkpoint_*"))
    assert len(kept) <= 3 and kept[-1] == "checkpoint_00000320", kept

    # One run, three launches: --local on 2 workers, a worker killed at step 130 (the run
    # fails; the latest checkpoint is step 120's); Ray on 1 worker resumes it, killed at step
    # 250 (latest 240); --local on 2 workers ends it.
    mixed = runs / "mixed"

    def launch(*sets: str):
        return raymb.train(_config(default_data, runs, "mixed", *STEADY, *sets))

    with pytest.raises(RaymbError, match="killed by SIGKILL"):
        launch("scale.launcher=local", "fault.rank=1", "fault.kill_worker_at_step=130")
    assert json.loads((mixed / "status.json").read_text())["status"] == "failed"
    with pytest.raises(RaymbError) as info:  # scale.max_failures=0: failures exhausted
        launch("scale.workers=1", "fault.kill_worker_at_step=250")
    message = str(info.value)
    assert "training failed" in message and "\n" not in message
    assert "latest checkpoint:" in message and "run.name='mixed'" in message
    latest = Path(message.split("latest checkpoint: ")[1].split(" (run again")[0])
    assert read(latest / "state.pt")["progress"]["step"] == 240
    _, payload = load_model(latest)  # intact and loadable
    assert payload["config"]["run"]["name"] == "mixed"
    assert not (mixed / "summary.json").exists()
    assert (mixed / "checkpoint_manager_snapshot.json").exists()
    last = launch("scale.launcher=local")
    assert last.summary["resumed_from_steps"] == [120, 240]
    assert last.summary["steps"] == 320 and last.status == "finished"
    _assert_same_model(last.checkpoint, on_local.checkpoint)
    # Rows of the steps on 1 worker say so, and all-reduce nothing.
    _assert_same_rows(_rows(mixed), _rows(runs / "local"), skip={"workers", "bytes_allreduced"})


# 1024 rows, G=64 in microbatches of 2: 16 steps an epoch, 480 in 30 epochs, slow enough per
# step that the signal lands mid-run (as tests/integration/test_stop_ray.py).
TOTAL = 480
SLOW = (
    "train.epochs=30",
    "train.global_batch_size=64",
    "train.microbatch_size=2",
    "train.log_every=10",
    "optim.lr=0.05",
)


def _group_members(pgid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != pgid:
            try:
                if os.getpgid(int(name)) == pgid:
                    found.append(int(name))
            except (OSError, ProcessLookupError):
                continue
    return found


def _ignores_sigint(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # gone meanwhile
    masks = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    bit = 1 << (signal.SIGINT - 1)
    return bool((int(masks["SigBlk"], 16) | int(masks["SigIgn"], 16)) & bit)


def _maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


@pytest.mark.timeout(900)
def test_ctrl_c_to_the_group_checkpoints_and_the_same_command_resumes(linear_data, tmp_path):
    runs = tmp_path / "runs"
    sets = (
        f"data.train={linear_data / 'train'}",
        f"data.val={linear_data / 'val'}",
        f"run.storage_path={runs}",
        "run.name=stopped",
        *SLOW,
    )
    command = [sys.executable, "-m", "raymb.cli", "train", "--local"]
    command += [f"--set={s}" for s in sets]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    run_dir = runs / "stopped"
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own group, as a terminal gives a command
    )
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "metrics.csv").exists() or len(_rows(run_dir)) < 2:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no metrics.csv rows in 300 s"
            time.sleep(0.05)
        # The two worker processes (and multiprocessing's resource tracker), in the group.
        members = _group_members(proc.pid)
        assert len(members) >= 2, members
        assert all(_ignores_sigint(pid) for pid in members)
        assert "_raylet" not in _maps(proc.pid)  # no Ray in the driver
        os.kill(proc.pid, signal.SIGINT)
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole group
        out, _ = proc.communicate(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, out
    assert "raymb: --local: 2 processes on this machine, no Ray" in out
    found = re.findall(r"raymb: stopped at step (\d+) \(checkpoint saved\)", out)
    assert len(found) == 1, out
    stopped_at = int(found[0])
    assert 0 < stopped_at < TOTAL, out
    assert json.loads((run_dir / "status.json").read_text())["status"] == "stopped"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == stopped_at
    assert read(Path(summary["checkpoint"]).parent / "state.pt")["progress"]["step"] == stopped_at
    assert not (run_dir / "STOP").exists() and not (run_dir / ".lock").exists()

    again = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stdout + again.stderr
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["resumed_from_steps"] == [stopped_at] and resumed["steps"] == TOTAL
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
