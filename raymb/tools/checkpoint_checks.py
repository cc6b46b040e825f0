"""What a model.pt must hold before anything is built from it.

A checkpoint is a file someone hands raymb eval, predict, export or sample: its fields are
checked and bounded here, each refusal one line naming the field, and a custom model
factory it names runs only with consent (--trust-model-code, RAYMB_TRUST_MODEL_CODE=1).
Nothing here imports torch at the top: raymb.tools.load.preflight runs these checks
on fields read without torch (peek), so that a refusal takes no torch import.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import reprlib
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raymb.core.shape import TASKS
from raymb.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from raymb.config import Config

_MODEL_KEYS = ("config", "in_features", "out_features", "classify", "state_dict")
TRUST_ENV = "RAYMB_TRUST_MODEL_CODE"  # =1: as --trust-model-code, for jobs


def model_code_trusted(flag: bool = False) -> bool:
    """--trust-model-code, or RAYMB_TRUST_MODEL_CODE=1 in the environment (for jobs)."""
    return flag or os.environ.get(TRUST_ENV) == "1"


def check_rebuild(
    payload: dict[str, Any],
    path: str | Path,
    *,
    trust_model_code: bool = False,
    objective: bool = False,
) -> Config:
    """Every check of a payload that needs neither torch nor its tensors: its fields, its
    config, a model it cannot rebuild (one given from Python), and consent to run code the
    file names (model.name; with `objective`, for raymb eval, loss.name and metrics.name too).
    Returns the config."""
    from raymb.config import Config
    from raymb.config.model import TRANSFORMERS

    check_payload(payload, path)
    try:
        config = Config.from_saved(payload["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: cannot rebuild its model: {e}") from None
    given = payload.get("given") or ()
    name = config.model.name
    named = isinstance(payload.get("inputs"), dict) and payload["inputs"].get("columns")
    if "model" in given or (named and name in _builtin_models()):
        # A built-in model takes one tensor: a run of named inputs with one had its model= given.
        raise CheckpointError(
            f"{path}: this checkpoint's model was given from Python (raymb.train(model=...)), "
            "so it cannot be rebuilt from the file; load its state_dict into your model: "
            f"model.load_state_dict(torch.load({str(path)!r})['state_dict'])"
        )
    if name in _builtin_models():
        _check_model_sizes(config.model, len(payload["state_dict"]), path)
    elif name != TRANSFORMERS:  # transformers' models are built from a config: no code
        _consent(path, trust_model_code, "rebuild its model", "model.name", name, "factory")
    if not objective:
        return config
    for key in ("loss", "metrics"):
        if key in given:
            raise CheckpointError(
                f"{path}: this checkpoint's {key} was given from Python (raymb.train({key}=...)),"
                f" so raymb eval cannot compute it; evaluate in Python with your {key} and "
                f"torch.load({str(path)!r})['state_dict']"
            )
    for key, value in (("loss.name", config.loss.name), ("metrics.name", config.metrics.name)):
        if value is not None and ":" in value:
            _consent(path, trust_model_code, "evaluate it", key, value, "function")
    return config


def _consent(path: str | Path, trusted: bool, doing: str, key: str, name: str, what: str) -> None:
    """Refuse to import and call the code `key` names without --trust-model-code."""
    if model_code_trusted(trusted):
        return
    raise CheckpointError(
        f"{path}: cannot {doing} without running code the file names: {key} {name!r} is a "
        f"custom {what}, imported and called; pass --trust-model-code (or set {TRUST_ENV}=1) "
        "only if you trust this checkpoint"
    )


def _builtin_models() -> tuple[str, ...]:
    from raymb.config import BUILTIN_MODELS

    return BUILTIN_MODELS


def check_payload(payload: dict[str, Any], path: str | Path) -> None:
    """Refuse a model.pt whose fields are not what model_payload writes, in one line naming
    the field, before anything is built from them."""
    missing = [k for k in _MODEL_KEYS if k not in payload]
    if missing:
        from raymb.rundir.checkpoint import MODEL_FILE

        raise CheckpointError(
            f"{path}: a raymb checkpoint without a model (no {', '.join(missing)}); "
            f"give the {MODEL_FILE} of a checkpoint directory"
        )
    for key in ("config", "inputs", "tokenizer", "given", "transformers"):
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
    given = payload.get("given")
    if given is not None and (
        not isinstance(given, (list, tuple)) or not set(given) <= {"model", "loss", "metrics"}
    ):
        _malformed(path, "given", given, "a list of model, loss, metrics")
    hf = payload.get("transformers")
    if hf is not None and not (isinstance(hf, dict) and isinstance(hf.get("model_type"), str)):
        _malformed(path, "transformers", hf, "a transformers config (a table with model_type)")
    state_dict = payload["state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) for k in state_dict):
        _malformed(path, "state_dict", state_dict, "a table of named tensors")


def check_tensors(payload: dict[str, Any], path: str | Path) -> None:
    """Refuse a state_dict value that is not a tensor, or a tensor that stores fewer values
    than it holds (the one check of a payload that needs torch)."""
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


def _check_inputs(payload: dict[str, Any], path: str | Path) -> None:
    inputs = payload["inputs"]
    if not isinstance(inputs, dict):
        _malformed(path, "inputs", inputs, "a table (task, shape, scale, mean, std)")
    task, shape = inputs.get("task"), inputs.get("shape")
    if task not in TASKS:
        _malformed(path, "inputs.task", task, " or ".join(TASKS))
    fewest = 0 if inputs.get("columns") else 1  # named inputs: their shapes are the columns'
    if (
        not isinstance(shape, (list, tuple))
        or not fewest <= len(shape) <= MAX_ROW_DIMS
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
    columns = inputs.get("columns")
    if columns is not None and not (
        isinstance(columns, (list, tuple))
        and columns
        and all(_is_column(c) for c in columns)
        and len({c[0] for c in columns}) == len(columns)
    ):
        what = f"a list of distinct [name, shape] (shapes of 0 to {MAX_ROW_DIMS} positive sizes)"
        _malformed(path, "inputs.columns", columns, what)
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


def _is_column(column: Any) -> bool:
    """[name, one row's shape] of a named input: an identifier, a shape within the bounds."""
    if not (isinstance(column, (list, tuple)) and len(column) == 2):
        return False
    name, shape = column
    return (
        isinstance(name, str)
        and name.isidentifier()
        and isinstance(shape, (list, tuple))
        and len(shape) <= MAX_ROW_DIMS
        and all(_is_int(n) and n >= 1 for n in shape)
        and math.prod(shape) <= MAX_ROW_VALUES
    )


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
