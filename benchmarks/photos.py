"""The benchmarks' JPEG folders: random crops of scikit-image's bundled real photos.

Real photos (not noise) so JPEG decode costs what it costs on natural images; written once per
benchmark run into a temporary folder, ImageFolder layout ``<root>/<n0000000k>/img_*.JPEG``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


def write_photo_jpegs(root: Path, n: int, size: int, classes: int = 10, quality: int = 90, seed: int = 0) -> Path:
    """``n`` random square crops resized to ``size`` x ``size``, spread round-robin over ``classes``."""
    from PIL import Image
    from skimage import data

    photos = [np.asarray(getattr(data, name)()) for name in PHOTOS]
    rng = np.random.default_rng(seed)
    for k in range(classes):
        (root / f"n{k:08d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        img = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
        img.save(root / f"n{i % classes:08d}" / f"img_{i:06d}.JPEG", quality=quality)
    return root
