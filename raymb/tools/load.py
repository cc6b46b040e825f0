"""Rebuilding a saved model: model.pt's payload checked (raymb.tools.checkpoint_checks: its
fields and shapes, and the consent a custom factory needs), the model built and its tensors
loaded. The run directory's file format itself is raymb.rundir.checkpoint; the tools (eval,
predict, sample, export) and `raymb train`'s closing line rebuild through here."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raymb import storage
from raymb.config.model import TRANSFORMERS
from raymb.core.shape import InputShape
from raymb.errors import CheckpointError, ConfigError
from raymb.rundir.checkpoint import (
    MODEL_FILE,
    ZIP_MAGIC,
    check_head,
    first_sentence,
    load_state,
    open_checked,
    read,
    state_mismatch,
)
from raymb.tools.checkpoint_checks import check_rebuild, check_tensors, peek

if TYPE_CHECKING:
    import torch


def payload_inputs(payload: dict[str, Any]) -> InputShape:
    """The model's inputs, stored as InputShape.to_dict (a checkpoint from before tensor
    columns has none: flat rows of in_features)."""
    if payload.get("inputs"):
        return InputShape.from_dict(payload["inputs"])
    task = "classify" if payload["classify"] else "regress"
    return InputShape(task=task, shape=(payload["in_features"],))


def load_model(
    path: str | Path, *, trust_model_code: bool = False, objective: bool = False
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model saved in model.pt (a file, or a checkpoint directory holding one).

    A custom model.name (package.module:factory) is imported and called only when
    `trust_model_code` or RAYMB_TRUST_MODEL_CODE=1 says so: the file chose the code. With
    `objective` (raymb eval), loss.name and metrics.name of that kind ask for it too.
    """
    payload = read(model_file(path))
    model = build_from_payload(
        payload, path, trust_model_code=trust_model_code, objective=objective
    )
    return model, payload


def model_file(path: str | Path) -> str | Path:
    """The model.pt of --checkpoint: the file given, or the one in the directory given."""
    if not storage.resolve(path, what="--checkpoint").is_dir():
        return path
    if storage.is_uri(path):
        return f"{str(path).rstrip('/')}/{MODEL_FILE}"
    return Path(path) / MODEL_FILE


def build_from_payload(
    payload: dict[str, Any],
    path: str | Path,
    *,
    trust_model_code: bool = False,
    objective: bool = False,
) -> torch.nn.Module:
    """The model a checked payload describes, its saved tensors loaded (see load_model)."""
    from raymb.config import BUILTIN_MODELS
    from raymb.models import build_model

    config = check_rebuild(payload, path, trust_model_code=trust_model_code, objective=objective)
    check_tensors(payload, path)
    name = config.model.name
    shape = payload_inputs(payload).model_shape
    state_dict = payload["state_dict"]
    if name in BUILTIN_MODELS:
        try:
            with _shapes_only():  # a model the tensors do not fit is never made
                probe = build_model(config.model, shape, payload["out_features"])
        except ConfigError as e:
            raise CheckpointError(f"{path}: cannot rebuild its model: {e}") from None
        mismatch = state_mismatch(probe.state_dict(), state_dict)
        if mismatch:
            raise CheckpointError(f"{path}: does not fit model {name!r} ({mismatch})")
        model = build_model(config.model, shape, payload["out_features"])
    else:
        try:
            model = _build_own(config, payload, shape)
        except ConfigError as e:
            hint = ""
            if name == TRANSFORMERS:
                hint = (
                    " (this checkpoint holds no transformers config: model.config must be "
                    "readable here)"
                )
            raise CheckpointError(f"{path}: cannot rebuild its model: {e}{hint}") from None
        except Exception as e:  # the factory is the user's code: any error, in one line
            raise CheckpointError(
                f"{path}: cannot rebuild its model: {name!r} raised {type(e).__name__}: "
                f"{first_sentence(e)}"
            ) from None
    load_state(model, state_dict, path, name)
    return model


def _build_own(config: Any, payload: dict[str, Any], shape: Any) -> torch.nn.Module:
    """A transformers model (from the config the checkpoint stores, else from model.config)
    or a factory of your own: called as factory({column: shape}, out_features) for named
    inputs, as the run's workers called it (raymb.worker.worker.build_run_model)."""
    from torch import nn

    from raymb.models import build_model, hf, load_factory

    out_features = payload["out_features"]
    if config.model.name == TRANSFORMERS:
        if payload.get("transformers") is not None:
            return hf.build_saved(config.model, payload["transformers"])
        if isinstance(shape, dict):  # the model reads rows of input_ids
            shape = shape.get("input_ids", next(iter(shape.values())))
        return build_model(config.model, shape, out_features)
    if not isinstance(shape, dict):
        return build_model(config.model, shape, out_features)
    model = load_factory(config.model.name)(shape, out_features)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.name {config.model.name!r} returned {type(model).__name__}, not a "
            "torch.nn.Module"
        )
    return model


def preflight(
    path: str | Path, *, trust_model_code: bool = False, objective: bool = False
) -> Path | None:
    """What load_model refuses before it builds, without importing torch: a local path that
    is missing, is no regular file (a FIFO, a device: never opened), or a folder without a
    model.pt that is one, or is larger than MAX_CHECKPOINT_BYTES; then the fields and the
    consent (check_rebuild). The tools call it first, so that a refusal takes no torch import.
    A file whose fields it cannot read this way is left to load_model. Returns the local
    model.pt (None for a URI)."""
    if storage.is_uri(path):
        return None
    given = Path(path).expanduser()
    model = given / MODEL_FILE if given.is_dir() else given
    shown = model if model is not given else path
    with open_checked(str(model), shown) as f:  # checked, then closed: peek opens it by name
        check_head(f.read(len(ZIP_MAGIC)), shown)
    payload = peek(model)
    if payload is not None:
        check_rebuild(payload, shown, trust_model_code=trust_model_code, objective=objective)
    return model


def checkpoint_folder(path: str | Path) -> Path | None:
    """What an output must not be, hold or lie inside, for --checkpoint PATH: a checkpoint
    directory (PATH itself, or the folder of a model.pt given as PATH, which holds its
    state.pt too), or else the file given. None for a URI."""
    if storage.is_uri(path):
        return None
    given = Path(path).expanduser()
    return given.parent if given.name == MODEL_FILE and not given.is_dir() else given


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
