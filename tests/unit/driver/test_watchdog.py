"""raymb.driver.watchdog without Ray: a stand-in driver starts the watchdog and processes the
way `ray.init(address="local")` does (one naming the session directory with a child of its
own, one writing to the session's logs), and one of its own; SIGKILLed, its session's
processes are gone within 10 s and its own process is left alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

SLEEP = "import time; time.sleep(600)"
DRIVER = """
import json, subprocess, sys, time
from raymb.driver import watchdog

session, sleep = sys.argv[1:3]
py = sys.executable
watchdog.start(session)
# Like the raylet: names the session, and starts a worker that does not.
spawn = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', sys.argv[1]]); "
raylet = subprocess.Popen([py, "-c", spawn + sleep, sleep, session + "/sockets/raylet"])
with open(session + "/logs/worker.out", "w") as out:  # like a worker: output to session logs
    worker = subprocess.Popen([py, "-c", sleep], stdout=out)
own = subprocess.Popen([py, "-c", sleep])  # the driver's own, nothing to do with Ray
print(json.dumps({"raylet": raylet.pid, "worker": worker.pid, "own": own.pid}), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def test_a_killed_drivers_session_processes_end_and_nothing_else(tmp_path):
    session = tmp_path / "session_2026-12-01_00-00-00_000000_1"
    (session / "logs").mkdir(parents=True)
    (session / "sockets").mkdir()
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(root)}
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(session), SLEEP],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    pids: dict[str, int] = {}
    try:
        pids = json.loads(driver.stdout.readline())
        deadline = time.monotonic() + 30
        while not _children(pids["raylet"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        pids["raylet_child"] = _children(pids["raylet"])[0]
        watcher = [p for p in _children(driver.pid) if p not in pids.values()]
        assert len(watcher) == 1
        pids["watchdog"] = watcher[0]
        time.sleep(2.5)  # the watchdog notes the session's processes each second
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        killed = time.monotonic()
        session_pids = [pids[k] for k in ("raylet", "raylet_child", "worker", "watchdog")]
        while any(map(_alive, session_pids)) and time.monotonic() - killed < 10:
            time.sleep(0.2)
        assert [p for p in session_pids if _alive(p)] == [], pids
        assert _alive(pids["own"]), "the driver's own process is not the cluster's"
    finally:
        driver.kill()
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_the_watchdog_stays_while_its_driver_lives_and_ends_after_it(tmp_path):
    session = tmp_path / "session_x"
    (session / "logs").mkdir(parents=True)
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(root)}
    script = (
        "import sys, time; from raymb.driver import watchdog; "
        "w = watchdog.start(sys.argv[1]); print(w.pid, flush=True); time.sleep(1.5)"
    )
    driver = subprocess.Popen(
        [sys.executable, "-c", script, str(session)], stdout=subprocess.PIPE, text=True, env=env
    )
    pid = int(driver.stdout.readline())
    assert _alive(pid)
    assert driver.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)
