"""Decode a folder of PNGs into one uint8 array: Pillow in this process vs Ray Data read_images.

`python -m bench.prepare_images [--images N] [--size S]` writes N generated SxS RGB PNGs in
10 class folders, times both readers end to end (Ray's start-up timed apart), checks they
agree pixel for pixel, and prints one JSON line. `raymb prepare images` uses the faster.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_pngs(root: Path, n: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = root / f"class{i % 10}" / f"{i:06d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def with_pillow(paths: list[Path]) -> np.ndarray:
    images = []
    for path in paths:
        with Image.open(path) as im:
            images.append(np.asarray(im.convert("RGB")))
    return np.stack(images)


def with_read_images(root: Path) -> np.ndarray:
    import ray.data

    rows = ray.data.read_images(str(root), mode="RGB", include_paths=True).take_all()
    rows.sort(key=lambda row: row["path"])
    return np.stack([row["image"] for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="PNG files (default 2000)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = sorted(write_pngs(root, args.images, args.size))
        started = time.perf_counter()
        pillow = with_pillow(paths)
        pillow_s = time.perf_counter() - started

        import ray

        started = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray_init_s = time.perf_counter() - started
        started = time.perf_counter()
        ray_images = with_read_images(root)
        read_images_s = time.perf_counter() - started
        ray.shutdown()
    assert np.array_equal(pillow, ray_images), "the two readers disagree"
    result = {
        "images": args.images,
        "size": args.size,
        "cores": os.cpu_count(),
        "pillow_s": round(pillow_s, 3),
        "read_images_s": round(read_images_s, 3),
        "ray_init_s": round(ray_init_s, 3),
        "pillow_images_per_s": round(args.images / pillow_s),
        "read_images_per_s": round(args.images / read_images_s),
        "read_images_over_pillow": round(read_images_s / pillow_s, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
