"""`raymb lr-find`: the learning-rate range test, and its suggestion for optim.lr."""

from __future__ import annotations

import argparse

from raymb.cli.train import add_config_arguments, add_verbose_argument
from raymb.config import load_config
from raymb.errors import RaymbError

LOW, HIGH, STEPS = 1e-7, 10.0, 100


def add_lr_find_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "The learning-rate range test: train the config's initial state for --steps steps "
        "on its workers, data and sync while the rate grows exponentially from --min to "
        "--max, stopping once the smoothed loss passes 4x its lowest. Suggests the rate of "
        "steepest descent of the smoothed loss (against log10 lr), for the config's global "
        "batch. Writes <run.storage_path>/<run.name>-lr-find/ (lr_find.csv, lr_find.png) "
        "and leaves the run's own directory alone. The last line is "
        "'raymb: suggested optim.lr=<value>', ready for --set."
    )
    add_config_arguments(parser, print_config=False)
    parser.add_argument(
        "--min", dest="low", type=float, default=LOW, help=f"the first rate (default {LOW:g})"
    )
    parser.add_argument(
        "--max", dest="high", type=float, default=HIGH, help=f"the last rate (default {HIGH:g})"
    )
    parser.add_argument(
        "--steps", type=int, default=STEPS, help=f"steps, at least 10 (default {STEPS})"
    )
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="join this Ray cluster instead of starting a local one",
    )
    add_verbose_argument(parser)


def run_lr_find(args: argparse.Namespace) -> int:
    from raymb.core.lr_find import check_range

    problem = check_range(args.low, args.high, args.steps)
    if problem is not None:
        raise RaymbError(problem)
    config = load_config(args.config, args.overrides)
    from raymb.driver.lr_find import conclude, lr_find

    result = lr_find(
        config,
        low=args.low,
        high=args.high,
        steps=args.steps,
        address=args.address,
        verbose=args.verbose,
    )
    print(conclude(result, args.steps))
    return 0
