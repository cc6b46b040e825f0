"""Checkpoint files: written atomically, read with torch.load(weights_only=True).

A checkpoint directory holds `model.pt` (the unwrapped model, with what it takes to rebuild
it) and `state.pt` (optimizer, scheduler, counters, RNG: what it takes to resume).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from raymb.errors import CheckpointError

MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary name, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file; a missing, truncated or foreign file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable raymb checkpoint ({reason})") from None
    if not isinstance(obj, dict) or "format" not in obj or obj["format"] != "raymb":
        raise CheckpointError(f"{path}: not a raymb checkpoint")
    return obj


def model_payload(
    model: torch.nn.Module, config: dict, in_features: int, out_features: int, classify: bool
) -> dict[str, Any]:
    """What model.pt holds: enough to rebuild and load the model without the run."""
    return {
        "format": "raymb",
        "config": config,
        "in_features": in_features,
        "out_features": out_features,
        "classify": classify,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model saved in model.pt (a file, or a checkpoint directory holding one)."""
    from raymb.config import Config
    from raymb.models import build_model

    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    payload = read(path)
    config = Config.from_dict(payload["config"])
    model = build_model(config.model, payload["in_features"], payload["out_features"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: does not fit model {config.model.name!r} ({str(e).splitlines()[0]})"
        ) from None
    return model, payload
