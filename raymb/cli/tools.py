"""The commands on a saved model, each run in this process without Ray (`raymb eval`,
`predict`, `sample`, `export`), and on run directories (`raymb runs`, `plot`)."""

from __future__ import annotations

import argparse
import json
import sys

from raymb.cli.train import add_config_arguments
from raymb.load import load_config


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Print, as one JSON line, the loss over every row of --data (sum / count, as the "
        "run's validation: its loss.name, a mean per token for a language model), the "
        'accuracy for a classifier, and metrics.name\'s metrics (under "metrics") of the '
        "model saved in --checkpoint. Runs in this process, without Ray."
    )
    _add_model_arguments(parser)


def run_eval(args: argparse.Namespace) -> int:
    from raymb.tools import checks

    _preflight(args, objective=True)  # the run's loss and metrics are rebuilt too
    checks.check_data(args.data)
    from raymb.tools.evaluate import evaluate

    metrics = evaluate(args.checkpoint, args.data, trust_model_code=args.trust_model_code)
    print(json.dumps(metrics))
    return 0


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write one parquet file with the columns of --data other than the "
        "features (ids, the label if any) and `prediction`: the class id, plus "
        "`probabilities`, for a classifier (one per token for a token classifier); the "
        "predicted value for a regressor. --data needs no label column; a model of named "
        "inputs (data.inputs) reads those columns. Runs in this process, without Ray."
    )
    _add_model_arguments(parser)
    parser.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="output parquet file (written under a temporary name, then renamed)",
    )
    _add_force_argument(parser)


def run_predict(args: argparse.Namespace) -> int:
    from raymb.tools.checks import check_predict  # no torch: the checks come first

    _preflight(args)
    check_predict(args.checkpoint, args.data, args.out, force=args.force)
    from raymb.tools.predict import predict

    written = predict(
        args.checkpoint,
        args.data,
        args.out,
        trust_model_code=args.trust_model_code,
        force=args.force,
    )
    print(f"raymb: wrote {written['rows']} predictions to {written['out']}")
    return 0


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Encode --prompt with the tokenizer saved in the checkpoint, draw --tokens "
        "tokens one at a time from the model (softmax of the logits / --temperature, within "
        "the --top-k most likely), and print the continuation. Seeded: the same --seed prints "
        "the same text. Runs in this process, without Ray."
    )
    _add_checkpoint_argument(parser)
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    parser.add_argument("--tokens", type=int, required=True, metavar="N", help="tokens to draw")
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        metavar="T",
        help="divide the logits by T (default 1; 0: always the most likely token)",
    )
    parser.add_argument(
        "--top-k", type=int, metavar="K", help="draw among the K most likely tokens only"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON line: the prompt, the drawn token ids and their text",
    )
    _add_trust_argument(parser)


def run_sample(args: argparse.Namespace) -> int:
    from raymb.tools.checks import check_sample

    check_sample(args.tokens, args.temperature, args.top_k, args.seed, args.prompt)
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


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write the model of --checkpoint to --out: safetensors (the weights, with "
        "the config and inputs spec in its metadata), onnx or torchscript (traced in eval "
        "mode; input: what the model takes after normalisation, float rows or images, or "
        "int64 token ids, with a free batch axis). The written file is read back and run "
        "against the torch model on a few synthetic rows, and written under a temporary name, "
        "then renamed. A model of named inputs (data.inputs) takes its columns by name (the "
        "ONNX input names), gives its logits, and is traced on the first rows of --data. "
        "onnx needs onnx and onnxruntime, safetensors the safetensors package: "
        "pip install 'raymb[export]'. Runs in this process, without Ray."
    )
    _add_checkpoint_argument(parser)
    parser.add_argument(
        "--data",
        metavar="PATH",
        help="parquet file, directory or glob with the model's named input columns: their "
        "first rows trace and check a model of data.inputs (which needs it)",
    )
    parser.add_argument(
        "--format",
        required=True,
        choices=("safetensors", "onnx", "torchscript"),
        help="the file format to write",
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="output file")
    _add_force_argument(parser)
    _add_trust_argument(parser)


def run_export(args: argparse.Namespace) -> int:
    from raymb.tools.checks import check_export  # no torch: the checks come first

    _preflight(args)
    check_export(args.checkpoint, args.format, args.out, force=args.force, data=args.data)
    from raymb.tools.export import export, format_size

    written = export(
        args.checkpoint,
        args.format,
        args.out,
        data=args.data,
        trust_model_code=args.trust_model_code,
        force=args.force,
    )
    print(
        f"raymb: wrote {written['out']} ({written['format']}, {format_size(written['bytes'])}; "
        f"max abs difference vs torch {written['max_abs_diff']:.2g} on {written['rows']} rows)"
    )
    return 0


def add_runs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Print one line per run directory under STORAGE_PATH (a local folder or "
        "an object-store URI such as s3://bucket/runs): its name; status (running, finished, "
        "stopped early, stopped, failed; interrupted: marked running, but its driver on this "
        "machine is gone; unknown: an older run without a summary); steps; the best value of "
        "checkpoint.metric; the newest complete checkpoint; wall time; and when the run was "
        "last written to, in local time. The most recently updated run comes last, as with "
        "ls -tr. Reads only the run directories' files: no Ray, no torch."
    )
    parser.add_argument(
        "storage_path",
        nargs="?",
        metavar="STORAGE_PATH",
        help="where the run directories are (default: run.storage_path of --config and --set, "
        "else 'runs'); a run directory itself lists that run",
    )
    add_config_arguments(parser, print_config=False)  # its run.storage_path and [storage]
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per run instead (name, location, status, steps, metric, "
        "best, checkpoint, checkpoint_step, wall_s, updated as unix time, host, pid, error)",
    )


def run_runs(args: argparse.Namespace) -> int:
    from raymb import storage
    from raymb.rundir import runs

    config = load_config(args.config, args.overrides)
    storage.configure(config.storage.endpoint_url, config.storage.region)
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


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Draw train and val loss against step and, below, samples/s, of each "
        "run from its metrics.csv, labelled by run directory name, e.g. a run with "
        "train.sync=grad against one with train.sync=param. Needs matplotlib: pip install "
        "'raymb[plot]'. (Each run also writes its own loss.png.)"
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories to overlay")
    parser.add_argument(
        "--out", default="runs.png", metavar="FILE", help="output PNG file (default runs.png)"
    )
    _add_force_argument(parser)


def run_plot(args: argparse.Namespace) -> int:
    from raymb.driver.report.plot import plot_runs

    out = plot_runs(args.run_dirs, args.out, force=args.force)
    print(f"raymb: wrote {out}")
    return 0


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --data and --trust-model-code: what eval and predict read."""
    _add_checkpoint_argument(parser)
    parser.add_argument(
        "--data",
        required=True,
        metavar="PATH",
        help="parquet file, directory or glob, with the feature columns the model was trained on",
    )
    _add_trust_argument(parser)


def _add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="a checkpoint directory or its model.pt (summary.json's checkpoint)",
    )


def _add_force_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace --out if it is an existing file (never an input, a folder or a device)",
    )


def _add_trust_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-model-code",
        action="store_true",
        help="let a checkpoint whose model.name is a custom package.module:factory import and "
        "call that factory to rebuild its model, and (raymb eval) its loss.name and "
        "metrics.name functions (it runs code the file names: only for a checkpoint you "
        "trust; built-in models and transformers never need it). For jobs: "
        "RAYMB_TRUST_MODEL_CODE=1",
    )


def _preflight(args: argparse.Namespace, *, objective: bool = False) -> None:
    """The checkpoint's refusals (not a regular file, too large, malformed, an untrusted
    factory; with `objective`, an untrusted loss or metrics function) before a tool imports
    torch, which alone takes a second or more: a refusal comes at once."""
    from raymb.tools.checks import check_checkpoint

    check_checkpoint(args.checkpoint, trust_model_code=args.trust_model_code, objective=objective)
