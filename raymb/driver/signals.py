"""The driver's stop signals: the first SIGINT or SIGTERM asks for a stop that keeps the work
(the workers checkpoint and return: `ask_stop`), a later one abandons at once.

One press can arrive twice: `timeout -s INT` sends its signal to the command and then to the
command's process group, and a wrapper script may pass on a terminal's Ctrl-C that reached it
too. A signal within `REPEAT_S` of the first is that same press, never the second that
abandons the run and loses the steps since its last checkpoint.

A local Ray cluster's own processes share the driver's process group (Ray starts them so) but
block SIGINT, so a terminal's Ctrl-C reaches the driver alone; tests/integration/test_stop_ray.py
checks both with the signal sent to the whole group.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raymb.storage import Location

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""Ctrl-C, and what Kubernetes and `ray job stop` send: the first of either stops with a
checkpoint, a later one abandons."""

REPEAT_S = 1.0
"""A stop signal this soon after the first is the same request delivered twice."""


class StopSignals:
    """While the block runs (on the main thread; elsewhere it does nothing): the first stop
    signal calls `on_first()`, one within REPEAT_S of it is ignored, a later one raises
    KeyboardInterrupt. The handlers before the block are restored after it."""

    def __init__(self, on_first: Callable[[], None]) -> None:
        self.on_first = on_first
        self.first: float | None = None
        self._previous: dict[int, Any] = {}

    @property
    def asked(self) -> bool:
        return self.first is not None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
            self.on_first()
        elif now - self.first >= REPEAT_S:
            raise KeyboardInterrupt


def ask_stop(stop_file: Location, stops: str, say: Callable[[str], None] | None = None) -> None:
    """Write `stop_file`, asking the workers to checkpoint and return (`stops` says when, for
    the line that tells the user; `say` prints it, by default on stderr)."""
    stop_file.write_bytes(b"")
    line = f"raymb: stopping {stops}, then checkpointing (Ctrl-C again to abandon it)"
    if say is not None:
        say(line)  # above the progress bar, not into it
    else:
        print(line, file=sys.stderr, flush=True)


def in_thread(fn: Callable[[], Any]) -> Any:
    """fn() on a thread of its own, its result or exception returned or raised here; the
    calling (main) thread waits in short joins, so the signal handlers run meanwhile. Ray
    Train's fit() runs so: on the main thread it installs its own SIGINT handler, which aborts
    the workers at once."""
    if threading.current_thread() is not threading.main_thread():
        return fn()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = fn()
        except BaseException as e:  # re-raised on the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=run, name="raymb-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


class Interrupts:
    """While the block runs (on the main thread): a SIGINT or SIGTERM raises KeyboardInterrupt
    at once, and is remembered, so that the block's end raises it again if code inside caught
    it (Ray's start-up has waits that catch every exception): a Ctrl-C while Ray starts is
    never lost. The handlers before the block are restored after it."""

    def __init__(self) -> None:
        self.received = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, kind, error, trace) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        if self.received and kind is None:
            raise KeyboardInterrupt

    def _handle(self, signum, frame) -> None:
        self.received = True
        raise KeyboardInterrupt
