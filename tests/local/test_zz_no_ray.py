"""The local tier runs without Ray, as the unit tier does (its test_zz_ray_never_imported.py):
its runs are raymb.driver.local.train_torch's, on plain gloo processes. Its name sorts last in
tests/local, so its test runs after the tier's others; it checks that, unless a test outside
the unit and local tiers ran before it in this session, `ray` is not even imported."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
RAYLESS = (TESTS / "unit", TESTS / "local")


def _rayless(path: Path) -> bool:
    return any(tier in Path(path).resolve().parents for tier in RAYLESS)


def test_the_local_tier_never_imported_ray(request) -> None:
    items = request.session.items
    before = items[: items.index(request.node)]
    others = [i for i in before if not _rayless(i.path)]
    if others:
        pytest.skip(f"{len(others)} tests of other tiers ran before this one in this session")
    assert "ray" not in sys.modules, "the local tier (or the unit tier before it) imported ray"
