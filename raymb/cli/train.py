"""`raymb train` (and --follow, --print-config), `raymb config-schema`, and the config
arguments that raymb train, raymb runs and jobs/train.py share."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from raymb.config import DataSection, to_toml
from raymb.driver.report.summary import format_summary
from raymb.errors import RaymbError
from raymb.load import load_config

DEFAULT_DATA = Path(DataSection().train).parent  # data/linear, made on first use
IDLE_TIMEOUT = 60.0  # seconds, raymb train --follow


def add_config_arguments(
    parser: argparse.ArgumentParser, *, required: bool = False, print_config: bool = True
) -> None:
    """--config, --set and --print-config: how raymb train and jobs/train.py take a config."""
    parser.add_argument(
        "--config",
        required=required,
        metavar="FILE",
        help="TOML config file; unset keys take defaults (see --print-config)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config key, e.g. --set train.epochs=5 (repeatable; the value "
        "is read as TOML, or as a string if it is not valid TOML)",
    )
    if not print_config:
        return
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config, every default included, and exit (Ray is not started)",
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train on a local Ray cluster that raymb starts (or the one at "
        "--address). Running again with the same run.name resumes the run. With no "
        "--config, trains the default job: y = 2x + 1 on generated data."
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="join this Ray cluster (e.g. auto, or "
        "ray://host:10001) instead of starting a local one",
    )
    add_local_argument(parser)
    parser.add_argument(
        "--follow",
        metavar="DIR",
        help="online training: train on each new parquet file as it lands in DIR, one pass, "
        "checkpointing after each file (data.train is not read); a restart never trains a "
        "file twice",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        metavar="SECONDS",
        help=f"with --follow: stop after this long without a new file (default {IDLE_TIMEOUT:g})",
    )
    add_verbose_argument(parser)


def add_local_argument(parser: argparse.ArgumentParser) -> None:
    """--local: scale.launcher = "local", for raymb train and raymb lr-find."""
    parser.add_argument(
        "--local",
        action="store_true",
        help="no Ray: scale.workers processes on this machine (a gloo group; NCCL on GPUs), "
        "the data read into memory; the same numbers and run directory, resumable on Ray "
        'and back (sets scale.launcher = "local"). For trying a config, small jobs and '
        "tests; a worker that fails ends the run (failure restarts need Ray)",
    )


def local_overrides(args: argparse.Namespace) -> list[str]:
    """--set's overrides, with --local's last (it wins over a --set of the same key)."""
    return [*args.overrides, *(["scale.launcher=local"] if getattr(args, "local", False) else [])]


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    """-v/--verbose, for every command that starts Ray."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show Ray's own messages here, as Ray prints them (by default they go to "
        "<run dir>/logs/ray.log)",
    )


def run_train(args: argparse.Namespace) -> int:
    config = load_config(args.config, local_overrides(args))
    if args.idle_timeout is not None and args.follow is None:
        raise RaymbError("--idle-timeout needs --follow DIR")
    idle_timeout = IDLE_TIMEOUT if args.idle_timeout is None else args.idle_timeout
    if not idle_timeout > 0:
        raise RaymbError(f"--idle-timeout {args.idle_timeout:g}: expected a positive number")
    if args.print_config:
        print(to_toml(config), end="")
        return 0
    if args.follow is not None:
        if config.scale.launcher == "local":
            raise RaymbError('--follow trains on Ray: leave out --local (scale.launcher = "local")')
        if "://" not in args.follow and not Path(args.follow).is_dir():
            raise RaymbError(f"--follow {args.follow}: no such directory")
        from raymb.driver.run import follow

        result = follow(
            config,
            args.follow,
            idle_timeout=idle_timeout,
            address=args.address,
            verbose=args.verbose,
        )
    else:
        if args.config is None and config.data.train == DataSection().train:
            from raymb.driver.preflight import check_run_dir

            check_run_dir(config)  # a run.storage_path that is a file: before data/ is written
            _ensure_default_data()
        from raymb.driver.run import train

        result = train(config, address=args.address, verbose=args.verbose)
    if result.status != "stopped":  # a stopped run has said where it stopped
        print("raymb: done")
    print(format_summary(result.summary, result.run_dir))
    if config.model.name == "linear" and result.summary["checkpoint"]:
        _print_linear(result.summary["checkpoint"])
    return 0


def _ensure_default_data() -> None:
    if (DEFAULT_DATA / "train").exists():
        return
    from raymb.data.synthetic import generate

    print(f"raymb: generating the default dataset (y = 2x + 1 + noise) in {DEFAULT_DATA}/")
    generate("linear", DEFAULT_DATA)


def _print_linear(checkpoint: str) -> None:
    from raymb.tools.load import load_model

    model, _ = load_model(checkpoint)
    w = ", ".join(f"{v:.4f}" for v in model.weight.detach().flatten().tolist())
    b = ", ".join(f"{v:.4f}" for v in model.bias.detach().flatten().tolist())
    print(f"raymb: learned w = [{w}], b = [{b}]")


def add_config_schema_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Print the JSON Schema of raymb's TOML config: every section and key, "
        "its type, bounds, default and description; unknown keys are errors. Save it "
        "(raymb config-schema > raymb.schema.json) and start a config file with the line "
        "'#:schema ./raymb.schema.json' (the path relative to the config): an editor with a "
        "TOML language server (Taplo, Even Better TOML) then checks the file as you type."
    )


def run_config_schema(args: argparse.Namespace) -> int:
    from raymb.config import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0
