"""raymb-data.json: what a prepared dataset folder holds, so `data.train = "DIR/train"` is enough.

`raymb prepare` and `raymb gen-data images|tokens` write DIR/raymb-data.json next to DIR/train
and DIR/val. Its keys:

- format ("raymb-data"), version (1)
- task: "classify" or "lm"
- features: the feature column ("image", "tokens"); label: the label column, or null (lm)
- shape: one row's feature shape ([3, 32, 32]; [T + 1] for token blocks); dtype ("uint8",
  "int32")
- scale: multiplies the stored values into floats in the collate (1/255 for images), or null
- num_classes and classes (the file of class names in label order) for images; vocab_size
  and tokenizer ({"kind": "bytes"} or {"kind": "bpe", "file": "tokenizer.json"}) for text
- splits: {"train": {"rows": N, "files": F}, "val": {...}}; seed; source

A config's explicit data.* keys win over the manifest's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from raymb.errors import DataError
from raymb.files import CONFIG_LIMIT, InputError, read_bounded

MANIFEST = "raymb-data.json"
FORMAT = "raymb-data"
VERSION = 1
MANIFEST_LIMIT = CONFIG_LIMIT
"""The largest manifest read: a few kB in practice (the class names are a file of their own)."""


def find_manifest(path: str) -> tuple[Path, dict[str, Any]] | None:
    """The manifest of a prepared folder that `path` (the folder, or its train/val split)
    belongs to, and the folder; None for data that was not prepared (or not local). A
    raymb-data.json that is there but is not a regular file (a folder, a FIFO, a device, a link
    to nothing) is a DataError naming it, never opened."""
    if "://" in path:
        return None
    here = Path(path).expanduser()
    for folder in (here, here.parent):
        candidate = folder / MANIFEST
        if os.path.lexists(candidate):
            return folder, read_manifest(candidate)
    return None


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        # At most MANIFEST_LIMIT bytes of a regular file: a FIFO would hang the open, a device
        # such as /dev/zero would be read until memory runs out.
        data = read_bounded(path, "dataset manifest", MANIFEST_LIMIT)
    except InputError as e:
        raise DataError(str(e)) from None
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DataError(f"{path}: not a readable {MANIFEST} ({' '.join(str(e).split())})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f'{path}: not a raymb dataset manifest (no "format": "{FORMAT}")')
    if manifest.get("version") != VERSION:
        raise DataError(f"{path}: manifest version {manifest.get('version')}; expected {VERSION}")
    return manifest


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    """Write DIR/raymb-data.json atomically (format and version added)."""
    from raymb.storage import temp_sibling  # pyarrow.fs: not for a config's mere look-up

    path = Path(folder) / MANIFEST
    tmp = temp_sibling(path)
    body = {"format": FORMAT, "version": VERSION, **manifest}
    try:
        tmp.write_text(json.dumps(body, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def data_defaults(manifest: dict[str, Any]) -> dict[str, Any]:
    """The data.* keys a manifest gives a config that does not set them."""
    keys = {"features": manifest.get("features"), "task": manifest.get("task")}
    if manifest.get("label") is not None:
        keys["label"] = manifest["label"]
    if manifest.get("scale") is not None:
        keys["scale"] = float(manifest["scale"])
    if isinstance(manifest.get("inputs"), list):  # a tokenized table: input_ids, attention_mask
        keys["inputs"] = [str(c) for c in manifest["inputs"]]
    return {k: v for k, v in keys.items() if v is not None}


def describe(manifest: dict[str, Any]) -> str:
    """One line: each split's rows and files, the rows' shape, the classes or vocabulary."""
    splits = ", ".join(
        f"{name} {s['rows']} rows in {s['files']} files" for name, s in manifest["splits"].items()
    )
    if manifest.get("task") == "lm":
        what = f"vocabulary {manifest['vocab_size']} ({manifest['tokenizer']['kind']})"
    else:
        what = f"{manifest.get('num_classes')} classes"
    return f"{splits}; {manifest['features']} {manifest['dtype']} {manifest['shape']}, {what}"
