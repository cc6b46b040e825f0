"""The Ray session a local `raymb train` starts for itself: only what the run uses (no
dashboard, no preemption watcher).

This module starts no Ray session of its own (no `ray_session` fixture): raymb.train does,
as on a laptop, and the test looks at that real session before shutting it down.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raymb import load_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _session_commands(session_dir: str) -> list[str]:
    """The command lines of this machine's processes that name the session."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if session_dir in command:
            found.append(command)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_a_local_run_starts_ray_without_a_dashboard(linear_data, tmp_path) -> None:
    ray = pytest.importorskip("ray")
    import ray._private.worker as core

    import raymb
    from raymb.driver.cluster import LOCAL_OFF, PRINT_PATCH_ENV, started_here
    from raymb.worker.worker import POLL_ENV

    assert not ray.is_initialized()
    set_for_ray = (*LOCAL_OFF, PRINT_PATCH_ENV, POLL_ENV)
    environ = {name: os.environ.get(name) for name in set_for_ray}
    config = load_config(
        None,
        [
            f"data.train={linear_data / 'train'}",
            f"data.val={linear_data / 'val'}",
            f"run.storage_path={tmp_path}",
            "run.name=local",
            "scale.workers=2",
            "train.epochs=1",
            "train.global_batch_size=64",
        ],
    )
    try:
        result = raymb.train(config)
        # 1024 rows at G = 64: 16 steps in the one epoch.
        assert result.summary["steps"] == 16
        node = core._global_node
        assert node is not None and node.head  # the session this run started
        assert not node.address_info.get("webui_url")  # no dashboard address
        commands = _session_commands(node.get_session_dir_path())
        assert any("raylet" in c for c in commands), commands  # the session is up
        # Ray Train's preemption watcher (an actor process) has nothing to watch here.
        from ray._private import state

        started = {a["ActorClassName"] for a in state.actors().values()}
        assert "TrainController" in started and "PreemptionWatcher" not in started, started
        assert started_here()
        # ...which leaves the caller's environment as it was (a later joined cluster's runs
        # keep Ray Train's defaults, a later --verbose run Ray Train's print patch).
        assert {name: os.environ.get(name) for name in set_for_ray} == environ
        # Ray keeps a head process for its usage statistics; none serves the dashboard.
        for command in commands:
            if "dashboard/dashboard.py" in command:
                assert "--modules-to-load=UsageStatsHead" in command, command
                assert "--disable-frontend" in command, command
    finally:
        ray.shutdown()
    assert not started_here()  # the session it started has ended
