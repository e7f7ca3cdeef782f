"""The benchmarks' JPEG folders: random crops of scikit-image's bundled real photos (scikit-learn's
two sample photos where scikit-image is not installed).

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

    photos = _source_photos()
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


def _source_photos() -> list[np.ndarray]:
    """scikit-image's photos, or where scikit-image is missing (the lent GPU box) scikit-learn's two."""
    try:
        from skimage import data
    except ImportError:
        from sklearn.datasets import load_sample_images

        return list(load_sample_images().images)  # china, flower: 427 x 640
    return [np.asarray(getattr(data, name)()) for name in PHOTOS]
