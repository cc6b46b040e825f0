"""Reading a config: the TOML file, the --set overrides over it, and the keys a prepared
dataset folder's manifest gives. The driver side reads them once, here; a saved config
(run.json, a checkpoint) is already merged and is built with Config.from_saved, reading nothing.
"""

from __future__ import annotations

import os
import stat
import sys
import typing
from pathlib import Path
from typing import Any

from raymb.config.config import Config
from raymb.data.manifest import data_defaults, find_manifest
from raymb.errors import ConfigError, DataError
from raymb.files import CONFIG_LIMIT, InputError, kind_of, read_bounded, real

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a TOML config (or the defaults when path is None), apply --set overrides, and
    fill in the [data] keys of a prepared folder's manifest that neither sets."""
    raw = read_tables(path, overrides)
    if "tune" in raw:  # a sweep's config: raymb.config.tune reads it
        raise ConfigError(
            "[tune] is a sweep's section: run it with raymb tune --config FILE (or remove "
            "[tune] to train one run)"
        )
    return Config.from_dict(with_manifest(raw))


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


def with_manifest(raw: dict[str, Any]) -> dict[str, Any]:
    """The config's tables with the [data] keys a prepared folder's manifest gives (data.train
    names the folder or its train split) under the ones the config sets."""
    table = raw.get("data")
    if not isinstance(table, dict) or not isinstance(table.get("train"), str):
        return raw
    try:
        found = find_manifest(table["train"])
    except DataError as e:
        raise ConfigError(f"data.train: {e}") from None
    if found is None:
        return raw
    folder, manifest = found
    defaults = data_defaults(manifest)
    val = folder / "val"
    # realpath, not Path.resolve: a link loop on the way is not a RuntimeError here
    if real(table["train"]) == real(folder / "train") and val.is_dir():
        defaults["val"] = str(val)  # the folder's own validation split
    return {**raw, "data": {**defaults, **table}}
