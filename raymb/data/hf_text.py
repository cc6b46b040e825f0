"""`raymb prepare text TABLE --tokenizer tokenizer.json --text-column C --label-column L`: a
table of texts and labels, tokenized with a Hugging Face tokenizer file, into fixed-length
rows for a classifier.

Each row's text is encoded as the tokenizer encodes one sequence (its normalizer,
pre-tokenizer, model and post-processor: [CLS] ... [SEP] for BERT), truncated by the
tokenizer to `max_length` tokens (the special tokens kept) and padded on the right with the
pad id to exactly `max_length`. Columns: `input_ids` and `attention_mask` (1 for a token, 0
for padding), each a fixed-size list<int32>[max_length], and `label` (int64 class ids,
raymb.data.text_table). The tokenizer file's own padding and truncation settings are
replaced by these; its pad id is kept. The file is copied into the folder, its sha256 in the
manifest.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raymb.data.folder import (
    check_new_folder,
    check_split_options,
    flat_array,
    new_folder,
    shard_bounds,
    split_rows,
    split_shards,
    write_split,
)
from raymb.data.manifest import write_manifest
from raymb.data.text_table import TextTable, check_table, read_text_table
from raymb.data.tokenizer import TOKENIZER_LIMIT
from raymb.errors import ConfigError, DataError
from raymb.files import read_bounded

INPUT_IDS, ATTENTION_MASK, LABEL = "input_ids", "attention_mask", "label"
HF_FILE = "tokenizer.json"
DEFAULT_MAX_LENGTH = 128
MAX_LENGTH_LIMIT = 1 << 20
PAD_TOKENS = ("[PAD]", "<pad>")  # BERT's and RoBERTa/T5's, when the file sets no padding
CHUNK = 4096  # rows encoded at once: the unit of progress

Progress = Callable[[int, int], None]
"""Called with (rows tokenized, rows in all) after each chunk."""


class HfTokenizer:
    """A `tokenizers.Tokenizer` from a tokenizer.json, set to truncate to `max_length` and not
    to pad (the rows are padded here, so the pad id is known and recorded)."""

    def __init__(self, path: str | Path, max_length: int) -> None:
        from tokenizers import Tokenizer

        self.path = Path(path)
        if not os.path.lexists(self.path):
            raise ConfigError(
                f"--tokenizer {path}: no such file; give bytes, bpe or a Hugging Face "
                "tokenizer.json"
            )
        self.data = read_bounded(self.path, "--tokenizer", TOKENIZER_LIMIT)
        try:
            tok = Tokenizer.from_str(self.data.decode("utf-8"))
        except Exception as e:  # UnicodeDecodeError, or the library's own parse error
            detail = " ".join(str(e).split())[:160]
            raise DataError(
                f"--tokenizer {path}: not a Hugging Face tokenizers JSON file ({detail}); give "
                "the tokenizer.json of a model folder"
            ) from None
        self.pad_id, self.pad_token = pad_of(tok)
        self.special = tok.num_special_tokens_to_add(False)
        if max_length <= self.special:
            raise ConfigError(
                f"--max-length {max_length} leaves no room for text: the tokenizer adds "
                f"{self.special} special tokens to each row; use at least {self.special + 1}"
            )
        tok.no_padding()
        tok.enable_truncation(max_length)
        self.max_length = max_length
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._tok = tok

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        """(input_ids, attention_mask, rows truncated) of `texts`, each [N, max_length]."""
        ids = np.full((len(texts), self.max_length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(texts), self.max_length), dtype=np.int32)
        truncated = 0
        for i, enc in enumerate(self._tok.encode_batch(texts)):
            n = len(enc.ids)
            if n > self.max_length:  # the library's truncation failed to hold: never write it
                raise DataError(
                    f"--tokenizer {self.path}: row of {n} tokens after truncation to "
                    f"{self.max_length}; this tokenizer's truncation cannot be used"
                )
            ids[i, :n] = enc.ids
            mask[i, :n] = 1
            truncated += bool(enc.overflowing)
        return ids, mask, truncated


def pad_of(tok: Any) -> tuple[int, str | None]:
    """(pad id, pad token): the file's padding settings, else [PAD] or <pad> if in its
    vocabulary, else id 0 (which the attention mask marks as padding all the same)."""
    if tok.padding is not None:
        return int(tok.padding["pad_id"]), tok.padding.get("pad_token")
    for token in PAD_TOKENS:
        if (found := tok.token_to_id(token)) is not None:
            return int(found), token
    return 0, tok.id_to_token(0)


def check_max_length(max_length: int) -> None:
    if not 2 <= max_length <= MAX_LENGTH_LIMIT:
        raise ConfigError(
            f"--max-length must be from 2 to {MAX_LENGTH_LIMIT} tokens (got {max_length})"
        )


def prepare_text_rows(
    path: str | Path,
    out: str | Path,
    *,
    tokenizer: str | Path,
    text_column: str,
    label_column: str,
    max_length: int = DEFAULT_MAX_LENGTH,
    val_fraction: float = 0.1,
    seed: int = 0,
    shards: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write the tokenized rows of the table at `path` to `out`; return its manifest."""
    check_split_options(val_fraction, seed, shards)
    check_max_length(max_length)
    check_table(path)
    check_new_folder(out, [path, tokenizer])
    tok = HfTokenizer(tokenizer, max_length)
    table = read_text_table(path, text_column, label_column)
    splits_rows = split_rows(len(table.texts), val_fraction, seed)
    counts = {"done": 0, "truncated": 0}
    with new_folder(out, [path, tokenizer]) as tmp:
        splits = {}
        for split, rows in zip(("train", "val"), splits_rows):
            if len(rows):
                n_files = split_shards(shards, len(rows), 8 * max_length + 8, val=split == "val")
                bounds = shard_bounds(len(rows), n_files)
                tables = _tables(tok, table, rows, bounds, counts, progress)
                splits[split] = write_split(tmp / split, tables)
        (tmp / HF_FILE).write_bytes(tok.data)
        manifest = rows_manifest(tok, table, splits, seed, _source(path, tok, table, counts))
        manifest["source"].update(text_column=text_column, label_column=label_column)
        write_manifest(tmp, manifest)
    return manifest


def _tables(
    tok: HfTokenizer,
    table: TextTable,
    rows: np.ndarray,
    bounds: list[tuple[int, int]],
    counts: dict[str, int],
    progress: Progress | None,
) -> Iterator[pa.Table]:
    """One parquet table a shard, its rows encoded CHUNK at a time."""
    total = len(table.texts)
    for lo, hi in bounds:
        parts = []
        for start in range(lo, hi, CHUNK):
            chosen = rows[start : min(start + CHUNK, hi)]
            ids, mask, truncated = tok.encode([table.texts[i] for i in chosen])
            parts.append((ids, mask, table.labels[chosen]))
            counts["done"] += len(chosen)
            counts["truncated"] += truncated
            if progress is not None:
                progress(counts["done"], total)
        yield row_table(*(np.concatenate(p) for p in zip(*parts)))


def row_table(ids: np.ndarray, mask: np.ndarray, labels: np.ndarray) -> pa.Table:
    """The parquet table of [N, L] ids and mask and N labels."""
    width = ids.shape[1]
    return pa.Table.from_arrays(
        [
            pa.FixedSizeListArray.from_arrays(flat_array(ids), width),
            pa.FixedSizeListArray.from_arrays(flat_array(mask), width),
            flat_array(labels.astype(np.int64, copy=False)),
        ],
        names=[INPUT_IDS, ATTENTION_MASK, LABEL],
    )


def rows_manifest(
    tok: HfTokenizer, table: TextTable, splits: dict, seed: int, source: dict
) -> dict[str, Any]:
    L = tok.max_length
    return {
        "task": "classify",
        "features": INPUT_IDS,
        "inputs": [INPUT_IDS, ATTENTION_MASK],
        "label": LABEL,
        "columns": {
            INPUT_IDS: {"dtype": "int32", "shape": [L]},
            ATTENTION_MASK: {"dtype": "int32", "shape": [L]},
            LABEL: {"dtype": "int64", "shape": []},
        },
        "shape": [L],
        "dtype": "int32",
        "scale": None,
        "max_length": L,
        "pad_id": tok.pad_id,
        "pad_token": tok.pad_token,
        "padding_side": "right",
        "num_classes": table.num_classes,
        "label_names": table.names,
        "vocab_size": tok.vocab_size,
        "tokenizer": {"kind": "hf", "file": HF_FILE, "sha256": tok.sha256},
        "splits": splits,
        "seed": seed,
        "source": source,
    }


def _source(path: str | Path, tok: HfTokenizer, table: TextTable, counts: dict) -> dict:
    return {
        "command": "prepare text",
        "path": str(Path(path).expanduser().resolve()),
        "format": table.format,
        "rows": len(table.texts),
        "truncated_rows": counts["truncated"],
        "tokenizer": str(tok.path.expanduser().resolve()),
    }
