"""`raymb gen-data` (seeded synthetic sets) and `raymb prepare images|text` (a folder of
images, or text files, into a training set)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from raymb.errors import ConfigError

# raymb.data.synthetic.KINDS, not imported here: the parser needs neither numpy nor pyarrow.
GEN_DATA_KINDS = ("linear", "regression", "classification", "images", "tokens")


def add_gen_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write OUT/train/*.parquet and OUT/val/*.parquet: for linear, regression "
        "and classification, with OUT/truth.json (the generating parameters); for images and "
        "tokens, in the layout `raymb prepare` writes (OUT/raymb-data.json, the manifest), "
        "into a new or empty OUT."
    )
    parser.add_argument(
        "kind",
        choices=GEN_DATA_KINDS,
        help="linear: y = 2x + 1 + noise; regression: y = x.w + b + noise with a known w; "
        "classification: labels of a seeded linear teacher; images: uint8 3x16x16 images, "
        "each class its own pattern, shifted, plus noise; tokens: blocks of bytes from a "
        "seeded sparse Markov chain (the manifest gives its entropy, the lowest loss)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--rows",
        type=int,
        default=4096,
        help="training rows; validation adds round(rows x val-fraction) (default 4096)",
    )
    parser.add_argument("--shards", type=int, default=4, help="train parquet files (default 4)")
    parser.add_argument("--features", type=int, help="feature count (default: 1, 8 or 16 by kind)")
    parser.add_argument(
        "--classes",
        type=int,
        help="classes, for classification (default 3) and images (default 10)",
    )
    parser.add_argument(
        "--noise",
        type=float,
        help="noise standard deviation (default 0.1; images: of pixel values in [0, 1], "
        "default 0.25)",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        help="tokens: tokens a model reads per row; each row holds block-size + 1 (default 32)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="fraction of rows held out for validation (default 0.2; 0 for none)",
    )


def run_gen_data(args: argparse.Namespace) -> int:
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


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write DIR/train/*.parquet, DIR/val/*.parquet and DIR/raymb-data.json "
        "(the manifest: columns, shape, task, classes or vocabulary), so a config's "
        'data.train = "DIR/train" is enough. Written into a temporary folder beside DIR and '
        "renamed at the end: a failed run leaves nothing behind."
    )
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
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
    t = kinds.add_parser(
        "text",
        help="UTF-8 text files into blocks of tokens for a language model, or a table of "
        "texts and labels into tokenized rows for a classifier",
        description="Token blocks (the default): tokenize the files (one stream, in the order "
        "given; a folder's files sorted) and cut the stream into rows of block-size + 1 "
        "consecutive tokens (column tokens, int32; the remainder dropped); the tokenizer goes "
        "into DIR. Rows of a table (with --text-column and --label-column): read one CSV, JSON "
        "lines or parquet file (by its suffix: .csv, .jsonl, .json, .parquet), tokenize each "
        "row's text with a Hugging Face tokenizer.json (--tokenizer FILE), truncate and pad it "
        "to --max-length, and write columns input_ids and attention_mask (int32, 1 for a token, "
        "0 for padding) and label (int64; string labels mapped to 0..C-1 in sorted order, the "
        "names in the manifest).",
        epilog="examples: raymb prepare text corpus.txt --out data/lm --block-size 256; "
        "raymb prepare text reviews.csv --tokenizer tokenizer.json --text-column text "
        "--label-column label --max-length 64 --out data/reviews",
    )
    t.add_argument(
        "paths",
        nargs="+",
        metavar="FILE_OR_DIR",
        help="text files, or folders: every file below them (hidden ones skipped); with "
        "--text-column, the one table file",
    )
    _add_prepare_common(t)
    blocks = t.add_argument_group("token blocks (a language model)")
    blocks.add_argument(
        "--block-size",
        type=int,
        metavar="T",
        help="tokens a model reads per row (its context); each row holds T + 1 (required for "
        "token blocks)",
    )
    t.add_argument(
        "--tokenizer",
        default=None,
        metavar="bytes|bpe|FILE",
        help="bytes: one token per UTF-8 byte (256); bpe: a byte-level BPE trained on the "
        "files, saved as DIR/tokenizer.json (default bytes, for token blocks); FILE: a Hugging "
        "Face tokenizer.json (required with --text-column; copied to DIR/tokenizer.json; "
        "a file named bytes or bpe is ./bpe)",
    )
    blocks.add_argument(
        "--vocab-size",
        type=int,
        metavar="N",
        help="--tokenizer bpe: the vocabulary size, >= 256 (default 4096)",
    )
    blocks.add_argument(
        "--glob",
        default=None,
        metavar="PATTERN",
        help="which files below a folder to read, e.g. '*.py' (default '*'); files named "
        "directly are always read",
    )
    blocks.add_argument(
        "--strict",
        action="store_true",
        help="refuse a file below a folder that is a link out of that folder, instead of "
        "skipping it",
    )
    rows = t.add_argument_group("rows of a table (a classifier)")
    rows.add_argument(
        "--text-column", metavar="NAME", help="the table's column of texts (turns on table rows)"
    )
    rows.add_argument(
        "--label-column",
        metavar="NAME",
        help="the table's column of labels: class ids >= 0 kept, anything else (strings, "
        "negative integers) mapped to 0..C-1 in sorted order; an empty label is refused",
    )
    rows.add_argument(
        "--max-length",
        type=int,
        metavar="L",
        help="tokens per row, special tokens included: longer texts are truncated, shorter "
        "ones padded on the right with the pad id (the tokenizer file's padding pad_id, else "
        "[PAD] or <pad>, else 0) (default 128)",
    )


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


def run_prepare(args: argparse.Namespace) -> int:
    return _prepare_images(args) if args.kind == "images" else _prepare_text(args)


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


def _prepare_text(args: argparse.Namespace) -> int:
    from raymb.data.manifest import describe
    from raymb.data.text import prepare_text

    if args.text_column is not None or args.label_column is not None:
        return _prepare_text_rows(args)
    if args.max_length is not None:
        raise ConfigError("--max-length applies to a table's rows (with --text-column)")
    if args.block_size is None:
        raise ConfigError(
            "--block-size is required for token blocks (or give --text-column and "
            "--label-column to tokenize a table's rows)"
        )
    tokenizer = args.tokenizer or "bytes"
    if tokenizer not in ("bytes", "bpe"):
        raise ConfigError(
            f"--tokenizer {tokenizer}: a tokenizer file tokenizes a table's rows (give "
            "--text-column and --label-column); token blocks take --tokenizer bytes or bpe"
        )
    manifest = prepare_text(
        args.paths,
        args.out,
        block_size=args.block_size,
        tokenizer=tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        shards=args.shards,
        glob="*" if args.glob is None else args.glob,
        strict=args.strict,
    )
    _warn_links(manifest, ", ".join(p for p in args.paths if Path(p).is_dir()))
    print(f"raymb: wrote {args.out}/ ({describe(manifest)})")
    return 0


def _prepare_text_rows(args: argparse.Namespace) -> int:
    from raymb.data.hf_text import DEFAULT_MAX_LENGTH, prepare_text_rows
    from raymb.data.manifest import describe

    blocks = {"--block-size": args.block_size, "--vocab-size": args.vocab_size}
    blocks |= {"--glob": args.glob, "--strict": args.strict or None}
    for flag, value in blocks.items():
        if value is not None:
            raise ConfigError(f"{flag} applies to token blocks, not to a table's rows: drop it")
    for flag, value in (("--text-column", args.text_column), ("--label-column", args.label_column)):
        if value is None:
            raise ConfigError(f"a table's rows need {flag} NAME too (the column to read)")
    if args.tokenizer in (None, "bytes", "bpe"):
        raise ConfigError(
            "a table's rows are tokenized with a Hugging Face tokenizer file: give "
            "--tokenizer path/to/tokenizer.json"
        )
    if len(args.paths) != 1:
        raise ConfigError(
            f"a table's rows come from one file (.csv, .jsonl, .json or .parquet); got "
            f"{len(args.paths)} paths"
        )
    manifest = prepare_text_rows(
        args.paths[0],
        args.out,
        tokenizer=args.tokenizer,
        text_column=args.text_column,
        label_column=args.label_column,
        max_length=DEFAULT_MAX_LENGTH if args.max_length is None else args.max_length,
        val_fraction=args.val_fraction,
        seed=args.seed,
        shards=args.shards,
        progress=_Progress(),
    )
    if truncated := manifest["source"]["truncated_rows"]:
        print(
            f"raymb: truncated {truncated:,} of {manifest['source']['rows']:,} rows to "
            f"--max-length {manifest['max_length']} tokens",
            file=sys.stderr,
        )
    print(f"raymb: wrote {args.out}/ ({describe(manifest)})")
    return 0


class _Progress:
    """A stderr line every few seconds while rows are tokenized, and one at the end if any
    came before (a quick set prints none)."""

    EVERY_S = 5.0

    def __init__(self) -> None:
        self.last, self.printed = time.monotonic(), False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.EVERY_S or (done == total and self.printed):
            print(f"raymb: tokenized {done:,} of {total:,} rows", file=sys.stderr, flush=True)
            self.last, self.printed = now, True


def _warn_links(manifest: dict, root: str) -> None:
    """One stderr line for the links out of ROOT that prepare skipped."""
    if skipped := manifest["source"]["skipped_links"]:
        example = manifest["source"]["skipped_link_examples"][0]
        print(f"raymb: skipped {skipped} links that leave {root}, e.g. {example}", file=sys.stderr)
