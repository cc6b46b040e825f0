"""[data.augment]: random flips, crops, rotations and noise whose draws belong to the row.

Applied by `InputShape.collate` on the worker to the training rows only, with the row keys of the
step (raymb.core.rng: train.seed, the epoch, each row's place in the epoch's order), so a row
is transformed the same whichever worker takes it, in whichever microbatch, and after a
resume. Each transform has its own stream; every draw is a function of the row alone, and
each row's pixels are computed from its own pixels only, so W workers x k microbatches still
give the parameters of one process.

Images [C, H, W], after data.scale and before data.mean/std (so zero padding is black):
crop (pad by crop_padding, reflect or zero, then a window of the original size at a random
offset), then a left-right flip with probability hflip, then a rotation by an angle uniform
in [-rotate_degrees, rotate_degrees] (bilinear, corners 0). Then, for any float rows, noise:
N(0, noise_std) added after data.mean/std.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from raymb.config.data import AugmentSection
from raymb.core.rng import AUGMENT_STREAMS, RowKeys

CROP, FLIP, ROTATE, NOISE = (AUGMENT_STREAMS + i for i in range(4))


@dataclass(frozen=True)
class Augment:
    hflip: float = 0.0
    crop_padding: int = 0
    padding_mode: str = "reflect"
    rotate_degrees: float = 0.0
    noise_std: float = 0.0

    @classmethod
    def of(cls, section: AugmentSection) -> Augment | None:
        """The transforms data.augment turns on; None when it turns none on."""
        if not section.enabled:
            return None
        return cls(
            hflip=section.hflip,
            crop_padding=section.crop_padding,
            padding_mode=section.padding_mode,
            rotate_degrees=section.rotate_degrees,
            noise_std=section.noise_std,
        )

    def images(self, x: torch.Tensor, keys: RowKeys) -> torch.Tensor:
        """Crop, flip and rotate a float batch (B, C, H, W): each row by its own draws."""
        if x.dim() != 4 or len(x) == 0:
            return x
        if self.crop_padding > 0:
            x = self._crop(x, keys)
        if self.hflip > 0:
            flip = keys.uniform(FLIP).to(x.device) < self.hflip
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.rotate_degrees > 0:
            x = self._rotate(x, keys)
        return x

    def noise(self, x: torch.Tensor, keys: RowKeys) -> torch.Tensor:
        """x + N(0, noise_std), each element's normal drawn from its row and its index."""
        if self.noise_std == 0 or len(x) == 0:
            return x
        return x + self.noise_std * keys.normal(NOISE, x.shape[1:]).to(x.device)

    def _crop(self, x: torch.Tensor, keys: RowKeys) -> torch.Tensor:
        B, C, H, W = x.shape
        P = self.crop_padding
        mode = "reflect" if self.padding_mode == "reflect" else "constant"
        padded = F.pad(x, (P, P, P, P), mode=mode)
        # Offsets 0..2P in each direction; 2P + 1 <= 2**24, so floor(u * (2P + 1)) is exact.
        offset = (keys.uniform(CROP, (2,)).to(x.device) * (2 * P + 1)).long().clamp_(max=2 * P)
        rows = offset[:, 0, None] + torch.arange(H, device=x.device)  # (B, H)
        cols = offset[:, 1, None] + torch.arange(W, device=x.device)  # (B, W)
        padded = padded.gather(2, rows[:, None, :, None].expand(B, C, H, W + 2 * P))
        return padded.gather(3, cols[:, None, None, :].expand(B, C, H, W))

    def _rotate(self, x: torch.Tensor, keys: RowKeys) -> torch.Tensor:
        B, C, H, W = x.shape
        degrees = (2 * keys.uniform(ROTATE).to(torch.float64) - 1) * self.rotate_degrees
        angle = (degrees * (math.pi / 180)).to(x.device)
        cos, sin = angle.cos().float()[:, None, None], angle.sin().float()[:, None, None]
        # Pixel centres about the image's centre, in pixels (grid_sample's align_corners=False
        # grid, unnormalised), so that a non-square image turns rigidly. Elementwise, not
        # affine_grid's matmul: each row's grid is the same whatever the batch.
        px = (torch.arange(W, device=x.device, dtype=torch.float32) + (0.5 - W / 2))[None, None]
        py = (torch.arange(H, device=x.device, dtype=torch.float32) + (0.5 - H / 2))[None, :, None]
        gx = (cos * px - sin * py) * (2 / W)
        gy = (sin * px + cos * py) * (2 / H)
        grid = torch.stack([gx, gy], dim=-1)  # (B, H, W, 2): where each output pixel reads
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
