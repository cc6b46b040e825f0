"""`raymb tune`: a hyperparameter sweep on Ray Tune (raymb.driver.tune; docs/tune.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raymb.config.tune import sweep_toml
from raymb.load import load_sweep


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
    from raymb.driver.tune_preflight import tune

    result = tune(sweep, address=args.address, verbose=args.verbose)
    from raymb.rundir.sweep import FINISHED, INTERRUPTED, format_table

    if result.status == INTERRUPTED:
        done = sum(r["status"] == FINISHED for r in result.trials)
        print(
            f"raymb: tune: interrupted with {done} of {sweep.trial_count()} trials finished "
            f"(see {Path(result.path) / 'trials.csv'}; no best.toml yet); run the same command "
            "again to resume the sweep",
            file=sys.stderr,
            flush=True,
        )
        return 130
    print(format_table(sweep, result.trials))
    if result.best_trial is not None:
        print(
            f"raymb: best {result.metric} {result.best_metric:.6g}: {result.best_trial}; "
            f"train it again: raymb train --config {Path(result.path) / 'best.toml'}"
        )
    return 0
