"""linear and mlp: dense layers on flat features (an image row is flattened first)."""

from __future__ import annotations

import math

from torch import nn

from raymb.config import LinearModel, MlpModel


def build(section: LinearModel | MlpModel, shape: tuple[int, ...], out_features: int) -> nn.Module:
    """`model.name` linear or mlp (`model.hidden`) for rows of `shape`."""
    in_features = math.prod(shape)
    layers: list[nn.Module] = []
    width = in_features
    if section.name == "mlp":
        for hidden in section.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
    layers.append(nn.Linear(width, out_features))
    if len(shape) > 1:
        # A tensor row ([C, H, W]): flattened. Flat rows keep the modules (and the
        # checkpoint keys) they have always had.
        layers.insert(0, nn.Flatten())
    if section.name == "linear" and len(layers) == 1:
        return layers[0]
    return nn.Sequential(*layers)
