"""The `raymb` command line: the table of commands, the parser built from it, and the one
place where an error a user can cause becomes one line and an exit status.

Each command's arguments and the function that runs it live in its group's module:
raymb.cli.train (train, config-schema), raymb.cli.lr_find (lr-find), raymb.cli.tune (tune),
raymb.cli.data (gen-data, prepare) and raymb.cli.tools (eval, predict, sample, export, runs,
plot).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import NamedTuple, NoReturn

from raymb.cli import data, lr_find, tools, train, tune
from raymb.errors import RaymbError


class Command(NamedTuple):
    """One `raymb` command: its name, its line in `raymb --help`, the function that gives its
    parser a description and arguments, and the function that runs it (returns the exit
    status)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


TABLE = (
    Command(
        "train",
        "train a model (with no --config: the default linear job)",
        train.add_train_arguments,
        train.run_train,
    ),
    Command(
        "lr-find",
        "suggest optim.lr: a learning-rate range test on the config's workers and data",
        lr_find.add_lr_find_arguments,
        lr_find.run_lr_find,
    ),
    Command(
        "tune",
        "search hyperparameters on Ray Tune: grid, random, Optuna, ASHA, cross-validation",
        tune.add_tune_arguments,
        tune.run_tune,
    ),
    Command(
        "gen-data",
        "write a seeded synthetic parquet dataset",
        data.add_gen_data_arguments,
        data.run_gen_data,
    ),
    Command(
        "prepare",
        "turn a folder of images, or text files, into a training set",
        data.add_prepare_arguments,
        data.run_prepare,
    ),
    Command(
        "eval",
        "loss (and accuracy) of a saved model on a parquet set",
        tools.add_eval_arguments,
        tools.run_eval,
    ),
    Command(
        "predict",
        "write a saved model's predictions on a parquet set to a parquet file",
        tools.add_predict_arguments,
        tools.run_predict,
    ),
    Command(
        "sample",
        "continue a prompt with a saved language model (the gpt)",
        tools.add_sample_arguments,
        tools.run_sample,
    ),
    Command(
        "export",
        "write a saved model as safetensors, ONNX or TorchScript",
        tools.add_export_arguments,
        tools.run_export,
    ),
    Command(
        "runs",
        "list the runs under a storage path: status, steps, best metric, checkpoint",
        tools.add_runs_arguments,
        tools.run_runs,
    ),
    Command(
        "plot",
        "overlay the loss and throughput of runs in one figure (needs matplotlib)",
        tools.add_plot_arguments,
        tools.run_plot,
    ),
    Command(
        "config-schema",
        "print the JSON Schema of a config file, for editors that check TOML",
        train.add_config_schema_arguments,
        train.run_config_schema,
    ),
)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _current_folder_importable()
    try:
        return args.run(args)
    except RaymbError as e:
        print(f"raymb: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "raymb: interrupted; the run resumes from its last checkpoint when started again "
            "with the same run.name",
            file=sys.stderr,
        )
        return 130


def _current_folder_importable() -> None:
    """model.name, loss.name and metrics.name may name a module of the current folder
    ("my_parts:loss"), as `python -m` would import it: the folder joins sys.path (last: it
    never hides an installed package) and PYTHONPATH, which the processes raymb starts inherit
    (a local Ray cluster's workers, --local's). A cluster joined with --address imports what
    its own workers can: ray job submit --working-dir ships the folder (docs/cluster.md)."""
    folder = os.getcwd()
    if folder not in sys.path:
        sys.path.append(folder)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if folder not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [*paths, folder] if p)


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose refusals are one line like every other raymb refusal (its own
    are the usage, then the error), naming the command's --help."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())
        self.exit(2, f"raymb: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="raymb",
        description="Data-parallel PyTorch training on Ray: W workers x k microbatches give "
        "the same parameters as one process on the whole batch.",
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    for command in TABLE:
        command_parser = sub.add_parser(command.name, help=command.help)
        command.add_arguments(command_parser)
        command_parser.set_defaults(run=command.run)
    return parser
