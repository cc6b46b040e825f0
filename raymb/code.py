"""Code a config names: `package.module:name` (model.name, loss.name, metrics.name), imported
with an error naming the key when it fails. Anything but a dotted module path and an identifier
is refused before importing, and a builtin (os:kill, os:system) after: what a config names is
Python code that builds a model or computes a loss."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from raymb.errors import ConfigError


def load_callable(name: str, key: str, what: str = "function") -> Callable[..., Any]:
    """Import `name` (package.module:attr) for config key `key`; `what` names the kind."""
    module_name, _, attr = name.partition(":")
    if not (all(part.isidentifier() for part in module_name.split(".")) and attr.isidentifier()):
        raise ConfigError(
            f"{key} {name!r}: expected package.module:{what} (a dotted module path, a colon, "
            "a function or class name)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{key} {name!r}: cannot import {module_name!r} ({e})") from None
    found = getattr(module, attr, None)
    if not callable(found):
        raise ConfigError(f"{key} {name!r}: {module_name} has no callable {attr!r}")
    if inspect.isbuiltin(found):
        raise ConfigError(f"{key} {name!r}: {attr} is a builtin function, not {KINDS[what]}")
    return found


KINDS = {
    "factory": "a model factory (a Python function or class that returns a torch.nn.Module)",
    "function": "a loss or metrics function (a Python function)",
}
