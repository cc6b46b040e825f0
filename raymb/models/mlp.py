"""linear and mlp: dense layers on flat features (an image row is flattened first); the mlp's
`model.dropout` follows each hidden ReLU (raymb.models.dropout: a row's mask, any W)."""

from __future__ import annotations

import math

from torch import nn

from raymb.config import LinearModel, MlpModel
from raymb.models.dropout import RowDropout


def build(section: LinearModel | MlpModel, shape: tuple[int, ...], out_features: int) -> nn.Module:
    """`model.name` linear or mlp (`model.hidden`) for rows of `shape`."""
    in_features = math.prod(shape)
    layers: list[nn.Module] = []
    width = in_features
    if section.name == "mlp":
        for i, hidden in enumerate(section.hidden):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if section.dropout > 0:  # only then: the checkpoint keys stay as they were
                layers.append(RowDropout(section.dropout, stream=i + 1))
            width = hidden
    layers.append(nn.Linear(width, out_features))
    if len(shape) > 1:
        # A tensor row ([C, H, W]): flattened. Flat rows keep the modules (and the
        # checkpoint keys) they have always had.
        layers.insert(0, nn.Flatten())
    if section.name == "linear" and len(layers) == 1:
        return layers[0]
    return nn.Sequential(*layers)
