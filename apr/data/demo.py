"""A small real-image dataset in ImageNet layout, built from scikit-learn's handwritten digits.

The demo and the CI need real photos-of-something in the exact layout the ImageNet code reads,
without a download: the 1,797 8x8 grey digits, upsampled (bicubic) to ``image_size`` RGB JPEGs
(quality 95) under ``root/train/digit_<k>/`` and ``root/val/digit_<k>/`` with a stratified split fixed
by ``seed``. Built once: a marker file records the parameters (rebuilt when they differ), and the
tree is written to a temporary folder then renamed, so an interrupted build is never mistaken for
a finished one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["build_demo_dataset", "build_cached", "MARKER"]

MARKER = ".apr_demo.json"
_FORMAT = 1


def _params(image_size: int, seed: int, val_fraction: float) -> dict:
    return {"format": _FORMAT, "source": "sklearn.datasets.load_digits", "image_size": int(image_size),
            "seed": int(seed), "val_fraction": float(val_fraction), "jpeg_quality": 95}


def _read_marker(root: Path, marker: str) -> dict | None:
    try:
        return json.loads((root / marker).read_text())
    except (OSError, ValueError):
        return None


def build_cached(root: str | os.PathLike, params: dict, marker: str, write: Callable[[Path], None],
                 what: str = "apr demo dataset") -> Path:
    """Run ``write(tmp)`` into a temporary sibling of ``root`` and rename it into place, unless ``root``
    already holds a build with the same ``params`` (recorded in ``root/marker``, written last).

    An interrupted build leaves nothing behind; an older build with other parameters is replaced;
    a folder without the marker is never touched."""
    root = Path(root)
    if root.exists():
        found = _read_marker(root, marker)
        if found == params:
            return root
        if found is None and any(root.iterdir()):
            raise FileExistsError(f"{root} exists and is not an {what} (no {marker}); choose an empty or new folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        write(tmp)
        (tmp / marker).write_text(json.dumps(params))  # written last: its presence means "complete"
        if root.exists():  # an older build (marker checked above): replace it
            old = root.with_name(f".{root.name}.old-{os.getpid()}")
            os.replace(root, old)
            os.replace(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def build_demo_dataset(root: str | os.PathLike, image_size: int = 32, seed: int = 0,
                       val_fraction: float = 0.25, progress: bool = False) -> Path:
    """Write (once) the digits as ``root/{train,val}/digit_<k>/<n>.JPEG``; return ``root``."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from tqdm import tqdm

    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    params = _params(image_size, seed, val_fraction)
    if _read_marker(Path(root), MARKER) == params:
        return Path(root)  # cached: skip loading scikit-learn's digits
    digits = load_digits()
    grey = (digits.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    targets = digits.target.astype(np.int64)
    idx_train, idx_val = train_test_split(np.arange(len(grey)), test_size=val_fraction, random_state=seed,
                                          stratify=targets)

    def write(tmp: Path) -> None:
        for split, indices in (("train", idx_train), ("val", idx_val)):
            for k in range(10):
                (tmp / split / f"digit_{k}").mkdir(parents=True)
            for i in tqdm(sorted(indices.tolist()), desc=f"demo {split}", disable=not progress):
                img = Image.fromarray(grey[i]).resize((image_size, image_size), Image.BICUBIC).convert("RGB")
                img.save(tmp / split / f"digit_{targets[i]}" / f"{i:04d}.JPEG", quality=95)

    return build_cached(root, params, MARKER, write)
