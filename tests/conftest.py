"""Fixtures the test modules share."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray session for a module that asks for it (4 logical CPUs: two workers and
    room for Ray Data's reads), shut down after its last test."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
