"""raymb's version, as installed: pyproject.toml is the one place it is written."""

from __future__ import annotations


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("raymb")
    except PackageNotFoundError:  # a source tree on the path, not installed
        return "0+unknown"
