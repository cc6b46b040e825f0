"""`raymb prepare text`: UTF-8 text files into parquet shards of token blocks.

The files (in the order given; a folder's files below it sorted, hidden ones skipped) are
tokenized and concatenated into one stream, cut into non-overlapping blocks of T + 1
tokens (block i = stream[i(T+1) : (i+1)(T+1)], the remainder dropped): a model reads
block[:-1] and predicts block[1:]. Column `tokens` is a fixed-size list<int32>[T + 1].
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raymb.data.folder import (
    check_new_folder,
    check_split_options,
    flat_array,
    leaves,
    new_folder,
    shard_bounds,
    skip_or_refuse_link,
    split_rows,
    split_shards,
    write_split,
)
from raymb.data.manifest import (
    write_manifest,
)
from raymb.data.tokenizer import (
    BPE_FILE,
    BpeTokenizer,
    ByteTokenizer,
    Tokenizer,
    check_vocab_size,
    train_bpe,
)
from raymb.errors import ConfigError, DataError
from raymb.files import check_input

FEATURES = "tokens"
TOKENIZERS = ("bytes", "bpe")
DEFAULT_VOCAB = 4096  # --tokenizer bpe


def prepare_text(
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    block_size: int,
    tokenizer: str = "bytes",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    shards: int | None = None,
    glob: str = "*",
    strict: bool = False,
) -> dict[str, Any]:
    """Write the prepared token blocks of the text files under `paths` to `out`; return
    its manifest. `glob` picks the files below a folder (files named directly are taken); a
    file below a folder that is a link out of it is skipped (counted in the manifest's
    source), or refused with `strict`."""
    check_split_options(val_fraction, seed, shards)
    if block_size < 1:
        raise ConfigError(f"--block-size must be >= 1 (got {block_size})")
    if tokenizer not in TOKENIZERS:
        raise ConfigError(f"--tokenizer {tokenizer!r}: choose one of {', '.join(TOKENIZERS)}")
    if vocab_size is not None and tokenizer != "bpe":
        raise ConfigError("--vocab-size applies to --tokenizer bpe (bytes has 256 tokens)")
    if tokenizer == "bpe":
        vocab_size = vocab_size or DEFAULT_VOCAB
        check_vocab_size(vocab_size)
    check_new_folder(out, paths)  # before the files are listed: a refusal comes at once
    links: list[str] = []
    files = list_files(paths, glob, strict=strict, links=links)
    with new_folder(out, paths) as tmp:
        texts = [_read_utf8(path) for path in files]
        if not any(texts):
            raise DataError(f"the {len(files)} text file(s) are all empty (e.g. {files[0]})")
        if tokenizer == "bpe":
            tok: Tokenizer = train_bpe(texts, vocab_size)
        else:
            tok = ByteTokenizer()
        stream = encode_stream(tok, texts)
        width = block_size + 1
        if len(stream) < width:
            raise DataError(
                f"--block-size {block_size}: a block takes {width} tokens but the corpus has "
                f"{len(stream)} ({tokenizer} tokens of {len(files)} file(s)); use a smaller "
                "block size or more text"
            )
        blocks = stream[: len(stream) // width * width].reshape(-1, width)
        splits = {}
        for split, rows in zip(("train", "val"), split_rows(len(blocks), val_fraction, seed)):
            if len(rows):
                n_files = split_shards(shards, len(rows), 4 * width, val=split == "val")
                tables = (
                    token_table(blocks[rows[lo:hi]]) for lo, hi in shard_bounds(len(rows), n_files)
                )
                splits[split] = write_split(tmp / split, tables)
        spec: dict[str, Any] = {"kind": "bytes"}
        if isinstance(tok, BpeTokenizer):
            (tmp / BPE_FILE).write_text(tok.to_json())
            spec = {"kind": "bpe", "file": BPE_FILE}
        source = {
            "command": "prepare text",
            "paths": [str(Path(p).expanduser().resolve()) for p in paths],
            "glob": glob,
            "files": len(files),
            "skipped_links": len(links),
            "skipped_link_examples": links[:10],
            "tokens": len(stream),
            "dropped_tokens": len(stream) % width,
            "vocab_size_requested": vocab_size,
        }
        manifest = text_manifest(block_size, tok.vocab_size, spec, splits, seed, source)
        write_manifest(tmp, manifest)
    return manifest


def text_manifest(
    block_size: int, vocab_size: int, tokenizer: dict, splits: dict, seed: int, source: dict
) -> dict[str, Any]:
    return {
        "task": "lm",
        "features": FEATURES,
        "label": None,
        "shape": [block_size + 1],
        "dtype": "int32",
        "scale": None,
        "vocab_size": vocab_size,
        "tokenizer": tokenizer,
        "splits": splits,
        "seed": seed,
        "source": source,
    }


def token_table(blocks: np.ndarray) -> pa.Table:
    """The parquet table of token blocks [N, T + 1]."""
    flat = flat_array(blocks.astype(np.int32, copy=False))
    return pa.Table.from_arrays(
        [pa.FixedSizeListArray.from_arrays(flat, blocks.shape[1])], names=[FEATURES]
    )


def list_files(
    paths: Sequence[str | Path],
    glob: str = "*",
    *,
    strict: bool = False,
    links: list[str] | None = None,
) -> list[Path]:
    """The files named, and those matching `glob` below each folder named (sorted, hidden
    files and folders skipped). A file below a folder that is a link out of that folder is
    left out and noted in `links`, or refused with `strict`: a folder's files are its own."""
    if not paths:
        raise DataError("no text files given")
    if not glob or Path(glob).is_absolute() or ".." in Path(glob).parts:
        raise ConfigError(
            f"--glob {glob!r}: expected a pattern relative to each folder, without '..' "
            "(e.g. '*.txt' or 'docs/**/*.md'); name other files directly"
        )
    links = [] if links is None else links
    files: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            inside = path.resolve()
            for p in sorted(_below(path, glob)):
                if _hidden(p.relative_to(path)):
                    continue
                if leaves(p, inside):
                    skip_or_refuse_link(p, inside, strict, links)
                else:
                    files.append(p)
        elif path.is_file():
            files.append(path)
        elif os.path.lexists(path):  # a FIFO would block the read, a device never end
            check_input(path, "text input", folder_ok=True)
        else:
            raise DataError(f"{path}: no such file or folder")
    if not files:
        raise DataError(f"no files match --glob {glob!r} in {', '.join(map(str, paths))}")
    return files


def encode_stream(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    """The files' tokens, one after another (uint8 for bytes, to keep a big corpus small)."""
    if isinstance(tok, ByteTokenizer):
        return np.frombuffer("".join(texts).encode("utf-8"), dtype=np.uint8)
    assert isinstance(tok, BpeTokenizer)
    ids = tok.encode_batch([t for t in texts if t])
    return np.concatenate([np.asarray(i, dtype=np.int32) for i in ids])


def _below(folder: Path, glob: str) -> list[Path]:
    try:
        return [p for p in folder.rglob(glob) if p.is_file()]
    except (ValueError, NotImplementedError) as e:  # pathlib's word on a malformed pattern
        raise ConfigError(f"--glob {glob!r}: not a pattern pathlib takes ({e})") from None


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _read_utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); prepare text "
            "reads UTF-8 files (pick files with --glob)"
        ) from None
