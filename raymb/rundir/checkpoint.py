"""Checkpoint files: written atomically, read with torch.load(weights_only=True).

A checkpoint directory holds `model.pt` (the unwrapped model, with what it takes to rebuild
it) and `state.pt` (optimizer, scheduler, counters, RNG: what it takes to resume). A run
directory holds `run.json`, the config it was started with, so that resuming it with a
config its checkpoints cannot load is refused before anything starts. What a model.pt must
hold before a model is built from it: raymb.tools.checkpoint_checks.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import stat
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raymb import storage
from raymb.errors import CheckpointError
from raymb.files import kind_of
from raymb.storage import Location

if TYPE_CHECKING:
    import torch

    from raymb.config import Config

MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
RUN_FILE = "run.json"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary name, then rename: a reader never sees half a file."""
    import torch  # here, not at the top: preflight and run.json need no torch

    path = Path(path)
    tmp = storage.temp_sibling(path)  # unique: two savers of one path do not collide
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed save leaves the previous file, and no debris
    _fsync_dir(path.parent)


MAX_CHECKPOINT_BYTES = 64 << 30
"""The largest checkpoint file read (64 GiB): far above a model.pt or state.pt of a model this
trainer builds on one machine; a file larger is refused before torch reads any of it."""


def read(path: str | Path | Location) -> dict[str, Any]:
    """Load a checkpoint file (a local path or a URI); a missing, truncated or foreign file is
    a CheckpointError. A local path must be a regular file (a FIFO would block the read, a
    device such as /dev/zero be read until memory runs out) of at most MAX_CHECKPOINT_BYTES,
    checked on the open file itself, which torch then reads."""
    location = path if isinstance(path, Location) else storage.resolve(path, what="checkpoint")
    if location.local:  # torch reads the file itself: no copy of it in memory
        with open_checked(location.path, path) as f:
            return _load(f, f.read(len(ZIP_MAGIC)), path)
    try:
        size = location.info().size
        if size is not None and size > MAX_CHECKPOINT_BYTES:
            raise CheckpointError(_too_large(path))
        source = io.BytesIO(location.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file not found") from None
    return _load(source, source.getvalue()[: len(ZIP_MAGIC)], path)


def open_checked(local: str, shown: Any) -> io.BufferedReader:
    """The local checkpoint file, opened without blocking, if it is a regular file of at most
    MAX_CHECKPOINT_BYTES (checked on the open file: it cannot be swapped after the check)."""
    try:
        fd = os.open(local, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(f"{shown}: checkpoint file not found") from None
    except OSError as e:
        raise CheckpointError(f"{shown}: cannot be read ({e.strerror or e})") from None
    f = os.fdopen(fd, "rb")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(
                f"{shown}: is {kind_of(st.st_mode)}, not a checkpoint file (a regular file)"
            )
        if st.st_size > MAX_CHECKPOINT_BYTES:
            raise CheckpointError(_too_large(shown))
        os.set_blocking(fd, True)
    except BaseException:
        f.close()
        raise
    return f


def _too_large(path: Any) -> str:
    return (
        f"{path}: larger than {MAX_CHECKPOINT_BYTES >> 30} GiB, the most a checkpoint file may "
        "hold; is it the right file?"
    )


def check_head(head: bytes, path: Any) -> None:
    """A checkpoint file starts as the zip archive torch.save writes."""
    if head != ZIP_MAGIC:
        what = "an empty file" if not head else "not a torch checkpoint file"
        raise CheckpointError(f"{path}: {what}, not a raymb checkpoint")


def _load(source: Any, head: bytes, path: Any) -> dict[str, Any]:
    check_head(head, path)
    source.seek(0)
    import torch

    try:
        with warnings.catch_warnings():  # torch's pickle-protocol notes are not for users
            warnings.simplefilter("ignore")
            obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        if isinstance(e, pickle.UnpicklingError):
            reason = "it holds Python objects that weights_only loading refuses"
        else:
            reason = f"truncated or corrupted: {first_sentence(e)}"
        raise CheckpointError(f"{path}: not a readable raymb checkpoint ({reason})") from None
    if not isinstance(obj, dict) or obj.get("format") != "raymb":
        raise CheckpointError(f"{path}: a torch file, but not a raymb checkpoint")
    return obj


def model_payload(
    model: torch.nn.Module,
    config: dict,
    in_features: int,
    out_features: int,
    classify: bool,
    *,
    inputs: dict | None = None,
    tokenizer: dict | None = None,
    given: tuple[str, ...] = (),
) -> dict[str, Any]:
    """What model.pt holds: enough to rebuild and load the model without the run (and, for
    a language model, to encode a prompt and decode its continuation).

    Optional keys (a checkpoint without them still loads): `given`, which of "model", "loss"
    and "metrics" came from Python (raymb.train(model=...)), not from the config, so that the
    tools say they cannot rebuild them; `transformers`, a transformers model's resolved config
    (config.to_dict()), so that it rebuilds without the folder model.config named."""
    payload = {
        "format": "raymb",
        "config": config,
        "in_features": in_features,
        "out_features": out_features,
        "classify": classify,
        "inputs": inputs,
        "tokenizer": tokenizer,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if given:
        payload["given"] = list(given)
    hf = getattr(model, "config", None)
    if config.get("model", {}).get("name") == "transformers" and hasattr(hf, "to_json_string"):
        payload["transformers"] = json.loads(hf.to_json_string(use_diff=False))  # plain values
    return payload


def load_state(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path, name: str
) -> None:
    """model.load_state_dict, with a one-line CheckpointError naming the file on a mismatch."""
    mismatch = state_mismatch(model.state_dict(), state_dict)
    if mismatch:
        raise CheckpointError(f"{path}: does not fit model {name!r} ({mismatch})")
    model.load_state_dict(state_dict)


def check_compatible(saved_config: dict, config: Config, path: str | Path) -> None:
    """Refuse `config` where a checkpoint made under `saved_config` could not be loaded."""
    if not isinstance(saved_config, dict) or not isinstance(saved_config.get("model"), dict):
        raise CheckpointError(f"{path}: not a raymb run record (no [model] in its config)")
    saved_model = saved_config["model"]
    now = config.to_dict()
    model_keys = ["model.name", *_MODEL_SHAPE_KEYS.get(saved_model.get("name"), ())]
    if saved_model.get("num_classes") is not None and now["model"]["num_classes"] is not None:
        model_keys.append("model.num_classes")  # unset: max label + 1, known from the data only
    differ = [
        k
        for k in [*model_keys, *_RUN_KEYS]
        if _get(saved_config, k, _UNKNOWN) not in (_UNKNOWN, _get(now, k, None))
    ]
    if not differ:
        return
    model_differs = any(k.startswith("model.") for k in differ)
    others = [k for k in differ if not k.startswith("model.")]
    was = f"model {_describe_model(saved_model)}"
    if others:
        was += " with " + ", ".join(f"{k}={_toml(_get(saved_config, k, None))}" for k in others)
    asks = ([f"model {_describe_model(now['model'])}"] if model_differs else []) + [
        f"{k}={_toml(_get(now, k))}" for k in others
    ]
    back = ", ".join(f"--set {k}={_toml(_get(saved_config, k, None))}" for k in differ)
    raise CheckpointError(
        f"{path}: checkpoint of {was} but the config asks for {', '.join(asks)}; "
        f"use another run.name or resume with {back}"
    )


def claim_run(run_dir: Path | Location, config: Config) -> None:
    """Record the config a run starts with in run.json, or check a resumed run against it.
    The run directory may be local or in an object store; it is made when missing."""
    if not isinstance(run_dir, Location):
        run_dir = storage.resolve(run_dir)
    path = run_dir / RUN_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        path.write_text(json.dumps({"format": "raymb", "config": config.to_dict()}, indent=2))
        return
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable raymb run record ({e})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not a readable raymb run record ({e})") from None
    if not isinstance(record, dict) or record.get("format") != "raymb":
        raise CheckpointError(f"{path}: not a raymb run record")
    check_compatible(record.get("config"), config, path)


# Keys besides the model's that a run's checkpoints depend on: the columns decide the
# model's inputs and what it learns; the sync strategy and the optimizer decide what
# state.pt and the workers' files hold. (scale.workers may change: raymb.plan.)
_RUN_KEYS = (
    "data.features",
    "data.label",
    "data.task",
    "data.inputs",
    "data.targets",
    "loss.name",
    "train.sync",
    "optim.name",
)
# The keys that shape each built-in model (the others ignore them).
_MODEL_SHAPE_KEYS = {
    "mlp": ("model.hidden",),
    "cnn": ("model.widths", "model.norm"),
    "gpt": ("model.depth", "model.width", "model.heads", "model.block_size"),
}
_UNKNOWN = object()  # a key an older run.json does not have: nothing to compare


def _get(config: dict, key: str, *default: Any) -> Any:
    section, name = key.split(".")
    try:
        return config[section][name]
    except (KeyError, TypeError):
        if default:
            return default[0]
        raise


def _describe_model(model: dict) -> str:
    text = repr(model.get("name"))
    extra = [
        f"{key.split('.')[1]} {model.get(key.split('.')[1])}"
        for key in _MODEL_SHAPE_KEYS.get(model.get("name"), ())
    ]
    if model.get("num_classes") is not None:
        extra.append(f"num_classes {model['num_classes']}")
    return text + (f" ({', '.join(extra)})" if extra else "")


def _toml(value: Any) -> str:
    """A value as --set reads it back."""
    if value is None:
        return "none"
    if isinstance(value, str):
        return repr(value)  # a TOML literal string
    if isinstance(value, list):
        return "[" + ",".join(_toml(v) for v in value) + "]"  # no space: one shell word
    return json.dumps(value)


def state_mismatch(expected: dict[str, torch.Tensor], saved: dict[str, Any]) -> str | None:
    import torch

    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            more = "..." if len(unexpected) > 3 else ""
            parts.append(f"unexpected {', '.join(unexpected[:3])}{more}")
        return "; ".join(parts)
    for k, tensor in expected.items():
        value = saved[k]
        if not isinstance(value, torch.Tensor) or value.shape != tensor.shape:
            got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            return f"{k}: checkpoint has {got}, the model {list(tensor.shape)}"
    return None


def first_sentence(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text.split(". ")[0]


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is; not every OS can open one.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
