"""model.init_from: a pretrained start; model.freeze: parameters trained no further.

`init_from` names a raymb checkpoint (its folder or model.pt), a .safetensors file, or a
Hugging Face model folder (model.safetensors, else pytorch_model.bin). Its tensors are matched
to the built model's state_dict by name: a base model's weights go into a model with a head
(all-MiniLM's `embeddings.*` into BertForSequenceClassification's `bert.embeddings.*`) by
adding the model's base_model_prefix. Every shape must fit; a key missing from the file, or one
the model lacks, is refused unless model.init_allow_missing / init_allow_unexpected names it.
A tied weight is loaded through any of its names, and non-persistent buffers are no keys.

Two entry points. `check_init` reads only the file's names and shapes (the safetensors
header; a torch file's pickle, its tensors on the meta device) and checks them against a model
built on the meta device or the CPU: the driver calls it before Ray starts. `apply_init` runs
on every worker after the model is built: with load=True (rank 0) it reads the file once, into
CPU memory, and copies its tensors in; every rank freezes. DDP's first broadcast gives the
other ranks rank 0's values, so the file is read once a run.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import warnings
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raymb.config import Model
from raymb.errors import ConfigError
from raymb.files import InputError, check_input, kind_of

__all__ = ["apply_init", "check_init"]

KEY = "model.init_from"
RAYMB_FILE = "model.pt"  # a raymb checkpoint folder's model (raymb.rundir.checkpoint)
HF_FILES = ("model.safetensors", "pytorch_model.bin")
MAX_BYTES = 64 << 30
"""The largest file read: raymb's own bound on a checkpoint file (rundir.checkpoint)."""
MAX_HEADER = 100 << 20
"""The largest safetensors header (its JSON index of names, dtypes and shapes)."""
Shapes = dict[str, tuple[int, ...]]


def check_init(model: nn.Module, section: Model) -> None:
    """Everything apply_init would refuse, from the file's names and shapes alone: the
    path, each shape, the missing and unexpected keys, the freeze patterns. `model` may be
    built on the meta device. ConfigError, one line, naming the key."""
    if section.init_from is not None:
        path = source(section.init_from)
        _match(model, section, read_shapes(path), path)
    _frozen(model, section.freeze)


def apply_init(model: nn.Module, section: Model, *, load: bool) -> None:
    """With `load` (rank 0; not on resuming from a checkpoint), init_from's tensors copied into
    the built model; then model.freeze's parameters set requires_grad = False (every rank).
    Before DDP wraps the model and before the optimizer is made."""
    if load and section.init_from is not None:
        path = source(section.init_from)
        tensors = read_tensors(path)
        names = _match(model, section, {k: tuple(t.shape) for k, t in tensors.items()}, path)
        state = model.state_dict()  # detached views of the parameters and buffers
        with torch.no_grad():
            for file_key, key in names.items():
                state[key].copy_(tensors[file_key])
    for parameter in _frozen(model, section.freeze):
        parameter.requires_grad_(False)


def source(given: str) -> Path:
    """The file init_from names: itself, or a folder's model.pt, model.safetensors or
    pytorch_model.bin; stat-checked (a FIFO or a device is never opened)."""
    try:
        if not stat.S_ISDIR(check_input(given, KEY, folder_ok=True).st_mode):
            return Path(given)
        for name in (RAYMB_FILE, *HF_FILES):
            path = Path(given, name)
            if os.path.lexists(path):
                check_input(path, KEY)
                return path
    except InputError as e:
        raise ConfigError(str(e)) from None
    if os.path.lexists(Path(given, "model.safetensors.index.json")):
        raise ConfigError(
            f"{KEY} {given}: a sharded model (model.safetensors.index.json) is not read; give "
            "a folder with one model.safetensors"
        )
    raise ConfigError(
        f"{KEY} {given}: a folder with no {RAYMB_FILE} (a raymb checkpoint), "
        f"{' or '.join(HF_FILES)} (a Hugging Face model)"
    )


def read_shapes(path: Path) -> Shapes:
    """The names and shapes of the file's tensors, their values unread."""
    with _open(path) as f:
        if path.suffix == ".safetensors":
            header = _safetensors_header(f, path)
            return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
        return {k: tuple(t.shape) for k, t in _torch_state(f, path, "meta").items()}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors, read into CPU memory (no mapping of a file that may be replaced)."""
    with _open(path) as f:
        if path.suffix != ".safetensors":
            return _torch_state(f, path, "cpu")
        _safetensors_header(f, path)  # a clear refusal before safetensors' own
        f.seek(0)
        data = f.read()
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load
    except ImportError:
        raise ConfigError(
            f"{KEY} {path}: reading it needs safetensors: pip install safetensors"
        ) from None

    try:
        return load(data)
    except SafetensorError as e:
        raise ConfigError(f"{KEY} {path}: not a readable safetensors file ({e})") from None


def _open(path: Path) -> Any:
    """The file, opened without blocking and checked on the open descriptor: a regular file
    of at most MAX_BYTES (a FIFO swapped in after source's check cannot hold the read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ConfigError(f"{KEY} {path}: cannot be read ({e.strerror or e})") from None
    f = os.fdopen(fd, "rb")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BYTES:
        f.close()
        what = kind_of(st.st_mode) if not stat.S_ISREG(st.st_mode) else "larger than 64 GiB"
        raise ConfigError(f"{KEY} {path}: is {what}, not a file of weights")
    os.set_blocking(fd, True)
    return f


def _safetensors_header(f: Any, path: Path) -> dict[str, Any]:
    """A safetensors file's header: 8 bytes of its length, then JSON of name: dtype, shape."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    header = None
    if 0 < n <= min(size - 8, MAX_HEADER):
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
    if not isinstance(header, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("shape"), list)
        for k, v in header.items()
        if k != "__metadata__"
    ):
        raise ConfigError(f"{KEY} {path}: not a safetensors file (its header cannot be read)")
    return header


def _torch_state(f: Any, path: Path, device: str) -> dict[str, torch.Tensor]:
    """A torch file's state dict: a raymb model.pt's, or the file itself (pytorch_model.bin),
    loaded with weights_only (no code a file names is run)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(f, map_location=device, weights_only=True)
    except Exception as e:  # torch raises several types for foreign or truncated files
        why = "it holds Python objects" if isinstance(e, pickle.UnpicklingError) else "truncated?"
        raise ConfigError(f"{KEY} {path}: not a readable torch file of weights ({why})") from None
    if isinstance(obj, dict) and obj.get("format") == "raymb":
        obj = obj.get("state_dict")
    if not isinstance(obj, dict) or not obj:
        raise ConfigError(f"{KEY} {path}: holds no tensors by name (a state dict)")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ConfigError(f"{KEY} {path}: {key!r} is not a named tensor")
    return obj


def _match(model: nn.Module, section: Model, shapes: Shapes, path: Path) -> dict[str, str]:
    """The model's key each of the file's keys loads into; ConfigError for a shape that does
    not fit, or a key missing or unexpected that no allow pattern names."""
    expected = model.state_dict(keep_vars=True)  # keep_vars: a tied weight is one object
    names = _renamed(model, expected, shapes)
    for file_key, key in names.items():
        if key in expected and tuple(expected[key].shape) != shapes[file_key]:
            raise ConfigError(
                f"{KEY} {path}: {file_key} has shape {list(shapes[file_key])} in the file, "
                f"{list(expected[key].shape)} in the model"
            )
    # A buffer the model computes itself (non-persistent: position_ids) is in no state_dict,
    # though older files hold it: not a key to load, nor an unexpected one.
    own = expected.keys() | {name for name, _ in model.named_buffers(remove_duplicate=False)}
    loaded = {id(expected[k]) for k in names.values() if k in expected}
    missing = [
        k
        for k, t in expected.items()
        if id(t) not in loaded and not _named(k, section.init_allow_missing)
    ]
    if missing:
        raise ConfigError(
            f"{KEY} {path}: the model's {missing[0]} is not in the file ({len(missing)} missing "
            f'keys); to leave them as built, set model.init_allow_missing = ["{_group(missing)}"]'
        )
    unexpected = [
        f
        for f, k in names.items()
        if k not in own
        and not _named(f, section.init_allow_unexpected)
        and not _named(k, section.init_allow_unexpected)
    ]
    if unexpected:
        raise ConfigError(
            f"{KEY} {path}: {unexpected[0]} is not a key of the model ({len(unexpected)} "
            "unexpected keys); to leave them unread, set model.init_allow_unexpected = "
            f'["{_group(unexpected)}"]'
        )
    return {f: k for f, k in names.items() if k in expected}


def _renamed(model: nn.Module, expected: dict[str, Any], shapes: Shapes) -> dict[str, str]:
    """file key -> model key: a base model's keys into a model with a head get the head
    model's base_model_prefix (transformers' rule), every other key stays as it is."""
    prefix = getattr(model, "base_model_prefix", "")
    if isinstance(prefix, str) and prefix:
        dotted = prefix + "."
        ours = any(k.startswith(dotted) for k in expected)
        if ours and not any(k.startswith(dotted) for k in shapes):
            return {k: dotted + k for k in shapes}
    return {k: k for k in shapes}


def _frozen(model: nn.Module, patterns: list[str]) -> list[nn.Parameter]:
    """The parameters model.freeze names (a tied one under any of its names); ConfigError
    for a pattern that names none."""
    named = list(model.named_parameters(remove_duplicate=False))
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name, _ in named):
            first = ", ".join(name for name, _ in named[:3])
            raise ConfigError(
                f"model.freeze pattern {pattern!r} matches no parameter of the model "
                f"(its names read {first}, ...)"
            )
    return [p for name, p in named if _named(name, patterns)]


def _named(key: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(key, pattern) for pattern in patterns)


def _group(keys: list[str]) -> str:
    """A pattern for the first key's module: classifier.weight -> classifier.*"""
    head, dot, _ = keys[0].rpartition(".")
    return f"{head}.*" if dot else keys[0]
