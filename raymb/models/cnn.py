"""cnn: a small ResNet for images, float rows of shape [C, H, W].

A stem (3x3 conv to widths[0]), then one residual stage per entry of `model.widths`: two
3x3 convolutions, each followed by a norm, with a skip connection around them; every stage
after the first halves the image (stride 2) and projects its skip with a 1x1 convolution.
Global average pooling and a linear head end it, so any image size works. `model.dropout`
follows each stage (raymb.models.dropout: a row's mask, any W).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from raymb.config import CnnModel
from raymb.errors import ConfigError
from raymb.models.dropout import RowDropout

GROUPS = 8
"""GroupNorm has gcd(8, channels) groups, which always divide the channels: 8 for multiples
of 8, 4 or 2 for other even widths, 1 (a LayerNorm over C, H, W) for odd ones."""


def build(section: CnnModel, shape: tuple[int, ...], out_features: int) -> nn.Module:
    if len(shape) != 3:
        raise ConfigError(
            f"model.name 'cnn' needs image rows of shape [C, H, W], got rows of shape "
            f"{list(shape)}: use a tensor column of images, or model.name = 'mlp'"
        )
    return ResNet(shape[0], list(section.widths), out_features, section.norm, section.dropout)


def norm_layer(kind: str, channels: int) -> nn.Module:
    """BatchNorm2d (statistics of the microbatch) or GroupNorm (of each sample: exact)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(math.gcd(GROUPS, channels), channels)


class Residual(nn.Module):
    """conv-norm-ReLU, conv-norm, plus the skip, then ReLU (then dropout, if any)."""

    def __init__(
        self, cin: int, cout: int, stride: int, norm: str, dropout: float = 0.0, stream: int = 0
    ) -> None:
        super().__init__()
        self.drop = RowDropout(dropout, stream)  # no parameters: no checkpoint keys
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm_layer(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = norm_layer(norm, cout)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), norm_layer(norm, cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.drop(F.relu(y + self.skip(x)))


class ResNet(nn.Module):
    def __init__(
        self, channels: int, widths: list[int], out_features: int, norm: str, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(channels, widths[0], 3, padding=1, bias=False),
            norm_layer(norm, widths[0]),
            nn.ReLU(),
        )
        stages, cin = [], widths[0]
        for i, cout in enumerate(widths):
            stages.append(Residual(cin, cout, 1 if i == 0 else 2, norm, dropout, stream=i + 1))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(widths[-1], out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))  # global average pool
