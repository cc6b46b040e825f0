"""`raymb lr-find`: the learning-rate range test, and its suggestion for optim.lr."""

from __future__ import annotations

import argparse
import math
import sys

from raymb.cli.train import (
    add_config_arguments,
    add_local_argument,
    add_verbose_argument,
    local_overrides,
)
from raymb.core.lr_find import HIGH, LOW, MAX_STEPS, STEPS, check_range
from raymb.errors import RaymbError
from raymb.load import load_config

INTERRUPTED = 130


def add_lr_find_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "The learning-rate range test: train the config's initial state for --steps steps "
        "on its workers, data and sync while the rate grows exponentially from --min to "
        "--max, stopping once the smoothed loss passes 4x its lowest. Suggests the rate of "
        "steepest descent of the smoothed loss (against log10 lr), for the config's global "
        "batch. Writes <run.storage_path>/<run.name>-lr-find/ (lr_find.json, lr_find.csv, "
        "lr_find.png), clearing it only when an earlier lr-find wrote it, and leaves the "
        "run's own directory alone. Ctrl-C stops it at the next step (exit 130, no "
        "suggestion, the curve so far kept). The last line is "
        "'raymb: suggested optim.lr=<value>', ready for --set."
    )
    add_config_arguments(parser, print_config=False)
    # Read as text and checked in run_lr_find: a bad value is one line, as every refusal.
    parser.add_argument(
        "--min",
        dest="low",
        default=str(LOW),
        metavar="LR",
        help=f"the first rate (default {LOW:g})",
    )
    parser.add_argument(
        "--max",
        dest="high",
        default=str(HIGH),
        metavar="LR",
        help=f"the last rate (default {HIGH:g})",
    )
    parser.add_argument(
        "--steps",
        default=str(STEPS),
        metavar="N",
        help=f"steps, 10 to {MAX_STEPS:,} (default {STEPS})",
    )
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="join this Ray cluster instead of starting a local one",
    )
    add_local_argument(parser)
    add_verbose_argument(parser)


def run_lr_find(args: argparse.Namespace, *, backend: str | None = None) -> int:
    """`raymb lr-find`; `backend` ("gloo"): on local torch.distributed processes instead of
    Ray (raymb.driver.lr_find; the tests' way to drive the command without Ray), as --local
    (scale.launcher = "local") asks."""
    low, high = _rate("--min", args.low), _rate("--max", args.high)
    steps = _steps(args.steps)
    problem = check_range(low, high, steps)
    if problem is not None:
        raise RaymbError(problem)
    try:
        config = load_config(args.config, local_overrides(args))
        if config.scale.launcher == "local":
            if args.address is not None:
                raise RaymbError("--local runs without a Ray cluster: leave out --address")
            backend = backend or ("nccl" if config.scale.use_gpu else "gloo")
        from raymb.driver.lr_find import conclude, lr_find

        result = lr_find(
            config,
            low=low,
            high=high,
            steps=steps,
            address=args.address,
            verbose=args.verbose,
            backend=backend,
        )
    except KeyboardInterrupt as e:
        # Interrupted: the test's folder is marked; any other: stopped before it had one.
        line = getattr(e, "line", None) or "raymb: interrupted; lr-find stopped before it began"
        print(line, file=sys.stderr, flush=True)
        return INTERRUPTED
    print(conclude(result, steps))
    return 0


def _rate(flag: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise RaymbError(f"{flag} {text}: expected a number, such as 1e-5") from None
    if not (math.isfinite(value) and value > 0):
        raise RaymbError(f"{flag} {text}: expected a positive, finite rate")
    return value


def _steps(text: str) -> int:
    """--steps as a whole number; 1e3 is 1000. Its bounds are raymb.core.lr_find.check_range's."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value.is_integer():
        raise RaymbError(f"--steps {text}: expected a whole number of steps, 10 to {MAX_STEPS:,}")
    if value > MAX_STEPS:  # a float such as 1e400 is checked here, not turned into an int
        raise RaymbError(f"--steps {text}: at most {MAX_STEPS:,} (a few hundred is the usual)")
    return int(value)
