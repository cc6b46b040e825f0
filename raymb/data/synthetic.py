"""Seeded synthetic datasets, every kind of `raymb gen-data`: `generate(kind, out, ...)`.

Small and learnable, for tests and quickstarts. `rows` are the training rows; validation adds
max(1, round(rows * val_fraction)) more. Two layouts:

- linear, regression, classification (raymb.data.synthetic_tables): a `features` vector
  column and a `label`, with truth.json, the parameters that generated them.
- images, tokens (here): written like `raymb prepare` writes (train/ and val/ parquet, the
  manifest, classes.json for images), so training reads them the same.
  - images: `classes` classes of uint8 [3, 16, 16]. Each class has its own pattern (a random
    4x4 grid of colours, blown up to 16x16); an image is its class's pattern shifted by up
    to 2 pixels either way, plus Gaussian noise of sd `noise` (pixel values in [0, 1]).
  - tokens: blocks of `block_size + 1` bytes from a seeded sparse Markov chain over 32
    printable characters (each followed by one of 3 others), read with the bytes tokenizer.
    The manifest's source gives the chain's entropy rate: the lowest mean loss (nats/token)
    that a model can reach.
"""

from __future__ import annotations

import bisect
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raymb.data import synthetic_tables
from raymb.data.folder import (
    check_new_folder,
    check_split_options,
    new_folder,
    shard_bounds,
    split_shards,
    write_split,
)
from raymb.data.images import CLASSES_FILE, image_manifest, image_table
from raymb.data.manifest import write_manifest
from raymb.data.text import text_manifest, token_table
from raymb.data.tokenizer import BYTE_VOCAB
from raymb.errors import ConfigError

TABLE_KINDS = synthetic_tables.KINDS  # a features column and a label, with truth.json
PREPARED_KINDS = ("images", "tokens")  # the layout `raymb prepare` writes, with its manifest
KINDS = (*TABLE_KINDS, *PREPARED_KINDS)
IMAGE_SHAPE = (3, 16, 16)
IMAGE_GRID = 4  # a class pattern is IMAGE_GRID x IMAGE_GRID blocks of colour
MAX_SHIFT = 2
DEFAULTS = {"images": {"classes": 10, "noise": 0.25}, "tokens": {"block_size": 32}}
ALPHABET = b"abcdefghijklmnopqrstuvwxyz .,!?\n"
SUCCESSORS = 3
# Bounds checked before anything is allocated (the set is made in memory at once): images
# take ~16 bytes a pixel value on the way (~2 GiB at the bound), a class's 25 shifted
# patterns 77 KB; a token is one step of a Python loop (~4 s and ~700 MB at the bound).
MAX_IMAGES = 150_000
MAX_IMAGE_CLASSES = 1000
MAX_TOKENS = 2**24


def generate(
    kind: str,
    out: str | Path,
    *,
    rows: int = 4096,
    shards: int = 4,
    seed: int = 0,
    val_fraction: float = 0.2,
    features: int | None = None,
    classes: int | None = None,
    noise: float | None = None,
    block_size: int | None = None,
) -> dict[str, Any]:
    """Write a seeded synthetic set of `kind` to `out`, a new or empty folder; return what
    describes it: truth.json's content for a tabular kind, the manifest for images and tokens.
    An option left None takes the kind's default; one the kind does not take is refused."""
    if kind not in KINDS:
        raise ConfigError(f"gen-data: unknown kind {kind!r} (choose one of {', '.join(KINDS)})")
    given = {"classes": classes, "noise": noise, "block_size": block_size, "features": features}
    if kind in TABLE_KINDS:
        if block_size is not None:
            raise ConfigError(f"gen-data {kind}: --block-size applies to tokens only")
        options = {name: value for name, value in given.items() if value is not None}
        return synthetic_tables.generate(
            kind, out, rows=rows, shards=shards, seed=seed, val_fraction=val_fraction, **options
        )
    return _generate_prepared(kind, out, rows, shards, seed, val_fraction, given)


def _generate_prepared(
    kind: str,
    out: str | Path,
    rows: int,
    shards: int,
    seed: int,
    val_fraction: float,
    given: dict[str, Any],
) -> dict[str, Any]:
    """images or tokens, in the prepared layout, with the options `given` (None: the kind's
    default); returns the manifest."""
    for name, value in given.items():
        if value is not None and name not in DEFAULTS[kind]:
            raise ConfigError(f"gen-data {kind}: --{name.replace('_', '-')} does not apply")
    options = {**DEFAULTS[kind], **{k: v for k, v in given.items() if v is not None}}
    check_split_options(val_fraction, seed, shards)
    if rows < 1:
        raise ConfigError(f"gen-data: --rows must be >= 1 (got {rows})")
    val_rows = max(1, round(rows * val_fraction)) if val_fraction > 0 else 0
    _check_size(kind, options, rows, rows + val_rows)
    check_new_folder(out)  # before the work: an existing dataset is left alone
    rng = np.random.default_rng(seed)
    if kind == "images":
        x, y = _images(rng, rows + val_rows, options["classes"], options["noise"])

        def table(lo: int, hi: int) -> pa.Table:
            return image_table(x[lo:hi], y[lo:hi])

        row_bytes, source = x[0].size, {}
    else:
        blocks, entropy = _markov_blocks(rng, rows + val_rows, options["block_size"] + 1)

        def table(lo: int, hi: int) -> pa.Table:
            return token_table(blocks[lo:hi])

        row_bytes, source = 4 * blocks.shape[1], {"entropy_nats": round(entropy, 6)}

    with new_folder(out) as tmp:
        splits = {}
        for split, lo, n in (("train", 0, rows), ("val", rows, val_rows)):
            if n:
                files = split_shards(shards, n, row_bytes, val=split == "val")
                parts = (table(lo + a, lo + b) for a, b in shard_bounds(n, files))
                splits[split] = write_split(tmp / split, parts)
        source = {"command": f"gen-data {kind}", **options, **source}
        if kind == "images":
            names = [f"class{i}" for i in range(options["classes"])]
            (tmp / CLASSES_FILE).write_text(json.dumps(names, indent=1) + "\n")
            manifest = image_manifest(list(IMAGE_SHAPE), len(names), splits, seed, source)
        else:
            spec = {"kind": "bytes"}
            manifest = text_manifest(options["block_size"], BYTE_VOCAB, spec, splits, seed, source)
        write_manifest(tmp, manifest)
    return manifest


def _check_size(kind: str, options: dict[str, Any], rows: int, n: int) -> None:
    """The options of `kind` against the bounds, for `n` rows with validation, in one line."""
    if kind == "images":
        classes, noise = options["classes"], options["noise"]
        if not 2 <= classes <= MAX_IMAGE_CLASSES:
            raise ConfigError(
                f"gen-data images: --classes must be from 2 to {MAX_IMAGE_CLASSES} (got {classes})"
            )
        if not 0 <= noise < math.inf:
            raise ConfigError(f"gen-data images: --noise must be a finite number >= 0 ({noise})")
        if n > MAX_IMAGES:
            raise ConfigError(
                f"gen-data images: --rows {rows} makes {n} images with validation; at most "
                f"{MAX_IMAGES} (about 2 GiB of memory)"
            )
    else:
        block_size = options["block_size"]
        if block_size < 1:
            raise ConfigError("gen-data tokens: --block-size must be >= 1")
        if n * (block_size + 1) > MAX_TOKENS:
            raise ConfigError(
                f"gen-data tokens: --rows x (--block-size + 1) is {n * (block_size + 1)} tokens "
                f"with validation; at most {MAX_TOKENS}: fewer rows or a smaller block size"
            )


def _images(
    rng: np.random.Generator, n: int, classes: int, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    c, h, w = IMAGE_SHAPE
    grid = rng.uniform(0.1, 0.9, (classes, c, IMAGE_GRID, IMAGE_GRID)).astype(np.float32)
    patterns = grid.repeat(h // IMAGE_GRID, axis=2).repeat(w // IMAGE_GRID, axis=3)
    moves = range(-MAX_SHIFT, MAX_SHIFT + 1)
    # shifted[class, dy, dx]: every shift of every pattern, each image one of them.
    shifted = np.stack([np.roll(patterns, (dy, dx), axis=(2, 3)) for dy in moves for dx in moves])
    labels = rng.integers(0, classes, n)
    images = shifted[rng.integers(0, len(moves) ** 2, n), labels]
    images += noise * rng.standard_normal(images.shape, dtype=np.float32)
    return np.rint(255 * np.clip(images, 0, 1)).astype(np.uint8), labels


def _markov_blocks(rng: np.random.Generator, n: int, width: int) -> tuple[np.ndarray, float]:
    """n blocks of a seeded sparse Markov chain's byte stream, and the chain's entropy rate."""
    k = len(ALPHABET)
    successors = np.argsort(rng.random((k, k)), axis=1)[:, :SUCCESSORS]
    probs = rng.dirichlet(np.ones(SUCCESSORS), k)
    # Plain Python lists: a loop of ~100k steps over numpy scalars would be 10x slower.
    cumulative, following = probs.cumsum(axis=1).tolist(), successors.tolist()
    state, stream = 0, []
    for u in rng.random(n * width).tolist():
        stream.append(state)
        state = following[state][min(bisect.bisect_right(cumulative[state], u), SUCCESSORS - 1)]
    # Long-run share of time in each state, from state 0 (a Cesaro mean: exact for a
    # periodic chain too), weights each state's next-token entropy.
    transition = np.zeros((k, k))
    np.add.at(transition, (np.arange(k)[:, None], successors), probs)
    share, visit = np.zeros(k), np.eye(k)[0]
    for _ in range(2000):
        share += visit
        visit = visit @ transition
    share /= share.sum()
    entropy = float(share @ -(probs * np.log(probs)).sum(axis=1))
    return np.frombuffer(ALPHABET, np.uint8)[np.array(stream)].reshape(n, width), entropy
