"""Loading a config for a run or a sweep: its TOML and --set overrides (raymb.config.load),
then the [data] keys a prepared folder's manifest gives. This sits above config and data: the
config itself reads nothing but TOML, and the manifest is read here once a process (and kept:
`manifest` answers again from what it read while the file is unchanged), so `raymb train`'s
checks after the load (raymb.driver.preflight) take it from here instead of reading it again.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any

from raymb.config import Config
from raymb.config.build import build
from raymb.config.load import read_tables
from raymb.config.tune import Sweep, TuneSection, check_sweep
from raymb.data.manifest import data_defaults, find_manifest
from raymb.errors import ConfigError, DataError
from raymb.files import real

_manifests: dict[tuple, tuple[Path, dict[str, Any]] | None] = {}


def manifest(path: str) -> tuple[Path, dict[str, Any]] | None:
    """The prepared folder and manifest that `path` (data.train) belongs to, or None
    (raymb.data.manifest.find_manifest), read once: again for the same path, unchanged on
    disk, it is the same answer without a read."""
    key = (str(path), _stamp(path))
    if key not in _manifests:
        _manifests[key] = find_manifest(path)
    return _manifests[key]


def _stamp(path: str) -> tuple:
    """What tells a changed folder or manifest from the one read (a URI: its text only)."""
    if "://" in str(path):
        return ()
    stamps = []
    for candidate in (Path(path), Path(path).parent):
        try:
            st = os.stat(candidate / "raymb-data.json")
        except (OSError, ValueError):  # a NUL in the path: find_manifest says so
            continue
        stamps.append((str(candidate), st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(stamps)


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


def with_manifest(raw: dict[str, Any]) -> dict[str, Any]:
    """The config's tables with the [data] keys a prepared folder's manifest gives (data.train
    names the folder or its train split) under the ones the config sets."""
    table = raw.get("data")
    if not isinstance(table, dict) or not isinstance(table.get("train"), str):
        return raw
    try:
        found = manifest(table["train"])
    except DataError as e:
        raise ConfigError(f"data.train: {e}") from None
    if found is None:
        return raw
    folder, read = found
    defaults = data_defaults(read)
    val = folder / "val"
    # realpath, not Path.resolve: a link loop on the way is not a RuntimeError here
    if real(table["train"]) == real(folder / "train") and val.is_dir():
        defaults["val"] = str(val)  # the folder's own validation split
    if "features" in table or "inputs" in table:
        defaults.pop("inputs", None)  # the config says how the model reads the rows
    return {**raw, "data": {**defaults, **table}}


def load_sweep(path: str | None, overrides: typing.Sequence[str] = ()) -> Sweep:
    """Read a sweep's config file and --set overrides (`tune.KEY=VALUE` sets [tune]); check
    [tune], the space and every trial's config. A one-line ConfigError names what to fix."""
    raw = read_tables(path, overrides)
    tune_table = raw.pop("tune", None)
    if tune_table is None:
        raise ConfigError("raymb tune needs a [tune] section with [tune.space] (docs/tune.md)")
    tune = build(TuneSection, tune_table, "tune")
    raw = with_manifest(raw)
    config = Config.from_dict(raw)
    return check_sweep(raw, config, tune)
