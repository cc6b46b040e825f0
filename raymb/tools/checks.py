"""What `raymb eval`, `predict`, `sample` and `export` check before they import torch: the
checkpoint's path and fields, the data's path, the numbers, and the output file. Each refusal
is one line and comes at once (torch alone takes a second or more to import); nothing here
imports torch, and nothing is written.

An input is a regular file or a folder of them (a FIFO would hang the read, a device such as
/dev/zero be read without end): the checkpoint through raymb.tools.load.preflight, the
data through raymb.data.listing.resolve_files. An output (raymb.files.check_output) replaces
no device, FIFO, socket or folder, replaces an existing file only with --force, and is not,
does not hold and does not lie inside the checkpoint's folder or the data.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence
from pathlib import Path

from raymb import storage
from raymb.errors import RaymbError
from raymb.files import check_output, same_file
from raymb.rundir.checkpoint import MODEL_FILE
from raymb.tools.load import checkpoint_folder, preflight

MAX_SAMPLE_TOKENS = 100_000
"""The most tokens one `raymb sample` draws: each runs the model once."""
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes


def check_checkpoint(checkpoint: str, *, trust_model_code: bool, objective: bool = False) -> None:
    """--checkpoint: a regular model.pt (or a folder holding one) whose fields are sound and
    whose custom model factory, if any, the user trusts; with `objective` (eval), its custom
    loss and metrics too (raymb.tools.load.preflight)."""
    preflight(checkpoint, trust_model_code=trust_model_code, objective=objective)


def check_data(data: str, what: str = "--data") -> list[str]:
    """--data (a parquet file, folder or glob), resolved as the reader will
    (raymb.data.listing.resolve_files: a FIFO, device or socket among it refused unopened, a
    path that does not exist, a glob over the whole filesystem...). Returns the local paths it
    names, for the output's checks: the path given, or a glob's files ([] for a URI: a local
    output is never in a store)."""
    from raymb.data.listing import resolve_files  # numpy and pyarrow, no torch

    files, _ = resolve_files(data, what=what)
    if storage.is_uri(data):
        return []
    path = os.path.expanduser(data)
    return [path] if os.path.lexists(path) else files


def check_out(
    out: str | Path,
    *,
    force: bool,
    checkpoint: str,
    data: Sequence[str] = (),
    example: str,
    make_parents: bool,
) -> None:
    """--out: a file path (no folder), not the checkpoint nor any input, nor inside or holding
    one; an existing file only with --force. `make_parents`: the command makes the missing
    folders above it (predict); else the folder must exist (export)."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise RaymbError(f"--out: {out} is a directory, expected a file name such as {example}")
    if not make_parents and not path.parent.is_dir():
        raise RaymbError(f"--out: {out}: no such directory {path.parent}")
    model = _model_file(checkpoint)
    if model is not None and same_file(path, model):
        raise RaymbError(
            f"--out: {out} is the checkpoint itself (--checkpoint); give another file name"
        )
    inputs: list[tuple[str | Path, str]] = []
    folder = checkpoint_folder(checkpoint)
    if folder is not None and os.path.exists(folder):  # a missing one is refused anyway
        inputs.append((folder, "--checkpoint"))
    inputs += [(d, "--data") for d in data]
    check_output(out, "--out", inputs=inputs, force=force)


def check_predict(checkpoint: str, data: str, out: str | Path, *, force: bool) -> None:
    """predict's --data and --out (the checkpoint is checked by check_checkpoint)."""
    named = check_data(data)
    check_out(
        out,
        force=force,
        checkpoint=checkpoint,
        data=named,
        example="preds.parquet",
        make_parents=True,
    )


FORMATS = ("safetensors", "onnx", "torchscript")
PACKAGES = {"safetensors": ("safetensors",), "onnx": ("onnx", "onnxruntime"), "torchscript": ()}
"""What each export format needs installed."""


def check_export(
    checkpoint: str | Path, fmt: str, out: str | Path, *, force: bool, data: str | None = None
) -> None:
    """export's --format (its packages installed, found without importing them: onnxruntime's
    import alone leaves files in the temporary folder), --data (if given) and --out."""
    if fmt not in FORMATS:
        raise RaymbError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    needed = PACKAGES[fmt]
    if not all(_installed(name) for name in needed):
        names = " and ".join(needed)
        noun = "package" if len(needed) == 1 else "packages"
        raise RaymbError(
            f"raymb export --format {fmt} needs the {names} {noun}: pip install 'raymb[export]'"
        )
    check_out(
        out,
        force=force,
        checkpoint=str(checkpoint),
        data=() if data is None else check_data(data),
        example=f"model.{fmt}",
        make_parents=False,
    )


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a module set to None, or without a spec
        return False


def check_sample(
    tokens: int, temperature: float, top_k: int | None, seed: int, prompt: str
) -> None:
    """sample's numbers and prompt, each refused in one line naming its flag."""
    if not 1 <= tokens <= MAX_SAMPLE_TOKENS:
        raise RaymbError(
            f"--tokens {tokens}: expected 1 to {MAX_SAMPLE_TOKENS} (each token runs the model once)"
        )
    if not (math.isfinite(temperature) and temperature >= 0):
        raise RaymbError(
            f"--temperature {temperature:g}: expected a finite number >= 0 (0: always the most "
            "likely token)"
        )
    if top_k is not None and top_k < 1:
        raise RaymbError(f"--top-k {top_k}: expected a positive number")
    if not 0 <= seed <= MAX_SEED:
        raise RaymbError(f"--seed {seed}: expected 0 to {MAX_SEED}")
    if not prompt:
        raise RaymbError("--prompt: empty; give at least one character to continue")


def _model_file(checkpoint: str) -> Path | None:
    folder = checkpoint_folder(checkpoint)
    if folder is None:
        return None
    given = Path(checkpoint).expanduser()
    return given if given.is_file() else folder / MODEL_FILE
