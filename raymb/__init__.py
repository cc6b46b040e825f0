"""raymb: data-parallel PyTorch training on Ray, exact at any number of workers and microbatches."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raymb.config import Config
from raymb.errors import CheckpointError, ConfigError, DataError, RaymbError
from raymb.load import load_config
from raymb.version import version

if TYPE_CHECKING:
    from pathlib import Path

    from raymb.config.tune import Sweep
    from raymb.driver.run import Result
    from raymb.rundir.sweep import TuneResult

__all__ = [
    "Config",
    "load_config",
    "train",
    "tune",
    "RaymbError",
    "ConfigError",
    "DataError",
    "CheckpointError",
]


__version__ = version()


def train(config: Config, *, address: str | None = None, verbose: bool = False) -> Result:
    """Train as configured on a local Ray cluster (or the one at `address`); see raymb.driver.
    Ray's own lines go to <run dir>/logs/ray.log; `verbose` prints them as Ray does."""
    from raymb.driver.run import train as _train  # Ray is imported only when training

    return _train(config, address=address, verbose=verbose)


def tune(
    config: Sweep | str | Path, *, address: str | None = None, verbose: bool = False
) -> TuneResult:
    """Run (or resume) a sweep on Ray Tune: a sweep config file's path (an ordinary config
    with [tune] and [tune.space]), or raymb.config.tune.load_sweep's Sweep. Returns the
    trials, the best trial's values, metric and config (docs/tune.md)."""
    from raymb.driver.tune_preflight import tune as _tune

    return _tune(config, address=address, verbose=verbose)
