"""`raymb prepare images`: class folders of PNG/JPEG files into parquet shards of uint8 tensors.

ROOT/CLASS/.../FILE is an image of class CLASS (labels in sorted folder-name order). The
output DIR holds train/ and val/ parquet files with columns `image` (Arrow's fixed-shape
tensor, uint8, channels first [C, H, W]) and `label` (int64), classes.json and the manifest.

Pillow decodes the files in this process: on a 2-core machine it reads 32x32 PNGs ~50x
faster than Ray Data's read_images, whose start-up alone is longer than Pillow's whole
read of thousands of files (bench/prepare_images.py). Two passes: headers first (modes,
sizes, unreadable files, all cheap), then one shard's images at a time, so memory holds a
shard, not the set.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

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
from raymb.errors import ConfigError, DataError

FEATURES = "image"
LABEL = "label"
CLASSES_FILE = "classes.json"
GRAY_MODES = ("1", "L", "LA")  # stored as one channel; anything else becomes RGB
# What Pillow raises on a file that is not an image it can decode, or a broken one.
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def prepare_images(
    root: str | Path,
    out: str | Path,
    *,
    size: Sequence[int] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    shards: int | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Write the prepared set of ROOT's class folders to `out`; return its manifest.

    `size` (H, W) resizes every image (bilinear, aspect ratio not kept); without it all
    images must share one size. Unreadable files, and links (class folders or files) that
    lead out of ROOT, are skipped (counted in the manifest's source), or refused with `strict`.
    """
    check_split_options(val_fraction, seed, shards)
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ConfigError(f"--size takes two positive integers H W (got {list(size)})")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    check_new_folder(out, [root])  # before the files are listed: a refusal comes at once
    links: list[str] = []  # class folders and files that are links out of ROOT
    classes, files = _list(root, strict, links)
    with new_folder(out, [root]) as tmp:
        skipped: list[str] = []
        headers = []  # (path, label, mode, (width, height)) of each readable file
        for path, label in files:
            if header := _header(path, strict):
                headers.append((path, label, *header))
            else:
                skipped.append(str(path))
        if not headers:
            raise DataError(f"{root}: none of its {len(files)} files is a readable image")
        mode = "L" if all(h[2] in GRAY_MODES for h in headers) else "RGB"
        height, width = size if size is not None else _common_size(headers)
        shape = [1 if mode == "L" else 3, height, width]
        splits = {}
        for split, order in zip(("train", "val"), split_rows(len(headers), val_fraction, seed)):
            if not len(order):
                continue
            chosen = [headers[i][:2] for i in order]
            n_files = split_shards(shards, len(chosen), int(np.prod(shape)), val=split == "val")
            shards_of = (chosen[lo:hi] for lo, hi in shard_bounds(len(chosen), n_files))
            tables = (_decode(part, mode, (width, height), strict, skipped) for part in shards_of)
            splits[split] = write_split(tmp / split, tables)
        if not splits["train"]["rows"]:
            raise DataError(f"{root}: no image of the train split could be decoded")
        (tmp / CLASSES_FILE).write_text(json.dumps(classes, indent=1) + "\n")
        source = {
            "command": "prepare images",
            "root": str(root.resolve()),
            "size": None if size is None else [height, width],
            "images": sum(s["rows"] for s in splits.values()),
            "skipped": len(skipped),
            "skipped_examples": skipped[:10],
            "skipped_links": len(links),
            "skipped_link_examples": links[:10],
        }
        manifest = image_manifest(shape, len(classes), splits, seed, source)
        write_manifest(tmp, manifest)
    return manifest


def image_manifest(
    shape: list[int], num_classes: int, splits: dict, seed: int, source: dict
) -> dict[str, Any]:
    return {
        "task": "classify",
        "features": FEATURES,
        "label": LABEL,
        "shape": shape,
        "dtype": "uint8",
        "scale": 1 / 255,
        "num_classes": num_classes,
        "classes": CLASSES_FILE,
        "splits": splits,
        "seed": seed,
        "source": source,
    }


def image_table(images: np.ndarray, labels: np.ndarray) -> pa.Table:
    """The parquet table of uint8 images [N, C, H, W] and their int64 labels."""
    shape = list(images.shape[1:])
    pixels = pa.FixedSizeListArray.from_arrays(
        flat_array(images.astype(np.uint8, copy=False)), int(np.prod(shape))
    )
    tensors = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.uint8(), shape), pixels)
    return pa.Table.from_arrays(
        [tensors, flat_array(labels.astype(np.int64, copy=False))], names=[FEATURES, LABEL]
    )


def _list(root: Path, strict: bool, links: list[str]) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names in label order, and every (non-hidden) file below each class folder; a
    class folder or file that is a link out of ROOT goes to `links` (refused with `strict`)."""
    inside = root.resolve()
    classes = []
    for p in sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p.name)):
        if leaves(p, inside):
            skip_or_refuse_link(p, inside, strict, links)
        else:
            classes.append(p.name)
    if not classes:
        raise DataError(
            f"{root}: no class folders (expected {root}/CLASS/IMAGE.png, the label the folder name)"
        )
    files = []
    for label, name in enumerate(classes):
        folder = root / name
        found = (p for p in folder.rglob("*") if p.is_file())
        for p in sorted(found):
            if _hidden(*p.relative_to(folder).parts):
                continue
            if leaves(p, inside):
                skip_or_refuse_link(p, inside, strict, links)
            else:
                files.append((p, label))
    if not files:
        raise DataError(f"{root}: its {len(classes)} class folders hold no files")
    return classes, files


def _hidden(*parts: str) -> bool:
    return any(part.startswith(".") for part in parts)


def _header(path: Path, strict: bool) -> tuple[str, tuple[int, int]] | None:
    """(mode, (width, height)) read from the file's header; None if it is not an image."""
    try:
        with Image.open(path) as im:
            return im.mode, im.size
    except UNREADABLE as e:
        _refuse_if(strict, path, e)
        return None


def _refuse_if(strict: bool, path: Path, e: BaseException) -> None:
    if strict:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{path}: not a readable image ({reason}); --strict refuses it")


def _common_size(headers: list[tuple]) -> tuple[int, int]:
    """(H, W) shared by every image, or an error naming an image of another size."""
    counts = Counter(h[3] for h in headers)
    (width, height), n = counts.most_common(1)[0]
    if len(counts) > 1:
        path, _, _, (w, h) = next(h for h in headers if h[3] != (width, height))
        raise DataError(
            f"{path}: {h}x{w} pixels (H x W) but {n} of the {len(headers)} images are "
            f"{height}x{width}; pass --size H W to resize them all"
        )
    return height, width


def _decode(
    chosen: list[tuple[Path, int]],
    mode: str,
    size: tuple[int, int],
    strict: bool,
    skipped: list[str],
) -> pa.Table:
    """One shard: the images in `mode`, resized to `size` (W, H) where they differ."""
    images, labels = [], []
    for path, label in chosen:
        try:
            with Image.open(path) as im:
                im = im.convert(mode)
                if im.size != size:
                    im = im.resize(size, Image.Resampling.BILINEAR)
                pixels = np.asarray(im)
        except UNREADABLE as e:  # a header that read fine over a truncated body
            _refuse_if(strict, path, e)
            skipped.append(str(path))
            continue
        images.append(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
        labels.append(label)
    if not images:
        return pa.Table.from_arrays(
            [], names=[]
        )  # every file of the shard skipped: write_split writes no file
    return image_table(np.stack(images), np.array(labels))
