"""Reading a config's TOML: the file, and the --set overrides over it. Nothing else is read
here; raymb.load adds the keys a prepared dataset folder's manifest gives. A saved config
(run.json, a checkpoint) is already merged and is built with Config.from_saved, reading nothing.
"""

from __future__ import annotations

import os
import stat
import sys
import typing
from pathlib import Path
from typing import Any

from raymb.errors import ConfigError
from raymb.files import CONFIG_LIMIT, InputError, kind_of, read_bounded

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_tables(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> dict[str, Any]:
    """A config file's tables (none when path is None) with the --set overrides applied."""
    raw: dict[str, Any] = read_toml(path) if path is not None else {}
    for item in overrides:
        keys, value = parse_override(item)
        table = raw
        for part in keys[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a table")
        table[keys[-1]] = value
    return raw


def parse_override(item: str) -> tuple[list[str], Any]:
    """'section.key=value' -> (['section', 'key'], value), the value read as TOML if it parses."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, text = item.split("=", 1)
    path = key.strip().split(".")
    if len(path) not in (2, 3) or not all(path):
        raise ConfigError(f"--set {item!r}: the key must be section.key, e.g. train.epochs")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word such as all or mlp
    return path, value


def read_toml(path: str | Path) -> dict[str, Any]:
    """A config file's tables; a file that is missing, not a regular file (a folder, a FIFO,
    a device such as /dev/zero: refused from its stat, never opened), larger than
    raymb.files.CONFIG_LIMIT, unreadable, not UTF-8 or not TOML is a one-line ConfigError
    naming it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, ValueError) as e:  # permission on a folder above, a NUL in the path, ...
        reason = getattr(e, "strerror", None) or str(e)
        raise ConfigError(f"config file {path} cannot be read: {reason}") from None
    if stat.S_ISDIR(mode):
        raise ConfigError(f"config file {path} is a directory, not a TOML file")
    if not stat.S_ISREG(mode):
        raise ConfigError(f"config file {path} is {kind_of(mode)}, not a TOML file")
    try:
        data = read_bounded(path, "config file", CONFIG_LIMIT)
    except InputError as e:
        # read_bounded raises from None; the OSError of the open, if that failed, is its context
        cause = e.__context__
        if isinstance(cause, OSError) and cause.strerror:
            raise ConfigError(f"config file {path} cannot be read: {cause.strerror}") from None
        raise ConfigError(str(e)) from None
    try:
        text = data.decode("utf-8")  # TOML is UTF-8, whatever the locale
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {e.start}: {e.object[e.start]:#04x}); "
            "save it as UTF-8"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
