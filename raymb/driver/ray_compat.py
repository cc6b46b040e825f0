"""Every private Ray name raymb uses, each with why Ray's public API does not do, and what to
check on a Ray upgrade. Everything else in raymb calls the small functions here
(tests/unit/driver/test_ray_compat.py keeps the private names in this file).

raymb is checked against one Ray release, PINNED (pyproject.toml's pin); imported with another
one installed, this module says in one line which of WORKAROUNDS may no longer fit.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import ray

PINNED = "2.60.0"
"""The Ray release these workarounds were checked against (pyproject.toml's pin)."""

WORKAROUNDS = {
    "quiet mode's line routing": "forward_lines",
    "a local cluster's trainer without the placement-group cleaner": "without_cleaner",
    "telling a cluster started here": "local_head, session_dir",
    "a sweep's clean-up of stopped trials": "placement_group_recorder, end_orphaned_cleaners",
}
"""Each workaround, and the functions here that hold it."""

if ray.__version__ != PINNED:
    print(
        f"raymb: Ray {ray.__version__} is installed, raymb was checked against {PINNED}: "
        f"these workarounds may no longer fit: {'; '.join(WORKAROUNDS)} "
        "(raymb/driver/ray_compat.py)",
        file=sys.stderr,
        flush=True,
    )


def forward_lines(send: Callable[[dict], bool]) -> None:
    """From now on hand each batch of lines Ray forwards from its processes (a dict: lines,
    pid, ip, is_err, actor_name or task_name) to `send`; Ray prints those it declines (False).

    Ray has no public hook for them. Private: ray._private.worker.print_to_stdstream, the
    printer that ray.init binds into global_worker_stdstream_dispatcher (handler
    "ray_print_logs", a functools.partial), and filter_autoscaler_events. Upgrade: check these
    three names and how ray.init binds the printer."""
    import ray._private.worker as core

    if not isinstance(core.print_to_stdstream, _Forward):
        core.print_to_stdstream = _Forward(core.print_to_stdstream, send)  # ray.init binds this
    # A session started earlier (log_to_driver=True) has bound Ray's printer already.
    dispatcher = core.global_worker_stdstream_dispatcher
    for name, handler in list(dispatcher.handlers):
        if name == "ray_print_logs" and not isinstance(getattr(handler, "func", None), _Forward):
            dispatcher.remove_handler(name)
            keywords = getattr(handler, "keywords", {})
            dispatcher.add_handler(name, functools.partial(core.print_to_stdstream, **keywords))


class _Forward:
    """Ray's printer of forwarded lines, offering each batch to `send` first."""

    def __init__(self, ray_print, send: Callable[[dict], bool]) -> None:
        self.ray_print, self.send = ray_print, send

    def __call__(self, data: dict, ignore_prefix: bool = False) -> None:
        ours = data
        if data.get("pid") == "autoscaler":  # its whole log comes: Ray shows only its events
            import ray._private.worker as core

            ours = {**data, "lines": list(core.filter_autoscaler_events(data.get("lines", [])))}
        if not self.send(ours):
            self.ray_print(data, ignore_prefix)


def local_head() -> bool:
    """This process runs the head node of the cluster it is connected to: it started the
    cluster (`ray.init()` with no address), which ends with it. A Ray worker never does.

    Ray's public API says so only in ray.init's return value, at the call. Private:
    ray._private.worker._global_node and its `head`. Upgrade: check both."""
    import ray._private.worker as core

    node = core._global_node
    return ray.is_initialized() and node is not None and bool(node.head)


def session_dir() -> str:
    """The Ray session's directory on this node (its logs), joined or started here.

    No public API names it. Private: ray._private.worker._global_node's
    get_session_dir_path(). Upgrade: check both."""
    import ray._private.worker as core

    return core._global_node.get_session_dir_path()


@functools.cache
def without_cleaner(trainer: type) -> type:
    """`trainer` (a TorchTrainer class) without Ray Train's placement-group cleaner: an actor
    process that asks the dashboard's State API whether the controller lives. A local cluster
    has no dashboard (every poll fails, ~2.5 s of CPU at start-up on 2 cores,
    bench/startup.py), and its placement groups end with it.

    Ray Train has no setting for it. Private: TrainController's default callbacks
    (DataParallelTrainer._create_default_callbacks) and PlacementGroupCleanerCallback.
    Upgrade: check both; tests/integration/test_startup_ray.py sees the actors started."""
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback,
    )

    class WithoutCleaner(trainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]

    return WithoutCleaner


def placement_group_recorder(path: Path):
    """A Ray Train callback that appends the id (hex) of each placement group its run's
    worker groups start in to `path`, for the sweep's driver to remove once the trial ended.

    Ray Train's public callbacks (UserCallback) never see the worker group. Private:
    WorkerGroupCallback.after_worker_group_start, and the worker group's
    get_worker_group_state().placement_group_handle.placement_group. Upgrade: check them;
    tests/integration/test_tune_ray.py -k asha sees what a stopped trial leaves."""
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class PlacementGroupRecorder(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group) -> None:
            handle = worker_group.get_worker_group_state().placement_group_handle
            with open(path, "a") as f:
                f.write(handle.placement_group.id.hex() + "\n")

    return PlacementGroupRecorder()


def end_orphaned_cleaners(wait_s: float = 0.0) -> None:
    """End the PlacementGroupCleaner actors of dead Train controllers: detached, they would
    poll the missing State API for as long as the cluster lives, a process each. A controller
    starts its cleaner after itself, so a cleaner older than every controller not yet dead is
    an orphan. On any error, nothing: a clean-up is never the sweep's failure.

    The public State API (ray.util.state) needs the dashboard, and the cleaner has no name
    for ray.get_actor. Private: ray._private.state.actors() (the GCS's actor table) and
    global_worker.core_worker.kill_actor. Upgrade: check both, and the table's fields."""
    try:
        from ray._private import state
        from ray._private.worker import global_worker

        actors = list(state.actors().values())
        living = [
            a["StartTime"]
            for a in actors
            # One not started yet (StartTime 0) has no cleaner yet, and may never start.
            if a["ActorClassName"] == "TrainController" and a["State"] != "DEAD" and a["StartTime"]
        ]
        oldest = min(living, default=math.inf)
        ended = []
        for a in actors:
            cleaner = a["ActorClassName"] == "PlacementGroupCleaner" and a["State"] == "ALIVE"
            if cleaner and a["StartTime"] < oldest:
                global_worker.core_worker.kill_actor(ray.ActorID.from_hex(a["ActorID"]), True)
                ended.append(a["ActorID"])
        deadline = time.monotonic() + wait_s  # a kill is asynchronous
        while ended and time.monotonic() < deadline:
            time.sleep(0.2)
            ended = [i for i in ended if state.actors(actor_id=i).get("State") != "DEAD"]
    except Exception:  # noqa: BLE001 - a clean-up of Ray's internals
        pass
