"""A local Ray cluster that dies with its driver.

`ray.init(address="local")` starts the cluster's processes as the driver's children, and Ray
has them killed when the driver dies (PR_SET_PDEATHSIG); but the raylet's own children, the
dashboard and runtime-env agents, notice a dead raylet only after about a minute, and a user
who starts again at once finds their CPUs and memory taken. `start` runs this file as a small
process (standard library only, no raymb import) that watches the driver: while the driver
lives it notes the processes of the session (those naming its session directory, and their
descendants); once the driver is gone it ends them, and any process whose output goes to the
session's logs. Linux only (it reads /proc); a cluster raymb joined is never watched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.25
"""How often the watchdog looks whether the driver is still there."""

SCAN_S = 1.0
"""How often it notes the session's processes while the driver lives."""

TERM_GRACE_S = 1.0
"""Between SIGTERM and SIGKILL for the processes left behind."""


def start(session_dir: str) -> subprocess.Popen | None:
    """Watch this process on behalf of the local cluster whose session is `session_dir`."""
    if not sys.platform.startswith("linux") or not os.path.isdir("/proc/self"):
        return None
    return subprocess.Popen(
        [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()), session_dir],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # never holds the driver's pipes or terminal open
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a closed terminal's SIGHUP, a Ctrl-C, do not stop it
        close_fds=True,
    )


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time in clock ticks, state) of a process; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # the command name may hold spaces
    return int(fields[1]), int(fields[19]), fields[0]


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _names_session(pid: int, session_dir: str) -> bool:
    """The process's command line names the session, or its stdout/stderr is a session log."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if session_dir.encode() in f.read():
                return True
    except OSError:
        return False
    for fd in (1, 2):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(session_dir + "/"):
                return True
        except OSError:
            pass
    return False


def _alive(pid: int, started: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] == started and stat[2] != "Z"


def _note(known: dict[int, int], driver: int, session_dir: str) -> None:
    """Add the session's processes to `known` (pid -> start time): the driver's descendants
    that name the session, and every descendant of those."""
    stats = {pid: s for pid in _pids() if (s := _stat(pid)) is not None}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    me = os.getpid()  # its command line names the session too
    # (pid, whether it is the session's); known processes whose raylet died hang under init.
    stack = [(driver, False)] + [
        (p, True) for p, t in known.items() if p in stats and stats[p][1] == t
    ]
    seen: set[int] = set()
    while stack:
        pid, ours = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        for child in children.get(pid, []):
            if child == me:
                continue
            started = stats[child][1]
            mine = ours or known.get(child) == started or _names_session(child, session_dir)
            if mine:
                known[child] = started
            stack.append((child, mine))  # a session process may hang under a helper of the driver


def _end(known: dict[int, int], session_dir: str) -> None:
    """End what is left of the session: SIGTERM, then SIGKILL after a grace."""
    me = os.getpid()
    for pid in _pids():
        if pid != me and pid not in known and _names_session(pid, session_dir):
            stat = _stat(pid)
            if stat is not None:
                known[pid] = stat[1]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [pid for pid, started in known.items() if _alive(pid, started)]
        for pid in left:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        if sig == signal.SIGTERM and left:
            deadline = time.monotonic() + TERM_GRACE_S
            while time.monotonic() < deadline and any(_alive(p, known[p]) for p in left):
                time.sleep(0.05)


def watch(driver: int, session_dir: str) -> None:
    """Until the driver is gone, note the session's processes; then end them."""
    known: dict[int, int] = {}
    scanned = -SCAN_S
    # This process is the driver's child: the driver is gone when the parent changes.
    while os.getppid() == driver:
        now = time.monotonic()
        if now - scanned >= SCAN_S:
            _note(known, driver, session_dir)
            scanned = now
        time.sleep(POLL_S)
    _end(known, session_dir)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver's Ctrl-C is not ours
    watch(int(sys.argv[1]), sys.argv[2])
