"""The `raymb` command line: train, gen-data, eval."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from raymb.config import DataSection, load_config, to_toml
from raymb.errors import RaymbError

DEFAULT_DATA = Path(DataSection().train).parent  # data/linear, made on first use


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

    e = sub.add_parser("eval", help="loss (and accuracy) of a saved model on a parquet set")
    e.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="a checkpoint directory or its model.pt (summary.json's checkpoint)",
    )
    e.add_argument("--data", required=True, metavar="PATH", help="parquet file, directory or glob")
    e.set_defaults(func=_eval)
    return parser


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
    if args.print_config:
        print(to_toml(config), end="")
        return 0
    if args.config is None and config.data.train == DataSection().train:
        _ensure_default_data()
    from raymb.driver import train

    result = train(config, address=args.address)
    s = result.summary
    print(
        f"raymb: {s['steps']} steps, {s['samples']} samples, train_loss {_fmt(s['train_loss'])}, "
        f"val_loss {_fmt(s['val_loss'])}"
        + (f", val_accuracy {s['val_accuracy']:.4f}" if s["val_accuracy"] is not None else "")
        + f", {s['wall_s']:.1f} s"
    )
    if config.model.name == "linear" and s["checkpoint"]:
        _print_linear(s["checkpoint"])
    print(f"raymb: summary   {result.run_dir / 'summary.json'}")
    print(f"raymb: metrics   {result.run_dir / 'metrics.csv'}")
    print(f"raymb: model     {s['checkpoint']}")
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


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


if __name__ == "__main__":
    sys.exit(main())
