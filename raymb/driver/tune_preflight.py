"""`raymb.tune()`: a sweep's checks before Ray (its folder, the record of a resumed sweep, the
data of every distinct trial), then the sweep on Ray Tune (raymb.driver.tune). This module
imports neither Ray nor torch: every refusal comes before them, as raymb.driver.preflight's
do for `raymb train`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from raymb.config.sections import BUILT_IN_METRICS
from raymb.config.tune import Sweep
from raymb.errors import ConfigError, DataError
from raymb.load import load_sweep


def tune(
    sweep: Sweep | str | Path,
    *,
    address: str | None = None,
    verbose: bool = False,
    model: Any = None,
    loss: Any = None,
    metrics: Any = None,
) -> Any:
    """Run (or resume) a sweep: a Sweep or a config file's path. Checks everything before
    Ray starts; returns raymb.rundir.sweep.TuneResult. `model`, `loss`, `metrics`: your own,
    from Python, as raymb.train takes them (every trial trains with them)."""
    if not isinstance(sweep, Sweep):
        sweep = load_sweep(sweep)
    from raymb import storage

    storage.configure(sweep.config.storage.endpoint_url, sweep.config.storage.region)  # s3 data
    sweep_dir = check_sweep_dir(sweep)
    from raymb.rundir.sweep import check_record

    check_record(sweep, sweep_dir)  # a resumed sweep: the one that started
    given = {"model": model, "loss": loss, "metrics": metrics}
    check_data(sweep, sweep_dir, given)
    from raymb.driver.custom import pickled

    code = {k: pickled(k, v) for k, v in given.items() if v is not None}
    from raymb.driver.tune import run_sweep

    return run_sweep(sweep, sweep_dir, address=address, verbose=verbose, code=code)


def check_data(sweep: Sweep, sweep_dir: Path, given: dict[str, Any] | None = None) -> None:
    """`raymb train`'s data checks for every distinct point of a grid (the base config for a
    random space), and the sweep's own: its metric against the labels (a metric of your own
    against what the metrics return, on the first point's dry run, with `given`: the model,
    loss and metrics from Python), cv_folds against the rows. Nothing is started or written."""
    from raymb.driver.preflight import prepare

    checked = set()
    for values in sweep.grid() if sweep.tune.search == "grid" else [{}]:
        raw = sweep.trial_raw(values, storage=str(sweep_dir), name="trial")
        config = sweep.config if not values else _config(raw)
        if sweep.tune.cv_folds:
            config = _config(sweep.fold_raw(raw, 0, storage=str(sweep_dir)))
        # The data checks read no optim.* key: trials that differ only there are one check
        # (a grid of learning rates reads the data's footers once, not once a point).
        key = repr(dataclasses.replace(config, optim=sweep.config.optim))
        if key in checked:
            continue
        checked.add(key)
        try:
            plan, train_info, _ = prepare(config)  # the data against the trial's batch sizes
        except (ConfigError, DataError) as e:
            if sweep.tune.cv_folds and str(e).startswith("data.folds="):  # the sweep's key
                raise ConfigError(str(e).replace("data.folds", "tune.cv_folds")) from None
            if not values:
                raise
            shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
            kind = DataError if isinstance(e, DataError) else ConfigError
            raise kind(f"tune.space: the trial {shown}: {e}") from None
        regression = config.data.task != "lm" and train_info.label_kind != "int"
        if sweep.metric == "val_accuracy" and regression:  # as raymb train's checkpoint.metric
            raise ConfigError(
                f"tune.metric='val_accuracy' needs integer (class) labels; data.train's "
                f"{config.data.label!r} is floating: use val_loss"
            )
        if sweep.metric not in BUILT_IN_METRICS and len(checked) == 1:
            from raymb.driver.custom import check_metric, custom_code

            code = custom_code(config, plan, train_info, **(given or {}))
            check_metric(sweep.metric, code.metric_names, "tune.metric")
        rows = train_info.num_rows
        if sweep.tune.cv_folds > rows:
            raise ConfigError(
                f"tune.cv_folds={sweep.tune.cv_folds} is more than data.train's {rows} rows: "
                "each fold validates on at least one row"
            )


def _config(raw: dict[str, Any]):
    from raymb.config import Config

    return Config.from_dict(raw)


def check_sweep_dir(sweep: Sweep) -> Path:
    """<run.storage_path>/<run.name>, local; an existing one must be a sweep's."""
    from raymb.driver.preflight import run_location
    from raymb.rundir.sweep import is_sweep_dir

    location = run_location(sweep.config)  # an object store is refused by the config check
    if not location.local:
        raise ConfigError(
            f"run.storage_path={sweep.config.run.storage_path!r}: raymb tune keeps its sweeps "
            "on a local (or mounted) path"
        )
    path = Path(location.path)
    if path.is_dir() and any(path.iterdir()) and not is_sweep_dir(path):
        raise ConfigError(
            f"{path} exists and is not a sweep (no tuner.pkl or sweep.json): choose another "
            "run.name"
        )
    return path
