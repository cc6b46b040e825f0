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
    "lr_find",
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
    config: Sweep | str | Path,
    *,
    model: Any = None,
    loss: Any = None,
    metrics: Any = None,
    address: str | None = None,
    verbose: bool = False,
) -> TuneResult:
    """Run (or resume) a sweep on Ray Tune: a sweep config file's path (an ordinary config
    with [tune] and [tune.space]), or raymb.config.tune.load_sweep's Sweep. Returns the
    trials, the best trial's values, metric and config (docs/tune.md). `model`, `loss`,
    `metrics`: your own, as `train` takes them, for every trial."""
    from raymb.driver.tune_preflight import tune as _tune

    code = dict(model=model, loss=loss, metrics=metrics)
    return _tune(config, address=address, verbose=verbose, **code)


def lr_find(
    config: Config,
    *,
    low: float = 1e-7,
    high: float = 10.0,
    steps: int = 100,
    model: Any = None,
    loss: Any = None,
    metrics: Any = None,
    address: str | None = None,
    local: bool = False,
) -> Any:
    """The learning-rate range test (`raymb lr-find`): `steps` steps at rates growing from
    `low` to `high`, on Ray (or, `local`, on processes of this machine); returns the curve and
    the suggested rate (docs/lr-find.md). `model`, `loss`, `metrics`: as `train` takes them."""
    from raymb.core.lr_find import check_range
    from raymb.driver.local import backend_of
    from raymb.driver.lr_find import lr_find as _lr_find

    problem = check_range(low, high, steps)
    if problem is not None:
        raise ConfigError(
            problem.replace("--min", "low").replace("--max", "high").replace("--steps", "steps")
        )
    backend = backend_of(config) if local else None
    code = dict(model=model, loss=loss, metrics=metrics)
    return _lr_find(
        config, low=low, high=high, steps=steps, address=address, backend=backend, **code
    )
