"""The `raymb` command line: train, gen-data, prepare, eval, predict, sample, export, runs,
plot."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from raymb.config import DataSection, load_config, to_toml
from raymb.errors import RaymbError
from raymb.rundir.progress import format_summary

DEFAULT_DATA = Path(DataSection().train).parent  # data/linear, made on first use
IDLE_TIMEOUT = 60.0  # seconds, raymb train --follow
SYNTHETIC_KINDS = ("images", "tokens")  # gen-data kinds in the prepared layout


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
        description="Write OUT/train/*.parquet and OUT/val/*.parquet: for linear, regression "
        "and classification, with OUT/truth.json (the generating parameters); for images and "
        "tokens, in the layout `raymb prepare` writes (OUT/raymb-data.json, the manifest), "
        "into a new or empty OUT.",
    )
    g.add_argument(
        "kind",
        choices=("linear", "regression", "classification", *SYNTHETIC_KINDS),
        help="linear: y = 2x + 1 + noise; regression: y = x.w + b + noise with a known w; "
        "classification: labels of a seeded linear teacher; images: uint8 3x16x16 images, "
        "each class its own pattern, shifted, plus noise; tokens: blocks of bytes from a "
        "seeded sparse Markov chain (the manifest gives its entropy, the lowest loss)",
    )
    g.add_argument("--out", required=True, metavar="DIR", help="output directory")
    g.add_argument(
        "--rows",
        type=int,
        default=4096,
        help="training rows; validation adds round(rows x val-fraction) (default 4096)",
    )
    g.add_argument("--shards", type=int, default=4, help="train parquet files (default 4)")
    g.add_argument("--features", type=int, help="feature count (default: 1, 8 or 16 by kind)")
    g.add_argument(
        "--classes",
        type=int,
        help="classes, for classification (default 3) and images (default 10)",
    )
    g.add_argument(
        "--noise",
        type=float,
        help="noise standard deviation (default 0.1; images: of pixel values in [0, 1], "
        "default 0.25)",
    )
    g.add_argument(
        "--block-size",
        type=int,
        help="tokens: tokens a model reads per row; each row holds block-size + 1 (default 32)",
    )
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="fraction of rows held out for validation (default 0.2; 0 for none)",
    )
    g.set_defaults(func=_gen_data)

    _add_prepare_parser(sub)

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

    sm = sub.add_parser(
        "sample",
        help="continue a prompt with a saved language model (the gpt)",
        description="Encode --prompt with the tokenizer saved in the checkpoint, draw --tokens "
        "tokens one at a time from the model (softmax of the logits / --temperature, within "
        "the --top-k most likely), and print the continuation. Seeded: the same --seed prints "
        "the same text. Runs in this process, without Ray.",
    )
    sm.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="a checkpoint directory or its model.pt (summary.json's checkpoint)",
    )
    sm.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    sm.add_argument("--tokens", type=int, required=True, metavar="N", help="tokens to draw")
    sm.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        metavar="T",
        help="divide the logits by T (default 1; 0: always the most likely token)",
    )
    sm.add_argument(
        "--top-k", type=int, metavar="K", help="draw among the K most likely tokens only"
    )
    sm.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sm.add_argument(
        "--json",
        action="store_true",
        help="print one JSON line: the prompt, the drawn token ids and their text",
    )
    _add_trust_argument(sm)
    sm.set_defaults(func=_sample)

    ex = sub.add_parser(
        "export",
        help="write a saved model as safetensors, ONNX or TorchScript",
        description="Write the model of --checkpoint to --out: safetensors (the weights, with "
        "the config and inputs spec in its metadata), onnx or torchscript (traced in eval "
        "mode; input: what the model takes after normalisation, float rows or images, or "
        "int64 token ids, with a free batch axis). The written file is read back and run "
        "against the torch model on a few synthetic rows, and written under a temporary name, "
        "then renamed. onnx needs onnx and onnxruntime, safetensors the safetensors package: "
        "pip install 'raymb[export]'. Runs in this process, without Ray.",
    )
    ex.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="a checkpoint directory or its model.pt (summary.json's checkpoint)",
    )
    ex.add_argument(
        "--format",
        required=True,
        choices=("safetensors", "onnx", "torchscript"),
        help="the file format to write",
    )
    ex.add_argument("--out", required=True, metavar="FILE", help="output file")
    _add_trust_argument(ex)
    ex.set_defaults(func=_export)

    rn = sub.add_parser(
        "runs",
        help="list the runs under a storage path: status, steps, best metric, checkpoint",
        description="Print one line per run directory under STORAGE_PATH (a local folder or "
        "an object-store URI such as s3://bucket/runs): its name; status (running, finished, "
        "stopped early, stopped, failed; interrupted: marked running, but its driver on this "
        "machine is gone; unknown: an older run without a summary); steps; the best value of "
        "checkpoint.metric; the newest complete checkpoint; wall time; and when the run was "
        "last written to, in local time. The most recently updated run comes last, as with "
        "ls -tr. Reads only the run directories' files: no Ray, no torch.",
    )
    rn.add_argument(
        "storage_path",
        nargs="?",
        metavar="STORAGE_PATH",
        help="where the run directories are (default: run.storage_path of --config and --set, "
        "else 'runs'); a run directory itself lists that run",
    )
    add_config_arguments(rn, print_config=False)  # its run.storage_path and [storage]
    rn.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per run instead (name, location, status, steps, metric, "
        "best, checkpoint, checkpoint_step, wall_s, updated as unix time, host, pid, error)",
    )
    rn.set_defaults(func=_runs)

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

    cs = sub.add_parser(
        "config-schema",
        help="print the JSON Schema of a config file, for editors that check TOML",
        description="Print the JSON Schema of raymb's TOML config: every section and key, "
        "its type, bounds, default and description; unknown keys are errors. Save it "
        "(raymb config-schema > raymb.schema.json) and start a config file with the line "
        "'#:schema ./raymb.schema.json' (the path relative to the config): an editor with a "
        "TOML language server (Taplo, Even Better TOML) then checks the file as you type.",
    )
    cs.set_defaults(func=_config_schema)
    return parser


def _add_prepare_parser(sub: argparse._SubParsersAction) -> None:
    prepare = sub.add_parser(
        "prepare",
        help="turn a folder of images, or text files, into a training set",
        description="Write DIR/train/*.parquet, DIR/val/*.parquet and DIR/raymb-data.json "
        "(the manifest: columns, shape, task, classes or vocabulary), so a config's "
        'data.train = "DIR/train" is enough. Written into a temporary folder beside DIR and '
        "renamed at the end: a failed run leaves nothing behind.",
    )
    kinds = prepare.add_subparsers(required=True, metavar="KIND")
    i = kinds.add_parser(
        "images",
        help="class folders of PNG/JPEG files: ROOT/CLASS/*.png",
        description="Images under ROOT/CLASS/ (labels in sorted class-name order, written to "
        "DIR/classes.json) into columns image (uint8 tensor [C, H, W], channels first; "
        "grayscale stays one channel unless the set mixes in colour) and label (int64).",
    )
    i.add_argument("root", metavar="ROOT", help="folder of class folders of images")
    _add_prepare_common(i)
    i.add_argument(
        "--size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        help="resize every image to H x W (bilinear, aspect ratio not kept); without it, "
        "all images must share one size",
    )
    i.add_argument(
        "--strict",
        action="store_true",
        help="refuse an unreadable or non-image file, or a class folder or file that is a "
        "link out of ROOT, instead of skipping it",
    )
    i.set_defaults(func=_prepare_images)
    t = kinds.add_parser(
        "text",
        help="UTF-8 text files into blocks of tokens for a language model",
        description="Tokenize the files (one stream, in the order given; a folder's files "
        "sorted) and cut the stream into rows of block-size + 1 consecutive tokens (column "
        "tokens, int32; the remainder dropped). The tokenizer goes into DIR.",
    )
    t.add_argument(
        "paths",
        nargs="+",
        metavar="FILE_OR_DIR",
        help="text files, or folders: every file below them (hidden ones skipped)",
    )
    _add_prepare_common(t)
    t.add_argument(
        "--block-size",
        type=int,
        required=True,
        metavar="T",
        help="tokens a model reads per row (its context); each row holds T + 1",
    )
    t.add_argument(
        "--tokenizer",
        choices=("bytes", "bpe"),
        default="bytes",
        help="bytes: one token per UTF-8 byte (256); bpe: a byte-level BPE trained on the "
        "files, saved as DIR/tokenizer.json (default bytes)",
    )
    t.add_argument(
        "--vocab-size",
        type=int,
        metavar="N",
        help="--tokenizer bpe: the vocabulary size, >= 256 (default 4096)",
    )
    t.add_argument(
        "--glob",
        default="*",
        metavar="PATTERN",
        help="which files below a folder to read, e.g. '*.py' (default '*'); files named "
        "directly are always read",
    )
    t.add_argument(
        "--strict",
        action="store_true",
        help="refuse a file below a folder that is a link out of that folder, instead of "
        "skipping it",
    )
    t.set_defaults(func=_prepare_text)


def _add_prepare_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (new, or empty)")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="fraction of rows held out for validation, at random (default 0.1; 0 for none)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="seed of the train/val split (default 0)"
    )
    parser.add_argument(
        "--shards",
        type=int,
        metavar="N",
        help="train parquet files; val gets half as many (default 4, more to keep files "
        "under 256 MB)",
    )


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
    _add_trust_argument(parser)


def _add_trust_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-model-code",
        action="store_true",
        help="let a checkpoint whose model.name is a custom package.module:factory import and "
        "call that factory to rebuild its model (it runs code the file names: only for a "
        "checkpoint you trust; built-in models never need it). For jobs: "
        "RAYMB_TRUST_MODEL_CODE=1",
    )


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
        from raymb.driver.run import follow

        result = follow(config, args.follow, idle_timeout=idle_timeout, address=args.address)
    else:
        if args.config is None and config.data.train == DataSection().train:
            _ensure_default_data()
        from raymb.driver.run import train

        result = train(config, address=args.address)
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
    from raymb.rundir.checkpoint import load_model

    model, _ = load_model(checkpoint)
    w = ", ".join(f"{v:.4f}" for v in model.weight.detach().flatten().tolist())
    b = ", ".join(f"{v:.4f}" for v in model.bias.detach().flatten().tolist())
    print(f"raymb: learned w = [{w}], b = [{b}]")


def _gen_data(args: argparse.Namespace) -> int:
    from raymb.data.manifest import describe
    from raymb.data.synthetic import TABLE_KINDS, generate

    written = generate(
        args.kind,
        args.out,
        rows=args.rows,
        shards=args.shards,
        seed=args.seed,
        val_fraction=args.val_fraction,
        features=args.features,
        classes=args.classes,
        noise=args.noise,
        block_size=args.block_size,
    )
    if args.kind in TABLE_KINDS:  # truth.json's content
        print(f"raymb: wrote {args.kind} data to {args.out}/ ({args.rows} rows)")
        print(json.dumps(written))
    else:  # the manifest
        print(f"raymb: wrote {args.kind} data to {args.out}/ ({describe(written)})")
    return 0


def _prepare_images(args: argparse.Namespace) -> int:
    from raymb.data.images import prepare_images
    from raymb.data.manifest import describe

    manifest = prepare_images(
        args.root,
        args.out,
        size=args.size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        shards=args.shards,
        strict=args.strict,
    )
    if skipped := manifest["source"]["skipped"]:
        example = manifest["source"]["skipped_examples"][0]
        print(f"raymb: skipped {skipped} unreadable files, e.g. {example}", file=sys.stderr)
    _warn_links(manifest, args.root)
    print(f"raymb: wrote {args.out}/ ({describe(manifest)})")
    return 0


def _warn_links(manifest: dict, root: str) -> None:
    """One stderr line for the links out of ROOT that prepare skipped."""
    if skipped := manifest["source"]["skipped_links"]:
        example = manifest["source"]["skipped_link_examples"][0]
        print(f"raymb: skipped {skipped} links that leave {root}, e.g. {example}", file=sys.stderr)


def _prepare_text(args: argparse.Namespace) -> int:
    from raymb.data.manifest import describe
    from raymb.data.text import prepare_text

    manifest = prepare_text(
        args.paths,
        args.out,
        block_size=args.block_size,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        shards=args.shards,
        glob=args.glob,
        strict=args.strict,
    )
    _warn_links(manifest, ", ".join(p for p in args.paths if Path(p).is_dir()))
    print(f"raymb: wrote {args.out}/ ({describe(manifest)})")
    return 0


def _preflight(args: argparse.Namespace) -> None:
    """The checkpoint's refusals (malformed, an untrusted factory) before a tool imports
    torch, which alone takes a second or more: a refusal comes at once."""
    from raymb.rundir.checkpoint import preflight

    preflight(args.checkpoint, trust_model_code=args.trust_model_code)


def _eval(args: argparse.Namespace) -> int:
    _preflight(args)
    from raymb.tools.evaluate import evaluate

    metrics = evaluate(args.checkpoint, args.data, trust_model_code=args.trust_model_code)
    print(json.dumps(metrics))
    return 0


def _predict(args: argparse.Namespace) -> int:
    _preflight(args)
    from raymb.tools.predict import predict

    written = predict(args.checkpoint, args.data, args.out, trust_model_code=args.trust_model_code)
    print(f"raymb: wrote {written['rows']} predictions to {written['out']}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    _preflight(args)
    from raymb.tools.sample import sample

    drawn = sample(
        args.checkpoint,
        args.prompt,
        args.tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        trust_model_code=args.trust_model_code,
    )
    if args.json:
        print(json.dumps({"prompt": args.prompt, "tokens": drawn.tokens, "text": drawn.text}))
    else:
        print(args.prompt + drawn.text)
    return 0


def _export(args: argparse.Namespace) -> int:
    _preflight(args)
    from raymb.tools.export import export, format_size

    written = export(args.checkpoint, args.format, args.out, trust_model_code=args.trust_model_code)
    print(
        f"raymb: wrote {written['out']} ({written['format']}, {format_size(written['bytes'])}; "
        f"max abs difference vs torch {written['max_abs_diff']:.2g} on {written['rows']} rows)"
    )
    return 0


def _runs(args: argparse.Namespace) -> int:
    from raymb.rundir import runs, storage

    config = load_config(args.config, args.overrides)
    storage.configure(config.storage)
    root = storage.resolve(args.storage_path or config.run.storage_path, what="STORAGE_PATH")
    found = runs.find_runs(root)
    if not found:
        print(f"raymb: no runs in {root}", file=sys.stderr if args.json else sys.stdout)
    elif args.json:
        for run in found:
            print(json.dumps(run.to_json()))
    else:
        print(runs.format_table(found))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from raymb.rundir.plot import plot_runs

    out = plot_runs(args.run_dirs, args.out)
    print(f"raymb: wrote {out}")
    return 0


def _config_schema(args: argparse.Namespace) -> int:
    from raymb.config import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
