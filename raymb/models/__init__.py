"""Model zoo: linear, mlp, or a user's own `package.module:factory`, and the task's loss."""

from __future__ import annotations

import importlib

import torch
from torch import nn

from raymb.config import ModelSection
from raymb.errors import ConfigError


def build_model(section: ModelSection, in_features: int, out_features: int) -> nn.Module:
    """The model of `model.name` for d inputs and the task's outputs (1, or the classes)."""
    if section.name == "linear":
        return nn.Linear(in_features, out_features)
    if section.name == "mlp":
        layers: list[nn.Module] = []
        width = in_features
        for hidden in section.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, out_features))
        return nn.Sequential(*layers)
    factory = load_factory(section.name)
    model = factory(in_features, out_features)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.name {section.name!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def load_factory(name: str):
    """Import `package.module:factory`, with an error naming model.name when it fails."""
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"model.name {name!r}: cannot import {module_name!r} ({e})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"model.name {name!r}: {module_name} has no callable {attr!r}")
    return factory


def summed_loss(output: torch.Tensor, target: torch.Tensor, classify: bool) -> torch.Tensor:
    """Sum over the microbatch of the per-sample loss: cross-entropy, or squared error."""
    if classify:
        return nn.functional.cross_entropy(output, target, reduction="sum")
    return nn.functional.mse_loss(output.reshape(target.shape), target, reduction="sum")


def correct(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Number of argmax predictions equal to the label."""
    return (output.argmax(dim=-1) == target).sum()
