"""[data.augment]'s transforms (raymb.data.augment) against references worked out pixel by
pixel, each row by its own draws whatever the batch; the collate's order; no processes."""

from __future__ import annotations

import math

import pytest
import torch

from raymb.config.data import AugmentSection
from raymb.core import rng
from raymb.core.shape import InputShape
from raymb.data import augment as aug

B, C, H, W = 16, 2, 5, 7  # a non-square image: a rotation must stay rigid


def _images() -> torch.Tensor:
    return torch.rand(B, C, H, W, generator=torch.Generator().manual_seed(0))


def _keys(rows=range(100, 100 + B)) -> rng.RowKeys:
    return rng.RowKeys(seed=3, epoch=1, rows=torch.tensor(list(rows)))


def _augment(**keys) -> aug.Augment:
    return aug.Augment.of(AugmentSection(**keys))


def test_nothing_on_is_none():
    assert aug.Augment.of(AugmentSection()) is None
    assert _augment(padding_mode="zero") is None  # a mode without a padding turns nothing on


def test_hflip_flips_the_rows_whose_draw_is_below_p():
    x = _images()
    out = _augment(hflip=0.5).images(x, _keys())
    flipped = rng.uniform(3, aug.FLIP, 1, _keys().rows) < 0.5
    assert 0 < int(flipped.sum()) < B
    for b in range(B):
        assert torch.equal(out[b], x[b].flip(-1) if flipped[b] else x[b])
    assert torch.equal(_augment(hflip=1.0).images(x, _keys()), x.flip(-1))


@pytest.mark.parametrize("mode", ["reflect", "zero"])
def test_crop_is_a_window_of_the_padded_image_at_the_drawn_offset(mode):
    P = 2
    x = _images()
    out = _augment(crop_padding=P, padding_mode=mode).images(x, _keys())
    u = rng.uniform(3, aug.CROP, 1, _keys().rows, (2,))
    offsets = set()
    for b in range(B):
        oy, ox = (math.floor(float(v) * (2 * P + 1)) for v in u[b])
        offsets.add((oy, ox))
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    # Pixel (i, j) of the crop is pixel (oy + i - P, ox + j - P) of the image,
                    # mirrored at the edges (reflect: -1 -> 1, H -> H - 2) or 0 outside.
                    si, sj = oy + i - P, ox + j - P
                    if mode == "zero" and not (0 <= si < H and 0 <= sj < W):
                        want = 0.0
                    else:
                        si = -si if si < 0 else (2 * (H - 1) - si if si >= H else si)
                        sj = -sj if sj < 0 else (2 * (W - 1) - sj if sj >= W else sj)
                        want = float(x[b, c, si, sj])
                    assert float(out[b, c, i, j]) == want, (b, c, i, j)
    assert len(offsets) > 4  # the rows took different windows


def _bilinear(img: torch.Tensor, y: float, x: float) -> float:
    """img (H, W) at real pixel coordinates (y, x), 0 outside: grid_sample's zeros padding."""
    y0, x0 = math.floor(y), math.floor(x)
    total = 0.0
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < img.shape[0] and 0 <= xx < img.shape[1]:
                total += wy * wx * float(img[yy, xx])
    return total


def test_rotation_turns_each_image_rigidly_about_its_centre_by_its_drawn_angle():
    degrees = 30.0
    x = _images()
    out = _augment(rotate_degrees=degrees).images(x, _keys())
    u = rng.uniform(3, aug.ROTATE, 1, _keys().rows)
    cy, cx = (H - 1) / 2, (W - 1) / 2
    angles = []
    for b in range(B):
        angle = math.radians((2 * float(u[b]) - 1) * degrees)
        angles.append(angle)
        cos, sin = math.cos(angle), math.sin(angle)
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    # The output pixel at (i, j) reads the input at its position turned by
                    # the angle about the centre, in pixels.
                    px, py = j - cx, i - cy
                    sx, sy = cos * px - sin * py + cx, sin * px + cos * py + cy
                    want = _bilinear(x[b, c], sy, sx)
                    assert abs(float(out[b, c, i, j]) - want) < 1e-5, (b, c, i, j)
    assert min(angles) < -0.1 and max(angles) > 0.1


def test_noise_is_the_rows_normals_times_the_std():
    x = torch.zeros(64, 300)
    keys = _keys(range(64))
    out = _augment(noise_std=0.5).noise(x, keys)
    assert torch.equal(out, 0.5 * rng.normal(3, aug.NOISE, 1, keys.rows, (300,)))
    assert abs(float(out.std()) - 0.5) < 0.01 and abs(float(out.mean())) < 0.01


def test_a_row_is_transformed_the_same_in_any_batch():
    every = _augment(hflip=0.5, crop_padding=2, rotate_degrees=15.0, noise_std=0.1)
    x, keys = _images(), _keys()
    whole = every.noise(every.images(x, keys), keys)
    part = [3, 11, 4]
    sub = rng.RowKeys(keys.seed, keys.epoch, keys.rows[part])
    assert torch.equal(every.noise(every.images(x[part], sub), sub), whole[part])
    other_epoch = rng.RowKeys(keys.seed, 2, keys.rows)
    assert not torch.equal(every.noise(every.images(x, other_epoch), other_epoch), whole)


def test_the_collate_crops_before_normalising_and_adds_noise_after():
    inputs = InputShape("classify", (1, 3, 3), scale=0.5, mean=(10.0,), std=(2.0,))
    stored = torch.full((1, 1, 3, 3), 4, dtype=torch.uint8)
    keys = rng.RowKeys(0, 0, torch.tensor([0]))
    zero = _augment(crop_padding=2, padding_mode="zero")
    x, _ = inputs.collate(stored, torch.zeros(1), zero, keys)
    # Stored 4 -> 2 after scale -> (2 - 10) / 2 = -4; zero padding -> (0 - 10) / 2 = -5.
    assert set(x.flatten().tolist()) <= {-4.0, -5.0}
    plain, _ = inputs.collate(stored, torch.zeros(1))
    assert plain.flatten().tolist() == [-4.0] * 9  # without augment: as before
    noisy, _ = inputs.collate(stored, torch.zeros(1), _augment(noise_std=1.0), keys)
    assert torch.equal(noisy, plain + rng.normal(0, aug.NOISE, 0, keys.rows, (1, 3, 3)))


def test_an_empty_batch_passes():
    every = _augment(hflip=0.5, crop_padding=1, rotate_degrees=5.0, noise_std=0.1)
    empty = rng.RowKeys(0, 0, torch.zeros(0, dtype=torch.int64))
    assert every.images(torch.zeros(0, 3, 4, 4), empty).shape == (0, 3, 4, 4)
    assert every.noise(torch.zeros(0, 5), empty).shape == (0, 5)
