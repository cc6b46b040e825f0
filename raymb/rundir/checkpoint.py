"""Checkpoint files: written atomically, read with torch.load(weights_only=True).

A checkpoint directory holds `model.pt` (the unwrapped model, with what it takes to rebuild
it) and `state.pt` (optimizer, scheduler, counters, RNG: what it takes to resume). A run
directory holds `run.json`, the config it was started with, so that resuming it with a
config its checkpoints cannot load is refused before anything starts.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import reprlib
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raymb.errors import CheckpointError, ConfigError
from raymb.rundir import storage
from raymb.rundir.storage import Location

if TYPE_CHECKING:
    import torch

    from raymb.config import Config
    from raymb.data.columns import Inputs

MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
RUN_FILE = "run.json"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
_MODEL_KEYS = ("config", "in_features", "out_features", "classify", "state_dict")
TRUST_ENV = "RAYMB_TRUST_MODEL_CODE"  # =1: as --trust-model-code, for jobs


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


def read(path: str | Path | Location) -> dict[str, Any]:
    """Load a checkpoint file (a local path or a URI); a missing, truncated or foreign file is
    a CheckpointError."""
    location = path if isinstance(path, Location) else storage.resolve(path, what="checkpoint")
    try:
        if location.local:  # torch reads the file itself: no copy of it in memory
            source: Any = Path(location.path)
            with open(source, "rb") as f:
                head = f.read(len(_ZIP_MAGIC))
        else:
            source = io.BytesIO(location.read_bytes())
            head = source.getvalue()[: len(_ZIP_MAGIC)]
    except (FileNotFoundError, IsADirectoryError):
        raise CheckpointError(f"{path}: checkpoint file not found") from None
    if head != _ZIP_MAGIC:
        what = "an empty file" if not head else "not a torch checkpoint file"
        raise CheckpointError(f"{path}: {what}, not a raymb checkpoint")
    import torch

    try:
        with warnings.catch_warnings():  # torch's pickle-protocol notes are not for users
            warnings.simplefilter("ignore")
            obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        if isinstance(e, pickle.UnpicklingError):
            reason = "it holds Python objects that weights_only loading refuses"
        else:
            reason = f"truncated or corrupted: {_first_sentence(e)}"
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
) -> dict[str, Any]:
    """What model.pt holds: enough to rebuild and load the model without the run (and, for
    a language model, to encode a prompt and decode its continuation)."""
    return {
        "format": "raymb",
        "config": config,
        "in_features": in_features,
        "out_features": out_features,
        "classify": classify,
        "inputs": inputs,
        "tokenizer": tokenizer,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def payload_inputs(payload: dict[str, Any]) -> Inputs:
    """The model's raymb.columns.Inputs (a checkpoint from before tensor columns: flat)."""
    from raymb.data.columns import Inputs

    if payload.get("inputs"):
        return Inputs.from_dict(payload["inputs"])
    task = "classify" if payload["classify"] else "regress"
    return Inputs(task=task, shape=(payload["in_features"],))


def load_model(
    path: str | Path, *, trust_model_code: bool = False
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model saved in model.pt (a file, or a checkpoint directory holding one).

    A custom model.name (package.module:factory) is imported and called only when
    `trust_model_code` or RAYMB_TRUST_MODEL_CODE=1 says so: the file chose the code.
    """
    if storage.resolve(path, what="--checkpoint").is_dir():
        path = (
            f"{str(path).rstrip('/')}/{MODEL_FILE}"
            if storage.is_uri(path)
            else Path(path) / MODEL_FILE
        )
    payload = read(path)
    return build_from_payload(payload, path, trust_model_code=trust_model_code), payload


def model_code_trusted(flag: bool = False) -> bool:
    """--trust-model-code, or RAYMB_TRUST_MODEL_CODE=1 in the environment (for jobs)."""
    return flag or os.environ.get(TRUST_ENV) == "1"


def build_from_payload(
    payload: dict[str, Any], path: str | Path, *, trust_model_code: bool = False
) -> torch.nn.Module:
    """The model a checked payload describes, its saved tensors loaded (see load_model)."""
    from raymb.models import build_model

    config = check_rebuild(payload, path, trust_model_code=trust_model_code)
    _check_tensors(payload, path)
    name = config.model.name
    shape = payload_inputs(payload).model_shape
    state_dict = payload["state_dict"]
    if name in _builtin_models():
        try:
            with _shapes_only():  # a model the tensors do not fit is never made
                probe = build_model(config.model, shape, payload["out_features"])
        except ConfigError as e:
            raise CheckpointError(f"{path}: cannot rebuild its model: {e}") from None
        mismatch = _mismatch(probe.state_dict(), state_dict)
        if mismatch:
            raise CheckpointError(f"{path}: does not fit model {name!r} ({mismatch})")
        model = build_model(config.model, shape, payload["out_features"])
    else:
        try:
            model = build_model(config.model, shape, payload["out_features"])
        except ConfigError as e:
            raise CheckpointError(f"{path}: cannot rebuild its model: {e}") from None
        except Exception as e:  # the factory is the user's code: any error, in one line
            raise CheckpointError(
                f"{path}: cannot rebuild its model: {name!r} raised {type(e).__name__}: "
                f"{_first_sentence(e)}"
            ) from None
    load_state(model, state_dict, path, name)
    return model


def check_rebuild(
    payload: dict[str, Any], path: str | Path, *, trust_model_code: bool = False
) -> Config:
    """Every check of a payload that needs neither torch nor its tensors: its fields, its
    config, and consent to run a custom factory. Returns the config."""
    from raymb.config import Config

    check_payload(payload, path)
    try:
        config = Config.from_saved(payload["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: cannot rebuild its model: {e}") from None
    name = config.model.name
    if name in _builtin_models():
        _check_model_sizes(config.model, len(payload["state_dict"]), path)
    elif not model_code_trusted(trust_model_code):
        raise CheckpointError(
            f"{path}: cannot rebuild its model without running code the file names: "
            f"model.name {name!r} is a custom factory, imported and called; pass "
            f"--trust-model-code (or set {TRUST_ENV}=1) only if you trust this checkpoint"
        )
    return config


def preflight(path: str | Path, *, trust_model_code: bool = False) -> None:
    """What load_model refuses before it builds (check_rebuild), without importing torch:
    the tools call it first, so that a refusal takes no torch import. A file it cannot
    read this way is left to load_model."""
    if storage.is_uri(path):
        return
    path = Path(path) / MODEL_FILE if Path(path).is_dir() else Path(path)
    payload = peek(path)
    if payload is not None:
        check_rebuild(payload, path, trust_model_code=trust_model_code)


def peek(path: Path) -> dict[str, Any] | None:
    """A local raymb checkpoint's fields, read without torch (tensors as placeholders), or
    None if it is not one. Nothing is imported or called: every class is a placeholder."""
    try:
        with zipfile.ZipFile(path) as archive:
            (entry,) = [i for i in archive.infolist() if i.filename.endswith("/data.pkl")]
            if entry.file_size > _PEEK_LIMIT:
                return None
            obj = _Peeker(io.BytesIO(archive.read(entry))).load()
    except Exception:  # anything unusual: load_model's own reading decides
        return None
    return obj if isinstance(obj, dict) and obj.get("format") == "raymb" else None


_PEEK_LIMIT = 64 << 20  # the pickle of a model.pt is small: its tensors are stored apart


class _Placeholder:
    """What every class or function a pickle names becomes in peek (made, called or given
    state, it stays a placeholder)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Placeholder:
        return _Placeholder()

    def __setstate__(self, state: Any) -> None:
        pass


class _Peeker(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return dict  # a state_dict: its names are kept
        return _Placeholder

    def persistent_load(self, pid: Any) -> Any:
        return _Placeholder()


def _shapes_only() -> contextlib.ExitStack:
    """Modules made on the meta device (shapes, no memory), nn.init's fills skipped: on
    meta tensors some of them import torch._dynamo, which takes seconds."""
    import torch
    from torch.overrides import TorchFunctionMode

    class SkipInit(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__module__", None) == "torch.nn.init":
                return args[0] if args else kwargs["tensor"]
            return func(*args, **(kwargs or {}))

    stack = contextlib.ExitStack()
    stack.enter_context(torch.device("meta"))
    stack.enter_context(SkipInit())
    return stack


def _builtin_models() -> tuple[str, ...]:
    from raymb.config import BUILTIN_MODELS

    return BUILTIN_MODELS


def check_payload(payload: dict[str, Any], path: str | Path) -> None:
    """Refuse a model.pt whose fields are not what model_payload writes, in one line naming
    the field, before anything is built from them."""
    missing = [k for k in _MODEL_KEYS if k not in payload]
    if missing:
        raise CheckpointError(
            f"{path}: a raymb checkpoint without a model (no {', '.join(missing)}); "
            f"give the {MODEL_FILE} of a checkpoint directory"
        )
    for key in ("config", "inputs", "tokenizer"):
        if _count_values(payload.get(key)) > _MAX_VALUES:  # before anything walks or shows it
            raise CheckpointError(
                f"{path}: malformed checkpoint: {key} holds more than {_MAX_VALUES} values"
            )
    config = payload["config"]
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        _malformed(path, "config", config, "a table with a [model] table")
    _check_count(payload, "in_features", MAX_ROW_VALUES, path)
    _check_count(payload, "out_features", MAX_OUTPUTS, path)
    if not isinstance(payload["classify"], bool):
        _malformed(path, "classify", payload["classify"], "true or false")
    if payload.get("inputs") is not None:
        _check_inputs(payload, path)
    if payload.get("tokenizer") is not None and not isinstance(payload["tokenizer"], dict):
        _malformed(path, "tokenizer", payload["tokenizer"], "a tokenizer spec (a table)")
    state_dict = payload["state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) for k in state_dict):
        _malformed(path, "state_dict", state_dict, "a table of named tensors")


def _check_tensors(payload: dict[str, Any], path: str | Path) -> None:
    import torch

    state_dict = payload.get("state_dict")
    if not isinstance(state_dict, dict):
        return  # check_payload names it
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            _malformed(path, f"state_dict[{key!r}]", tensor, "a tensor")
        # A view that repeats a few stored values (stride 0) would fit a model far larger
        # than the file: what a tensor holds must be stored.
        if tensor.untyped_storage().nbytes() < tensor.numel() * tensor.element_size():
            _malformed(path, f"state_dict[{key!r}]", list(tensor.shape), "as many values stored")


# Bounds on what a checkpoint may ask to be built: far above any model raymb trains, far
# below what a crafted file would make torch try to allocate.
MAX_ROW_VALUES = 2**30
"""Values in one row (in_features, the product of inputs.shape)."""
MAX_OUTPUTS = 2**24
"""Outputs of a model: classes, or the vocabulary of a language model."""
MAX_ROW_DIMS = 4
TASKS = ("classify", "regress", "lm")


def _check_inputs(payload: dict[str, Any], path: str | Path) -> None:
    inputs = payload["inputs"]
    if not isinstance(inputs, dict):
        _malformed(path, "inputs", inputs, "a table (task, shape, scale, mean, std)")
    task, shape = inputs.get("task"), inputs.get("shape")
    if task not in TASKS:
        _malformed(path, "inputs.task", task, " or ".join(TASKS))
    if (
        not isinstance(shape, (list, tuple))
        or not 1 <= len(shape) <= MAX_ROW_DIMS
        or not all(_is_int(n) and n >= 1 for n in shape)
    ):
        _malformed(path, "inputs.shape", shape, f"a list of 1 to {MAX_ROW_DIMS} positive integers")
    values = math.prod(shape)
    if values > MAX_ROW_VALUES:
        _malformed(path, "inputs.shape", shape, f"at most {MAX_ROW_VALUES} values per row")
    if task == "lm" and (len(shape) != 1 or shape[0] < 2):
        _malformed(path, "inputs.shape", shape, "[T + 1] for token blocks of T >= 1 tokens")
    if values != payload["in_features"]:
        _malformed(path, "in_features", payload["in_features"], f"{values}, as inputs.shape holds")
    if payload["classify"] != (task != "regress"):
        _malformed(path, "classify", payload["classify"], f"{task != 'regress'} for task {task}")
    scale = inputs.get("scale")
    if scale is not None and not _finite(scale):
        _malformed(path, "inputs.scale", scale, "a finite number")
    mean, std = inputs.get("mean"), inputs.get("std")
    if mean is None and std is None:
        return
    for key, value in (("inputs.mean", mean), ("inputs.std", std)):
        if (
            not isinstance(value, (list, tuple))
            or len(value) not in (1, shape[0])
            or not all(_finite(v) for v in value)
        ):
            what = f"a list of 1 or {shape[0]} finite numbers, with the other of mean and std"
            _malformed(path, key, value, what)
    if len(mean) != len(std) or not all(s > 0 for s in std):
        _malformed(path, "inputs.std", std, f"{len(mean)} positive numbers, one per mean")


def _check_count(payload: dict[str, Any], key: str, limit: int, path: str | Path) -> None:
    value = payload[key]
    if not _is_int(value) or not 1 <= value <= limit:
        _malformed(path, key, value, f"a whole number from 1 to {limit}")


def _check_model_sizes(section: Any, tensors: int, path: str | Path) -> None:
    """A built-in model's sizes within MAX_ROW_VALUES; and, since each layer, stage or block
    holds tensors, no more of them than the file has tensors (building that many, even as
    shapes alone, would run on)."""
    # [model] holds the chosen family's keys only (raymb.config.model).
    lists = [k for k in ("hidden", "widths") if hasattr(section, k)]
    single = [k for k in ("width", "heads", "block_size") if hasattr(section, k)]
    sizes = {k: getattr(section, k) for k in lists} | {k: [getattr(section, k)] for k in single}
    for key, values in sizes.items():
        if any(v is not None and v > MAX_ROW_VALUES for v in values):
            value = values if key in lists else values[0]
            _malformed(path, f"model.{key}", value, f"sizes of at most {MAX_ROW_VALUES}")
    layers = {"mlp": "hidden", "cnn": "widths", "gpt": "depth"}
    key = layers.get(section.name)
    count = 0 if key is None else getattr(section, key)
    count = len(count) if isinstance(count, (list, tuple)) else count
    if count > tensors:
        raise CheckpointError(
            f"{path}: does not fit model {section.name!r} (model.{key} asks for {count} "
            f"layers; the checkpoint holds {tensors} tensors)"
        )


_MAX_VALUES = 100_000
"""Values (nested included) in a payload's config, inputs or tokenizer; a run's hold ~100."""


def _count_values(value: Any) -> int:
    """How many values `value` holds, nested ones counted each time they appear (a pickle
    can nest one list in itself many times over), up to just past _MAX_VALUES."""
    stack, count = [value], 0
    while stack and count <= _MAX_VALUES:
        value = stack.pop()
        count += 1
        if isinstance(value, dict):
            stack += [*value.keys(), *value.values()]
        elif isinstance(value, (list, tuple)):
            stack += value
    return count


def _malformed(path: str | Path, key: str, value: Any, expected: str) -> None:
    shown = _SHORT.repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise CheckpointError(f"{path}: malformed checkpoint: {key} is {shown}, expected {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_SHORT = reprlib.Repr()  # a value in a message: a few items and levels, however large it is
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring = 2, 4, 4, 40


def _finite(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past any float
        return False


def load_state(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path, name: str
) -> None:
    """model.load_state_dict, with a one-line CheckpointError naming the file on a mismatch."""
    mismatch = _mismatch(model.state_dict(), state_dict)
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
_RUN_KEYS = ("data.features", "data.label", "data.task", "train.sync", "optim.name")
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


def _mismatch(expected: dict[str, torch.Tensor], saved: dict[str, Any]) -> str | None:
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


def _first_sentence(e: BaseException) -> str:
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
