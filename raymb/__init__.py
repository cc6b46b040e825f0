"""raymb: data-parallel PyTorch training on Ray, exact at any number of workers and microbatches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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


def train(
    config: Config,
    *,
    model: Any = None,
    loss: Any = None,
    metrics: Any = None,
    address: str | None = None,
    verbose: bool = False,
) -> Result:
    """Train as configured on a local Ray cluster (or the one at `address`; with
    scale.launcher = "local", on processes of this machine); see raymb.driver.
    Ray's own lines go to <run dir>/logs/ray.log; `verbose` prints them as Ray does.

    Your own code, in place of the config's model.name, loss.name and metrics.name (the same
    run is possible from a config, with package.module:name strings; docs/your-model.md):
    - `model`: a torch.nn.Module, or a factory called as factory(input_shape, out_features)
      (input_shape: {column: shape} with data.inputs);
    - `loss`: loss(outputs, targets) returning each row's loss, or (each row's summed loss,
      each row's count);
    - `metrics`: metrics(outputs, targets) returning {name: (sum, count)}.
    Callables and closures are carried to the workers as Ray carries a training function.
    """
    from raymb.driver.run import train as _train  # Ray is imported only when training

    code = dict(model=model, loss=loss, metrics=metrics)
    return _train(config, address=address, verbose=verbose, **code)


def tune(
    config: Sweep | str | Path, *, address: str | None = None, verbose: bool = False
) -> TuneResult:
    """Run (or resume) a sweep on Ray Tune: a sweep config file's path (an ordinary config
    with [tune] and [tune.space]), or raymb.config.tune.load_sweep's Sweep. Returns the
    trials, the best trial's values, metric and config (docs/tune.md)."""
    from raymb.driver.tune_preflight import tune as _tune

    return _tune(config, address=address, verbose=verbose)
