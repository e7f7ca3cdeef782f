"""Out-of-distribution images for the demo, made from pictures that ship with scikit-learn / scikit-image.

The demo's classifier knows handwritten digits; to ask whether it is less over-confident on things it
never saw, it needs images of *other* things without a download. Two sets, written once as folders of
``image_size`` RGB JPEGs (quality 95) that ``apr.ood`` reads like any OOD folder:

- ``photos``: random square crops of colour photos (scikit-learn's ``load_sample_images``: a temple
  and a flower; scikit-image's astronaut, coffee, chelsea, rocket);
- ``textures``: random square crops of scikit-image's brick, grass and gravel textures.

Crop sizes are drawn between 1/8 and 1/2 of the shorter side, positions uniformly, from one
``numpy`` generator seeded by ``seed``: the same parameters always give the same files. Cached and
built atomically by :func:`apr.data.demo.build_cached`, like the digits.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from apr.data.demo import build_cached

__all__ = ["build_demo_ood_sets", "OOD_SOURCES", "MARKER"]

MARKER = ".apr_demo_ood.json"
_FORMAT = 1
OOD_SOURCES = {
    "photos": ("sklearn:china.jpg", "sklearn:flower.jpg", "skimage:astronaut", "skimage:coffee", "skimage:chelsea",
               "skimage:rocket"),
    "textures": ("skimage:brick", "skimage:grass", "skimage:gravel"),
}


def _load_source(name: str) -> np.ndarray:
    """One source picture as H x W x 3 uint8."""
    kind, key = name.split(":", 1)
    if kind == "sklearn":
        from sklearn.datasets import load_sample_image

        image = load_sample_image(key)
    else:
        from skimage import data

        image = getattr(data, key)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3].astype(np.uint8))


def _random_crops(images: list[np.ndarray], count: int, image_size: int, rng: np.random.Generator):
    """``count`` square crops (sources taken in turn), each resized to ``image_size`` (bicubic)."""
    from PIL import Image

    for k in range(count):
        source = images[k % len(images)]
        height, width = source.shape[:2]
        side = int(rng.integers(min(height, width) // 8, min(height, width) // 2 + 1))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        crop = Image.fromarray(source[top:top + side, left:left + side])
        yield crop.resize((image_size, image_size), Image.BICUBIC)


def _params(image_size: int, per_set: int, seed: int) -> dict:
    return {"format": _FORMAT, "image_size": int(image_size), "per_set": int(per_set), "seed": int(seed),
            "sources": {name: list(sources) for name, sources in OOD_SOURCES.items()}, "jpeg_quality": 95}


def build_demo_ood_sets(root: str | os.PathLike, image_size: int = 32, per_set: int = 300,
                        seed: int = 0) -> dict[str, Path]:
    """Write (once) ``root/<set>/<n>.JPEG`` for every set of :data:`OOD_SOURCES`; return ``{set: folder}``."""
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if per_set < 1:
        raise ValueError(f"per_set must be >= 1, got {per_set}")
    params = _params(image_size, per_set, seed)

    def write(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        for name, sources in OOD_SOURCES.items():
            (tmp / name).mkdir()
            images = [_load_source(source) for source in sources]
            for k, crop in enumerate(_random_crops(images, per_set, image_size, rng)):
                crop.save(tmp / name / f"{k:04d}.JPEG", quality=95)

    root = build_cached(root, params, MARKER, write, what="apr demo OOD folder")
    return {name: root / name for name in OOD_SOURCES}
