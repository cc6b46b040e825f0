"""The `raymb` command line: train, gen-data, eval, predict, plot."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from raymb.config import DataSection, load_config, to_toml
from raymb.errors import RaymbError
from raymb.progress import format_summary

DEFAULT_DATA = Path(DataSection().train).parent  # data/linear, made on first use
IDLE_TIMEOUT = 60.0  # seconds, raymb train --follow


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raymb",
        description="Data-parallel PyTorch training on Ray: W workers x k microbatches give "
        "the same parameters as one process on the whole batch.",
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a model (with no --config: the default linear job)",
        description="Train on a local Ray cluster that raymb starts (or the one at "
        "--address). Running again with the same run.name resumes the run. With no "
        "--config, trains the default job: y = 2x + 1 on generated data.",
    )
    add_config_arguments(t)
    t.add_argument(
        "--address",
        metavar="ADDR",
        help="join this Ray cluster (e.g. auto, or "
        "ray://host:10001) instead of starting a local one",
    )
    t.add_argument(
        "--follow",
        metavar="DIR",
        help="online training: train on each new parquet file as it lands in DIR, one pass, "
        "checkpointing after each file (data.train is not read); a restart never trains a "
        "file twice",
    )
    t.add_argument(
        "--idle-timeout",
        type=float,
        metavar="SECONDS",
        help=f"with --follow: stop after this long without a new file (default {IDLE_TIMEOUT:g})",
    )
    t.set_defaults(func=_train)

    g = sub.add_parser(
        "gen-data",
        help="write a seeded synthetic parquet dataset",
        description="Write OUT/train/*.parquet, OUT/val/*.parquet and "
        "OUT/truth.json (the generating parameters).",
    )
    g.add_argument(
        "kind",
        choices=("linear", "regression", "classification"),
        help="linear: y = 2x + 1 + noise; regression: y = x.w + b + noise with a known w; "
        "classification: labels of a seeded linear teacher",
    )
    g.add_argument("--out", required=True, metavar="DIR", help="output directory")
    g.add_argument(
        "--rows", type=int, default=4096, help="total rows, train and val (default 4096)"
    )
    g.add_argument("--shards", type=int, default=4, help="train parquet files (default 4)")
    g.add_argument("--features", type=int, help="feature count (default: 1, 8 or 16 by kind)")
    g.add_argument("--classes", type=int, default=3, help="classes, for classification (default 3)")
    g.add_argument(
        "--noise", type=float, default=0.1, help="noise standard deviation (default 0.1)"
    )
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="fraction of rows held out for validation (default 0.2; 0 for none)",
    )
    g.set_defaults(func=_gen_data)

    e = sub.add_parser(
        "eval",
        help="loss (and accuracy) of a saved model on a parquet set",
        description="Print, as one JSON line, the mean loss over every row of --data (and the "
        "accuracy, for a classifier) of the model saved in --checkpoint. Runs in this "
        "process, without Ray.",
    )
    _add_model_arguments(e)
    e.set_defaults(func=_eval)

    p = sub.add_parser(
        "predict",
        help="write a saved model's predictions on a parquet set to a parquet file",
        description="Write one parquet file with the columns of --data other than the "
        "features (ids, the label if any) and `prediction`: the class id, plus "
        "`probabilities`, for a classifier; the predicted value for a regressor. --data "
        "needs no label column. Runs in this process, without Ray.",
    )
    _add_model_arguments(p)
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="output parquet file (written under a temporary name, then renamed)",
    )
    p.set_defaults(func=_predict)

    pl = sub.add_parser(
        "plot",
        help="overlay the loss and throughput of runs in one figure (needs matplotlib)",
        description="Draw train and val loss against step and, below, samples/s, of each "
        "run from its metrics.csv, labelled by run directory name, e.g. a run with "
        "train.sync=grad against one with train.sync=param. Needs matplotlib: pip install "
        "'raymb[plot]'. (Each run also writes its own loss.png.)",
    )
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories to overlay")
    pl.add_argument(
        "--out", default="runs.png", metavar="FILE", help="output PNG file (default runs.png)"
    )
    pl.set_defaults(func=_plot)
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="a checkpoint directory or its model.pt (summary.json's checkpoint)",
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="PATH",
        help="parquet file, directory or glob, with the feature columns the model was trained on",
    )


def add_config_arguments(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
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
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config, every default included, and exit (Ray is not started)",
    )


def _train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.idle_timeout is not None and args.follow is None:
        raise RaymbError("--idle-timeout needs --follow DIR")
    idle_timeout = IDLE_TIMEOUT if args.idle_timeout is None else args.idle_timeout
    if not idle_timeout > 0:
        raise RaymbError(f"--idle-timeout {args.idle_timeout:g}: expected a positive number")
    if args.print_config:
        print(to_toml(config), end="")
        return 0
    if args.follow is not None:
        if "://" not in args.follow and not Path(args.follow).is_dir():
            raise RaymbError(f"--follow {args.follow}: no such directory")
        try:
            from raymb.online import follow
        except ModuleNotFoundError as e:
            if e.name != "raymb.online":
                raise
            raise RaymbError("--follow: this raymb has no online training (raymb.online)") from None
        result = follow(config, args.follow, idle_timeout=idle_timeout, address=args.address)
    else:
        if args.config is None and config.data.train == DataSection().train:
            _ensure_default_data()
        from raymb.driver import train

        result = train(config, address=args.address)
    print("raymb: done")
    print(format_summary(result.summary, result.run_dir))
    if config.model.name == "linear" and result.summary["checkpoint"]:
        _print_linear(result.summary["checkpoint"])
    return 0


def _ensure_default_data() -> None:
    if (DEFAULT_DATA / "train").exists():
        return
    from raymb.synth import generate

    print(f"raymb: generating the default dataset (y = 2x + 1 + noise) in {DEFAULT_DATA}/")
    generate("linear", DEFAULT_DATA)


def _print_linear(checkpoint: str) -> None:
    from raymb.checkpoint import load_model

    model, _ = load_model(checkpoint)
    w = ", ".join(f"{v:.4f}" for v in model.weight.detach().flatten().tolist())
    b = ", ".join(f"{v:.4f}" for v in model.bias.detach().flatten().tolist())
    print(f"raymb: learned w = [{w}], b = [{b}]")


def _gen_data(args: argparse.Namespace) -> int:
    from raymb.synth import generate

    truth = generate(
        args.kind,
        args.out,
        rows=args.rows,
        shards=args.shards,
        features=args.features,
        classes=args.classes,
        noise=args.noise,
        seed=args.seed,
        val_fraction=args.val_fraction,
    )
    print(f"raymb: wrote {args.kind} data to {args.out}/ ({args.rows} rows)")
    print(json.dumps(truth))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from raymb.evaluate import evaluate

    metrics = evaluate(args.checkpoint, args.data)
    print(json.dumps(metrics))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from raymb.predict import predict

    written = predict(args.checkpoint, args.data, args.out)
    print(f"raymb: wrote {written['rows']} predictions to {written['out']}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from raymb.plot import plot_runs

    out = plot_runs(args.run_dirs, args.out)
    print(f"raymb: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
