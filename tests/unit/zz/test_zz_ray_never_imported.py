"""The unit tier runs without Ray: after the tier's last test, `ray` is not even imported.

Its folder (zz/) sorts last in tests/unit, so pytest imports this module after every other unit
module and runs its test after theirs. Imported before any other tier's module (testpaths
lists the tiers in order), it notes what the unit modules' own imports pulled in; its test
then checks what the unit tests imported as they ran. That second check needs the unit tier
alone (`pytest tests/unit`, as CI runs it first): another tier's modules, collected in the
same session, may import Ray themselves.
"""

from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1]


def _in_unit(path: str | Path | None) -> bool:
    return path is not None and UNIT in Path(path).resolve().parents


def _from_ray(value: object) -> bool:
    """Whether `value` is a module of Ray, or a class or function defined in one."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # some modules warn on a deprecated attribute
            if isinstance(value, types.ModuleType):
                origin = value.__name__
            elif isinstance(value, (type, types.FunctionType)):
                origin = value.__module__
            else:
                return False
    except Exception:  # an object that will not say
        return False
    return isinstance(origin, str) and (origin == "ray" or origin.startswith("ray."))


def _ray_importers() -> list[str]:
    """The modules, outside Ray, whose globals hold Ray (a module of it, or a name from one):
    who imported it."""
    found = []
    for name, module in list(sys.modules.items()):
        top = name.partition(".")[0]
        if top == "ray" or top in sys.stdlib_module_names:  # Ray's hooks live in sys, logging
            continue
        if not isinstance(module, types.ModuleType):
            continue
        if any(_from_ray(v) for v in list(vars(module).values())):
            found.append(name)
    return sorted(found)


def _other_tiers_imported() -> bool:
    tests = UNIT.parent
    return any(
        tests in Path(f).resolve().parents and not _in_unit(f)
        for f in (getattr(m, "__file__", None) for m in list(sys.modules.values()))
        if f and Path(f).name.startswith("test_")
    )


# What the unit modules' imports pulled in, when no other tier's module came before them.
IMPORTED_WITH_THE_UNIT_MODULES = (
    _ray_importers() if "ray" in sys.modules and not _other_tiers_imported() else []
)


def test_the_unit_tier_never_imported_ray(request) -> None:
    assert not IMPORTED_WITH_THE_UNIT_MODULES, (
        f"importing the unit tier's modules imports ray: {IMPORTED_WITH_THE_UNIT_MODULES}"
    )
    others = [i for i in request.session.items if not _in_unit(i.path)]
    if "ray" in sys.modules and others:
        pytest.skip(
            f"ray is imported, and {len(others)} tests of other tiers are in this session: "
            "`pytest tests/unit` checks the unit tier alone"
        )
    assert "ray" not in sys.modules, f"the unit tier imported ray: {_ray_importers()}"
