"""CIFAR-10/100 and CIFAR-10-C/100-C as in-memory tensors, and a loader that augments on the device.

CIFAR is 150 MB as uint8: decoding files per step would only waste CPU, so the whole set lives on the
training device and the random crop (padding ``crop_padding`` filled with pixel value ``pad_fill``) and
flip run batched there. The random draws come from a CPU generator seeded by ``(seed, epoch, batch, rank)``,
so a resumed run regenerates exactly the same batches from ``(epoch, batch)`` alone, on any device.

Reference mode (iCGY96/APR datasets/transforms.py): ``RandomCrop(32, padding=4, fill=128)`` pads with
pixel value 128 (``pad_fill=128``, 128/255 after ToTensor) and APR-S runs on the 32 x 32 image BEFORE the
crop and flip. The latter is the ``pre_crop`` hook: a batched transform of the uncropped float images,
drawn from the same per-batch generator (so resume stays exact); the training setup passes the APR-S
half of APR-SP there (:func:`apr.augment.split_apr_s_for_loader`) and the loop keeps only APR-P.

Files read: the standard python-pickle folders (``cifar-10-batches-py/data_batch_1..5, test_batch,
batches.meta``; ``cifar-100-python/train, test, meta``) and CIFAR-C's ``<corruption>.npy`` (uint8
N x 32 x 32 x 3, severities 1..5 in five equal blocks) + ``labels.npy``. The pickles are the official
files; pickle can run code, so only point this at files you downloaded from the official source.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .base import SeededPosition, epoch_permutation, mix_seed, train_shard_size
from .layout import DatasetLayoutError

__all__ = ["load_cifar", "load_cifar_c", "cifar_name_for", "TensorBatchLoader", "CIFAR_FOLDERS", "random_crop_flip",
           "PreCropTransform"]

CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _folder(root: Path, name: str) -> Path:
    if name not in CIFAR_FOLDERS:
        raise ValueError(f"unknown CIFAR dataset {name!r}; expected cifar10 or cifar100")
    sub = CIFAR_FOLDERS[name]
    for candidate in (root / sub, root):
        if candidate.is_dir() and candidate.name == sub:
            return candidate
    raise DatasetLayoutError(f"{name}: folder {root / sub} not found (extract the python version of {name}, "
                             f"e.g. cifar-10-python.tar.gz, into {root})")


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DatasetLayoutError(f"CIFAR file not found: {path}")
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="bytes")
    except Exception as exc:
        raise DatasetLayoutError(f"cannot read CIFAR file {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, dict):
        raise DatasetLayoutError(f"{path} is not a CIFAR python batch (expected a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def load_cifar(root: str | Path, name: str = "cifar10", train: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return (uint8 N x 32 x 32 x 3, int64 labels, class names) from the official pickle folder.

    ``root`` may be the folder that holds ``cifar-10-batches-py`` / ``cifar-100-python`` or that folder.
    """
    folder = _folder(Path(root), name)
    if name == "cifar10":
        parts = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        label_key, meta_file, names_key = "labels", "batches.meta", "label_names"
    else:
        parts = ["train" if train else "test"]
        label_key, meta_file, names_key = "fine_labels", "meta", "fine_label_names"
    images, labels = [], []
    for part in parts:
        batch = _unpickle(folder / part)
        if "data" not in batch or label_key not in batch:
            raise DatasetLayoutError(f"{folder / part} lacks 'data' or '{label_key}'")
        data = np.asarray(batch["data"])
        if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
            raise DatasetLayoutError(f"{folder / part}: 'data' must be uint8 N x 3072, got {data.dtype} {data.shape}")
        lab = np.asarray(batch[label_key], dtype=np.int64)
        if lab.shape != (len(data),):
            raise DatasetLayoutError(f"{folder / part}: {len(data)} images but {lab.shape} labels")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    meta = _unpickle(folder / meta_file)
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(names_key, [])]
    if not classes:
        raise DatasetLayoutError(f"{folder / meta_file}: no class names in '{names_key}'")
    usual = 10 if name == "cifar10" else 100
    if len(classes) != usual:
        warnings.warn(f"{folder / meta_file} lists {len(classes)} classes, not {name}'s {usual}: training on "
                      f"the {len(classes)} classes of this folder", stacklevel=2)
    labels_all = np.concatenate(labels)
    if labels_all.size and (labels_all.min() < 0 or labels_all.max() >= len(classes)):
        raise DatasetLayoutError(f"{folder}: labels outside 0..{len(classes) - 1} (the {len(classes)} classes "
                                 f"of {meta_file})")
    return np.ascontiguousarray(np.concatenate(images)), labels_all, classes


def cifar_name_for(dataset: str, classes: Sequence[str]) -> str:
    """Which CIFAR pickle layout (``cifar10`` / ``cifar100``) a checkpoint's test set is read from:
    its ``data.dataset`` when that is a CIFAR name, else guessed from the class count (100: cifar100,
    10: cifar10). Shared by evaluation and analysis so that both read the same test split."""
    if dataset in CIFAR_FOLDERS:
        return dataset
    if len(classes) in (10, 100):
        return f"cifar{len(classes)}"
    raise DatasetLayoutError(f"cannot tell which CIFAR test set fits a checkpoint with data.dataset={dataset!r} "
                             f"and {len(classes)} classes: train with data.dataset=cifar10 or cifar100")


def load_cifar_c(root: str | Path, corruption: str, severity: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read ``<root>/<corruption>.npy`` and ``<root>/labels.npy``: all five severities (N images), or the
    block of one ``severity`` (1..5; blocks of N/5, which is 10,000 for the official files)."""
    root = Path(root)
    path, label_path = root / f"{corruption}.npy", root / "labels.npy"
    for p in (path, label_path):
        if not p.is_file():
            raise DatasetLayoutError(f"CIFAR-C file not found: {p}")
    images = np.load(path, mmap_mode="r")
    labels = np.load(label_path)
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.dtype != np.uint8:
        raise DatasetLayoutError(f"{path}: expected uint8 N x 32 x 32 x 3, got {images.dtype} {images.shape}")
    n = len(images)
    if n == 0 or n % 5:
        raise DatasetLayoutError(f"{path}: {n} images is not five equal severity blocks (N must be divisible by 5)")
    if labels.shape != (n,):
        raise DatasetLayoutError(f"{label_path}: {labels.shape[0] if labels.ndim else 0} labels for {n} images in {path}")
    if severity is not None:
        if not 1 <= int(severity) <= 5:
            raise ValueError(f"severity must be 1..5, got {severity}")
        block = n // 5
        sl = slice((int(severity) - 1) * block, int(severity) * block)
        return np.array(images[sl]), labels[sl].astype(np.int64)  # a writable copy of the memory map
    return np.array(images), labels.astype(np.int64)


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator, flip: bool = True,
                     fill: float = 0.0) -> torch.Tensor:
    """Batched random crop + horizontal flip of uint8/float N x C x H x W on its device; the padding holds
    ``fill`` (in the images' own units: 128 for uint8 pixel 128, 128/255 for [0, 1] floats)."""
    n, c, h, w = images.shape
    offs = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    dev = images.device
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding), value=fill) if padding else images
    rows = (offs[:, 0:1] + torch.arange(h)).to(dev)  # n x h
    cols = offs[:, 1:2] + torch.arange(w)  # n x w
    cols = torch.where(flips[:, None], cols.flip(1), cols).to(dev)
    b = torch.arange(n, device=dev)[:, None, None, None]
    ch = torch.arange(c, device=dev)[None, :, None, None]
    return padded[b, ch, rows[:, None, :, None], cols[:, None, None, :]]


PreCropTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class TensorBatchLoader(SeededPosition):
    """Batches from in-memory uint8 images (N x H x W x 3): batch contract, sharding, exact resume.

    ``train=True``: seeded per-epoch permutation shared by all ranks, split ``rank::world_size``,
    last partial batch dropped (``drop_last=False``: kept, as the reference's DataLoader; every rank still
    runs the same number of steps, since the shards are equal), random crop (padding filled with pixel value ``pad_fill``, 0..255) + flip
    on the device. ``pre_crop(images, generator)``: a batched transform of the uncropped float [0, 1]
    images that runs before the crop (the reference's APR-S), drawing from the batch's own generator.
    ``train=False``: the rank's samples in order (each sample exactly once over all ranks), last partial
    batch kept, no augmentation.
    """

    STATE_BACKEND, STATE_WORDS = "tensor", "in-memory tensors"

    def __init__(self, images_uint8: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | Sequence[int],
                 batch_size: int, *, train: bool = False, crop_padding: int = 4, flip: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                 classes: Sequence[str] | None = None, pad_fill: int = 0,
                 pre_crop: PreCropTransform | None = None, drop_last: bool = True):
        if not 0 <= int(pad_fill) <= 255:
            raise ValueError(f"pad_fill is a pixel value 0..255, got {pad_fill}")
        images = torch.as_tensor(np.asarray(images_uint8))
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 N x H x W x 3, got {images.dtype} {tuple(images.shape)}")
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
        n_classes = int(labels.max()) + 1 if len(labels) else 0
        self._init_contract(len(images), len(labels), classes or [str(i) for i in range(n_classes)],
                            batch_size=batch_size, train=train, rank=rank, world_size=world_size, seed=seed,
                            device=device)
        self.images = images.permute(0, 3, 1, 2).contiguous().to(self.device)  # N x 3 x H x W uint8
        self.label_tensor = labels.to(self.device)
        self.crop_padding, self.flip = int(crop_padding), bool(flip)
        self.pad_fill, self.pre_crop, self.drop_last = int(pad_fill), pre_crop, bool(drop_last)
        if self.train and not self.drop_last:  # the partial batch counts as a step
            self.num_samples = train_shard_size(len(images), self.world_size)
            self._len = -(-self.num_samples // self.batch_size)

    def _indices(self) -> torch.Tensor:
        n = len(self.images)
        if not self.train:
            return torch.arange(self.rank, n, self.world_size)
        order = epoch_permutation(n, self.seed, self.epoch)[: train_shard_size(n, self.world_size) * self.world_size]
        return order[self.rank::self.world_size][: self.num_samples]

    def __iter__(self):
        epoch, _ = self._begin_pass()
        indices = self._indices()
        while self.epoch == epoch and self._pos < self._len:
            b = self._pos
            idx = indices[b * self.batch_size:(b + 1) * self.batch_size].to(self.device)
            x = self.images[idx]
            if self.train:
                x = self._augment(x, epoch, b)
            self._pos += 1
            yield (x if x.is_floating_point() else x.float().div_(255.0)), self.label_tensor[idx]

    def _augment(self, x: torch.Tensor, epoch: int, batch: int) -> torch.Tensor:
        """Crop + flip of one uint8 batch (uint8 out); with ``pre_crop``, that transform first on the
        [0, 1] floats and the crop after it (float out, the padding ``pad_fill / 255``)."""
        g = torch.Generator()
        g.manual_seed(mix_seed(self.seed, epoch, batch, self.rank))
        if self.pre_crop is None:
            return random_crop_flip(x, self.crop_padding, g, self.flip, fill=self.pad_fill)
        x = self.pre_crop(x.float().div_(255.0), g)
        return random_crop_flip(x, self.crop_padding, g, self.flip, fill=self.pad_fill / 255.0)

    def _num_items(self) -> int:
        return len(self.images)
