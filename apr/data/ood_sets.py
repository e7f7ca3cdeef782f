"""Sets for out-of-distribution detection: what is on disk -> batches with the evaluation's preprocessing.

``apr.ood`` knows no file layout; it asks this module for an :class:`ImageSet` and its loader.
An OOD set is one of:

- a folder of images searched recursively (no class folders needed; DTD, iNaturalist/SUN/Places
  subsets, ImageNet-O, LSUN ...). Files that fail the cheap header check of
  :func:`apr.data.layout.check_files` (header check and PIL decode) are skipped, counted and listed;
- a CIFAR-10/100 python-pickle folder (``cifar-10-batches-py``, ``cifar-100-python`` or the folder
  that holds it): its test split;
- SVHN's ``test_32x32.mat`` (scipy.io; ``X`` is H x W x C x N uint8, ``y`` N x 1).

The in-distribution set is what the evaluator reads: an ImageNet-layout val folder with the
checkpoint's class list, or a CIFAR test split. Every set is preprocessed like evaluation:
shorter side resized to ``val_resize``, then centre crop ``image_size``; arrays whose images
already have the model's size are used as they are (the CIFAR evaluation path).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from apr.errors import UserError

from .cifar import CIFAR_FOLDERS, TensorBatchLoader, load_cifar
from .layout import IMG_EXTENSIONS, check_files, scan_image_folder, warn_missing_classes

__all__ = ["OODSetError", "ImageSet", "parse_set_spec", "open_ood_set", "open_in_distribution",
           "check_disjoint", "check_no_shared_files", "stratified_subset", "detect_kind", "load_svhn_mat", "MAX_LISTED_SKIPS"]

#: At most this many skipped files are listed by name (all are counted).
MAX_LISTED_SKIPS = 1000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class OODSetError(UserError, ValueError):
    """An OOD or in-distribution set that cannot be read as asked."""


@dataclass
class ImageSet:
    """One set on disk, resolved: its files or in-memory images, and what identifies it for resume.

    Exactly one of ``files`` (decoded by the image loaders) or ``images`` (uint8 N x H x W x 3) is set.
    ``fingerprint``: resolved path, the cap and :func:`apr.results.files_fingerprint` of what was read.
    """

    name: str
    kind: str  # folder | imagefolder | cifar10 | cifar100 | svhn
    path: str
    fingerprint: dict
    labels: np.ndarray
    files: list[str] | None = None
    images: np.ndarray | None = None
    classes: list[str] = field(default_factory=lambda: ["ood"])
    skipped: list[str] = field(default_factory=list)
    skipped_count: int = 0
    missing_classes: list[str] = field(default_factory=list)  # in-distribution classes without an image

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, scored: int | None = None, decode_skipped: Sequence[str] = ()) -> dict:
        """The JSON block of this set (without scores). ``scored``: the images actually scored (a file the
        loader could not decode is not); ``decode_skipped``: those files, counted and named with the rest."""
        skipped = list(self.skipped) + list(decode_skipped)
        return {"kind": self.kind, "path": self.path, "fingerprint": dict(self.fingerprint),
                "count": len(self) if scored is None else int(scored),
                "skipped_count": self.skipped_count + len(decode_skipped), "skipped": skipped[:MAX_LISTED_SKIPS],
                **({"missing_classes": list(self.missing_classes)} if self.missing_classes else {})}

    def loader(self, *, batch_size: int, image_size: int, resize: int, backend: str = "auto", num_workers: int = 2,
               rank: int = 0, world_size: int = 1, local_rank: int = 0, device: torch.device | str = "cpu"):
        """Batch-contract loader over this rank's share (``eval_shard``), preprocessed like evaluation."""
        if self.files is not None:
            from . import build_image_loader

            return build_image_loader(self.files, self.labels.tolist(), self.classes, backend=backend,
                                      batch_size=batch_size, train=False, image_size=image_size, resize=resize,
                                      num_workers=num_workers, rank=rank, world_size=world_size,
                                      local_rank=local_rank, device=device, roots=[self.path])
        loader = TensorBatchLoader(self.images, self.labels, batch_size, train=False, rank=rank,
                                   world_size=world_size, device=device, classes=self.classes)
        if self.images.shape[1:3] == (image_size, image_size):
            return loader
        return ResizedBatches(loader, resize, image_size)


class ResizedBatches:
    """Resize (shorter side) + centre crop of in-memory batches on their device, for arrays whose size
    differs from the model's (e.g. 32 px SVHN against an ImageNet model)."""

    def __init__(self, loader, resize: int, image_size: int):
        self.loader, self.resize, self.image_size = loader, int(resize), int(image_size)
        self.num_samples, self.classes = loader.num_samples, loader.classes

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        from torchvision.transforms.v2 import functional as F

        for images, labels in self.loader:
            images = F.resize(images, [self.resize], antialias=True).clamp_(0.0, 1.0)
            yield F.center_crop(images, [self.image_size, self.image_size]), labels


# ----------------------------------------------------------------------------- helpers


def parse_set_spec(spec: str) -> tuple[str, str]:
    """``name=path`` -> (name, path); the name labels the set in the results and the report."""
    name, sep, path = spec.partition("=")
    if not sep or not path:
        raise OODSetError(f"OOD set {spec!r} must be NAME=PATH, e.g. textures=/data/dtd/images")
    if not _NAME.match(name):
        raise OODSetError(f"OOD set name {name!r}: use letters, digits, '_', '-' or '.' (e.g. cifar100)")
    return name, path


def stratified_subset(labels: np.ndarray, max_images: int | None) -> np.ndarray:
    """Indices of at most ``max_images`` samples, evenly spaced over the label-sorted order (so each
    class keeps its share), returned in original order; deterministic, the same on every rank."""
    n = len(labels)
    if max_images is None or max_images >= n:
        return np.arange(n)
    if max_images < 1:
        raise OODSetError(f"max_images must be >= 1, got {max_images}")
    by_label = np.argsort(np.asarray(labels), kind="stable")
    picks = np.floor(np.arange(max_images) * (n / max_images)).astype(np.int64)
    return np.sort(by_label[picks])


def _fingerprint(path: Path, files: Sequence[Path | str], max_images: int | None) -> dict:
    """The resolved path, the cap and ``apr.results.files_fingerprint`` of every file read (a file
    replaced by another of the same size is seen)."""
    from apr.results import files_fingerprint

    return {"path": str(path), **files_fingerprint(path if path.is_dir() else path.parent, files),
            "max_images": max_images}


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_disjoint(in_path: str | os.PathLike, ood_path: str | os.PathLike, name: str) -> None:
    """Refuse an OOD set that is (or lies inside, or contains) the in-distribution set."""
    a, b = Path(in_path).resolve(), Path(ood_path).resolve()
    if _within(a, b) or _within(b, a):
        raise OODSetError(f"OOD set {name!r} ({b}) overlaps the in-distribution set ({a}): "
                          "give a different folder of images the model was not trained on")


def check_no_shared_files(in_set: ImageSet, out_set: ImageSet) -> None:
    """Refuse an OOD set holding a file that is (through a symlink) one of the in-distribution images, or
    the reverse: folder paths alone do not show it, and such an image would be scored as both."""
    in_root, out_root = Path(in_set.path), Path(out_set.path)
    in_files = {os.path.realpath(f) for f in in_set.files or ()}
    for path in out_set.files or ():
        real = os.path.realpath(path)
        if real in in_files or _within(Path(real), in_root):
            raise OODSetError(f"OOD set {out_set.name!r}: {path} is a link to {real}, an image of the "
                              f"in-distribution set ({in_root}); remove it from the OOD set")
    for path in in_set.files or ():
        real = os.path.realpath(path)
        if out_set.files is not None and _within(Path(real), out_root):
            raise OODSetError(f"in-distribution image {path} is a link to {real}, inside OOD set "
                              f"{out_set.name!r} ({out_root}); remove it from one of the two")


def detect_kind(path: str | os.PathLike) -> str:
    """folder | cifar10 | cifar100 | svhn, from what is at ``path``."""
    path = Path(path)
    if not path.exists():
        raise OODSetError(f"OOD set not found: {path}")
    if path.is_file():
        if path.suffix.lower() == ".mat":
            return "svhn"
        raise OODSetError(f"{path} is a file but not a .mat: give a folder of images, a CIFAR python-pickle "
                          "folder or SVHN's test_32x32.mat")
    for name, folder in CIFAR_FOLDERS.items():
        if path.name == folder:
            return name
    inside = [name for name, folder in CIFAR_FOLDERS.items() if (path / folder).is_dir()]
    if len(inside) > 1:
        raise OODSetError(f"{path} holds both {' and '.join(CIFAR_FOLDERS.values())}: give the one you mean "
                          f"(e.g. {path / CIFAR_FOLDERS['cifar100']})")
    return inside[0] if inside else "folder"


# ----------------------------------------------------------------------------- readers


def _image_folder(name: str, root: Path, max_images: int | None) -> ImageSet:
    found = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not found:
        raise OODSetError(f"OOD set {name!r}: no image files ({', '.join(IMG_EXTENSIONS)}) under {root}; "
                          "for CIFAR give the cifar-10-batches-py / cifar-100-python folder, for SVHN the .mat")
    reasons = check_files(found, decode=True)  # header check + PIL decode: every backend scores the same files
    good = [str(p) for p, r in zip(found, reasons) if r is None]
    skipped = [f"{p} ({r})" for p, r in zip(found, reasons) if r is not None]
    if not good:
        raise OODSetError(f"OOD set {name!r}: none of the {len(found)} files under {root} is a readable image "
                          f"(e.g. {skipped[0]})")
    keep = stratified_subset(np.zeros(len(good), dtype=np.int64), max_images)
    return ImageSet(name, "folder", str(root), _fingerprint(root, found, max_images),
                    labels=np.zeros(len(keep), dtype=np.int64), files=[good[i] for i in keep],
                    skipped=skipped[:MAX_LISTED_SKIPS], skipped_count=len(skipped))


def load_svhn_mat(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """SVHN ``.mat`` -> (uint8 N x H x W x 3, int64 labels with 10 mapped to digit 0)."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as exc:  # scipy raises ValueError, TypeError, NotImplementedError (v7.3 HDF5) ...
        raise OODSetError(f"cannot read {path} as a MATLAB file: {type(exc).__name__}: {exc}") from exc
    if "X" not in mat or "y" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise OODSetError(f"{path} lacks SVHN's 'X' (H x W x 3 x N images) and 'y' (labels) entries; it has {keys}")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[2] != 3 or x.dtype != np.uint8:
        raise OODSetError(f"{path}: 'X' must be uint8 H x W x 3 x N, got {x.dtype} {x.shape}")
    if x.shape[3] == 0 or y.shape != (x.shape[3],):
        raise OODSetError(f"{path}: {x.shape[3]} images in 'X' but {y.size} labels in 'y'")
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), np.where(y == 10, 0, y).astype(np.int64)


def _array_set(name: str, kind: str, path: Path, files: list[Path], images: np.ndarray, labels: np.ndarray,
               classes: list[str], max_images: int | None) -> ImageSet:
    keep = stratified_subset(labels, max_images)
    return ImageSet(name, kind, str(path), _fingerprint(path, files, max_images), labels=labels[keep],
                    images=np.ascontiguousarray(images[keep]), classes=classes)


def _cifar_files(path: Path, kind: str) -> tuple[Path, list[Path]]:
    folder = path if path.name == CIFAR_FOLDERS[kind] else path / CIFAR_FOLDERS[kind]
    names = ["test_batch", "batches.meta"] if kind == "cifar10" else ["test", "meta"]
    return folder, [folder / n for n in names if (folder / n).is_file()]


def open_ood_set(name: str, path: str | os.PathLike, max_images: int | None = None) -> ImageSet:
    """Resolve one OOD set (folder, CIFAR pickle folder or SVHN .mat); clear errors for bad input."""
    path = Path(path).resolve()
    kind = detect_kind(path)
    if kind == "folder":
        return _image_folder(name, path, max_images)
    if kind == "svhn":
        images, labels = load_svhn_mat(path)
        return _array_set(name, kind, path, [path], images, labels, [str(k) for k in range(10)], max_images)
    images, labels, classes = load_cifar(path, kind, train=False)
    folder, files = _cifar_files(path, kind)
    return _array_set(name, kind, folder, files, images, labels, classes, max_images)


def open_in_distribution(*, classes: Sequence[str], folder: str | os.PathLike | None = None,
                         cifar: str | os.PathLike | None = None, cifar_name: str = "cifar10",
                         max_images: int | None = None) -> ImageSet:
    """The evaluator's clean set: an ImageNet-layout val ``folder`` scanned with the checkpoint's
    ``classes`` (header check on, unknown class folders refused), or the test split of ``cifar``."""
    if (folder is None) == (cifar is None):
        raise OODSetError("give the in-distribution set once: an ImageNet-layout val folder (--in) "
                          "or a CIFAR python-pickle folder (--in-cifar)")
    if cifar is not None:
        path = Path(cifar).resolve()
        images, labels, names = load_cifar(path, cifar_name, train=False)
        if list(names) != list(classes):
            raise OODSetError(f"the checkpoint's classes ({', '.join(list(classes)[:3])}, ...) are not "
                              f"{cifar_name}'s ({', '.join(names[:3])}, ...) in the same order")
        folder_path, files = _cifar_files(path, cifar_name)
        return _array_set("in", cifar_name, folder_path, files, images, labels, list(classes), max_images)
    root = Path(folder).resolve()
    index = scan_image_folder(root, classes=classes, verify=True, allow_missing_classes=True, warn=False,
                              decode=True)
    if not index.files:
        raise OODSetError(f"no readable images in the in-distribution folder {root}")
    labels = np.asarray(index.labels, dtype=np.int64)
    keep = stratified_subset(labels, max_images)
    fingerprint = {**_fingerprint(root, index.files, max_images), "skipped": len(index.skipped)}
    missing = warn_missing_classes(root, [c for c, n in zip(index.classes, index.class_counts()) if n == 0])
    return ImageSet("in", "imagefolder", str(root), fingerprint, labels=labels[keep],
                    files=[index.files[i] for i in keep], classes=list(classes),
                    skipped=index.skipped[:MAX_LISTED_SKIPS], skipped_count=len(index.skipped),
                    missing_classes=missing)
