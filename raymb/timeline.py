"""An opt-in timeline of a run's start-up, for bench/startup.py and bench/epochs.py.

With RAYMB_TIMELINE set to a local file, the driver and each worker append a JSON line per
phase they reach: `{"t": <time.time()>, "event": ..., "pid": ..., "rank": ...}`. Unset (the
default), `stamp` does nothing. The workers of a local cluster inherit the variable from the
driver; on a running cluster it must be set where the head was started.
"""

from __future__ import annotations

import json
import os
import time

ENV = "RAYMB_TIMELINE"


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def stamp(event: str, rank: int | None = None, t: float | None = None, **fields) -> None:
    """Append one event (at `t`, by default now) to the timeline, if one is asked for."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = {"t": time.time() if t is None else t, "event": event, "pid": os.getpid(), **fields}
    if rank is not None:
        line["rank"] = rank
    with open(path, "a") as f:  # one short write: lines from several processes stay whole
        f.write(json.dumps(line) + "\n")


def process_started() -> float | None:
    """When this process started (Linux: /proc), for the worker's first event."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")
