"""`raymb tune`: a hyperparameter sweep on Ray Tune (raymb.driver.tune; docs/tune.md)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from raymb.config.tune import Sweep, load_sweep, sweep_toml
from raymb.errors import ConfigError


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    from raymb.cli.train import add_config_arguments, add_verbose_argument

    parser.description = (
        "Search hyperparameters on Ray Tune: the config is an ordinary raymb config plus "
        "[tune] and [tune.space] (grid, random or Optuna search, ASHA early stopping, k-fold "
        "cross-validation; docs/tune.md). Each trial is an ordinary run in "
        "<run dir>/trials/<trial>/; the sweep writes trials.csv, best.toml (raymb train "
        "--config best.toml trains the best trial again), tune.json and tune.png. Running "
        "again with the same run.name resumes the sweep."
    )
    add_config_arguments(parser, required=True)
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="join this Ray cluster (e.g. auto) instead of starting a local one",
    )
    add_verbose_argument(parser)


def run_tune(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.config, args.overrides)
    if args.print_config:
        print(sweep_toml(sweep), end="")
        return 0
    result = tune(sweep, address=args.address, verbose=args.verbose)
    from raymb.rundir.sweep import format_table

    print(format_table(sweep, result.trials))
    if result.best_trial is not None:
        print(
            f"raymb: best {result.metric} {result.best_metric:.6g}: {result.best_trial}; "
            f"train it again: raymb train --config {Path(result.path) / 'best.toml'}"
        )
    return 0


def tune(sweep: Sweep | str | Path, *, address: str | None = None, verbose: bool = False) -> Any:
    """Run (or resume) a sweep: a Sweep or a config file's path. Checks everything before
    Ray starts; returns raymb.rundir.sweep.TuneResult."""
    if not isinstance(sweep, Sweep):
        sweep = load_sweep(sweep)
    sweep_dir = check_sweep_dir(sweep)
    from raymb.driver.preflight import prepare

    checked = set()
    for values in sweep.grid()[:64] if sweep.tune.search == "grid" else [{}]:
        raw = sweep.trial_raw(values, storage=str(sweep_dir), name="trial")
        config = sweep.config if not values else _config(raw)
        if sweep.tune.cv_folds:
            config = _config(sweep.fold_raw(raw, 0, storage=str(sweep_dir)))
        # The data checks read no optim.* key: trials that differ only there are one check
        # (a grid of learning rates reads the data's footers once, not once a point).
        key = repr(dataclasses.replace(config, optim=sweep.config.optim))
        if key not in checked:
            checked.add(key)
            prepare(config)  # the data against every trial's batch sizes, before Ray
    from raymb.driver.tune import run_sweep

    return run_sweep(sweep, sweep_dir, address=address, verbose=verbose)


def _config(raw: dict[str, Any]):
    from raymb.config import Config

    return Config.from_dict(raw)


def check_sweep_dir(sweep: Sweep) -> Path:
    """<run.storage_path>/<run.name>, local; an existing one must be a sweep's."""
    from raymb.driver.preflight import run_location

    location = run_location(sweep.config)
    if not location.local:
        raise ConfigError(
            f"run.storage_path={sweep.config.run.storage_path!r}: raymb tune keeps its sweeps "
            "on a local (or mounted) path"
        )
    path = Path(location.path)
    if path.is_dir() and any(path.iterdir()) and not (path / "tuner.pkl").exists():
        raise ConfigError(
            f"{path} exists and is not a sweep (no tuner.pkl): choose another run.name"
        )
    return path
