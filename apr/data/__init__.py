"""Data: layout checks and class index, DALI / GPU-decode / torchvision image loaders, CIFAR tensors, demo dataset.

Every loader yields the batch contract: ``(images, labels)`` with images float32 N x 3 x H x W in
[0, 1] (not normalised) and int64 labels, both on the training device; ``len(loader)`` batches per
epoch for this rank, ``loader.classes``, ``loader.num_samples``; train loaders add ``set_epoch``,
``state_dict`` and ``load_state_dict`` for exact mid-epoch resume. The training loop therefore
cannot tell the backends apart. The contract itself (validation, length arithmetic, ``set_epoch``,
resume position) lives in :class:`apr.data.base.LoaderBase`: a new backend subclasses it and only
decodes. DALI is imported only when a DALI loader is built; ``backend="auto"`` picks DALI where it is
installed, else torchvision.io decoding on a CUDA device (``gpu``), else the torchvision DataLoader.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .cifar import CIFAR_FOLDERS, TensorBatchLoader, cifar_name_for, load_cifar, load_cifar_c
from .layout import (DatasetLayoutError, ImageDecodeError, ImageFolderIndex, scan_image_folder,
                     scan_train_roots)

__all__ = [
    "DatasetLayoutError", "ImageDecodeError", "ImageFolderIndex", "scan_image_folder", "scan_train_roots",
    "build_train_loader", "build_val_loader", "build_folder_eval_loader", "build_image_loader",
    "load_cifar", "load_cifar_c", "cifar_name_for", "TensorBatchLoader", "CIFAR_FOLDERS", "BACKENDS", "resolve_backend",
    "Preprocessing", "eval_preprocessing",
]


BACKENDS = ("auto", "dali", "gpu", "torchvision")  # the values of data.backend (and of the CLIs' --backend)


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """The backend that ``data.backend`` names on this machine: ``auto`` is DALI where it is installed, else
    GPU decoding through torchvision.io on a CUDA device, else the torchvision DataLoader backend."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown data backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    from .dali import dali_available

    if dali_available():
        return "dali"
    return "gpu" if torch.device(device).type == "cuda" else "torchvision"


def build_image_loader(files: Sequence[str], labels: Sequence[int], classes: Sequence[str], *, backend: str,
                       batch_size: int, train: bool, image_size: int, crop_scale: Sequence[float] = (0.08, 1.0),
                       resize: int | None = None, num_workers: int = 4, rank: int = 0, world_size: int = 1,
                       local_rank: int = 0, device: torch.device | str = "cpu", seed: int = 0,
                       roots: Sequence[str] = ()):
    """A DALI, GPU-decode or torchvision loader over explicit files/labels (all take the same arguments);
    ``backend="auto"`` picks one with :func:`resolve_backend`."""
    backend = resolve_backend(backend, device)
    kwargs = dict(batch_size=batch_size, train=train, image_size=image_size, crop_scale=crop_scale, resize=resize,
                  rank=rank, world_size=world_size, device=device, seed=seed)
    if backend == "dali":
        from .dali import DaliImageLoader

        return DaliImageLoader(files, labels, classes, num_threads=num_workers, local_rank=local_rank,
                               roots=roots, **kwargs)
    if backend == "gpu":
        from .gpu_decode import GpuDecodeLoader

        return GpuDecodeLoader(files, labels, classes, num_workers=num_workers, **kwargs)
    from .torchvision_backend import TorchvisionImageLoader

    return TorchvisionImageLoader(files, labels, classes, num_workers=num_workers, **kwargs)


@dataclass(frozen=True)
class Preprocessing:
    """How an evaluated image reaches the model: shorter side resized to ``resize``, centre crop ``image_size``."""

    image_size: int
    resize: int

    def describe(self) -> str:
        return f"resize shorter side to {self.resize}, centre crop {self.image_size}"


def eval_preprocessing(data_cfg, *, image_size: int | None = None, resize: int | None = None) -> Preprocessing:
    """The ONE preprocessing rule for a checkpoint's evaluation sets (eval, OOD, attacks): its own input size.

    A CIFAR checkpoint (32 px arrays, no resize in training) sees a full-size photo whole at its input
    size (resize 32 + centre crop 32, as the OOD literature's code does); an ImageNet-layout checkpoint
    sees what its own validation saw (``data.val_resize``, then ``data.image_size``). ``image_size`` /
    ``resize`` override (``--image-size`` / ``--resize``); a new size alone scales the resize with it."""
    size = int(image_size or data_cfg.image_size)
    if resize is None:
        if data_cfg.dataset in CIFAR_FOLDERS:
            resize = size
        else:
            resize = round(int(data_cfg.val_resize) * size / int(data_cfg.image_size))
    if size < 1 or int(resize) < 1:
        raise DatasetLayoutError(f"image size and resize must be >= 1 pixel, got {size} and {resize}")
    return Preprocessing(size, int(resize))


def _split_root(cfg, split_dir: str) -> Path:
    if not cfg.data.root:
        raise DatasetLayoutError("data.root is empty: set it to the dataset folder (e.g. --set data.root=/data/imagenet)")
    return Path(cfg.data.root) / split_dir


def build_train_loader(cfg, *, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                       device: torch.device | str = torch.device("cpu"), seed: int | None = None):
    """Training loader from the config: ImageNet layout (+ extra roots) via DALI/torchvision, or CIFAR.

    ``seed`` defaults to ``cfg.train.seed``; it fixes the epoch order and the augmentation draws.
    """
    seed = cfg.train.seed if seed is None else int(seed)
    d = cfg.data
    if d.dataset in CIFAR_FOLDERS:
        from apr.augment import loader_apr_s  # data.apr_s_before_crop: APR-S runs here, before the crop

        images, labels, classes = load_cifar(d.root, d.dataset, train=True)
        return TensorBatchLoader(images, labels, cfg.train.batch_size, train=True, crop_padding=d.crop_padding,
                                 seed=seed, rank=rank, world_size=world_size, device=device, classes=classes,
                                 pad_fill=d.pad_fill, pre_crop=loader_apr_s(cfg), drop_last=d.drop_last)
    roots = [_split_root(cfg, d.train_dir)] + [Path(r) for r in d.extra_roots]
    index = scan_train_roots(roots, verify=d.verify_images, decode=_decode_check(cfg, device))
    loader = build_image_loader(index.files, index.labels, index.classes, backend=d.backend,
                                batch_size=cfg.train.batch_size, train=True, image_size=d.image_size,
                                crop_scale=d.crop_scale, num_workers=d.num_workers, rank=rank, world_size=world_size,
                                local_rank=local_rank, device=device, seed=seed, roots=[str(r) for r in roots])
    loader.scan_skipped = list(index.skipped)  # "path (reason)" of the files left out before training
    return loader


def _decode_check(cfg, device) -> bool:
    """Decode every file before training (``decode=True`` of the scan, cached per folder) where the decoder
    may not refuse a header-valid file whose body is scrambled: DALI decodes it into garbage and trains on
    it; nvJPEG (the ``gpu`` backend on a CUDA device) is checked the same way, being DALI's GPU decoder
    (not verified on a GPU). PIL (``torchvision``) and libjpeg-turbo (``gpu`` on the CPU) refuse such a file
    where they meet it and take a seeded stand-in."""
    backend = resolve_backend(cfg.data.backend, device)
    on_gpu = backend == "gpu" and torch.device(device).type == "cuda"
    return bool(cfg.data.verify_images) and (backend == "dali" or on_gpu)


def build_val_loader(cfg, *, classes: Sequence[str] | None = None, rank: int = 0, world_size: int = 1,
                     local_rank: int = 0, device: torch.device | str = torch.device("cpu")):
    """Validation loader: resize shorter side to ``val_resize``, center crop ``image_size``; every image
    exactly once over all ranks. ``classes``: the training class list (a val class that train lacks is
    an error); None takes the val folder's own classes."""
    d = cfg.data
    if d.dataset in CIFAR_FOLDERS:
        images, labels, names = load_cifar(d.root, d.dataset, train=False)
        return TensorBatchLoader(images, labels, cfg.train.batch_size, train=False, rank=rank,
                                 world_size=world_size, device=device, classes=list(classes or names))
    root = _split_root(cfg, d.val_dir)
    index = scan_image_folder(root, classes=classes, verify=d.verify_images, allow_missing_classes=True,
                              decode=_decode_check(cfg, device))
    _warn_missing_val_classes(index, root)
    return build_image_loader(index.files, index.labels, index.classes, backend=d.backend,
                              batch_size=cfg.train.batch_size, train=False, image_size=d.image_size,
                              resize=d.val_resize, num_workers=d.num_workers, rank=rank, world_size=world_size,
                              local_rank=local_rank, device=device, seed=cfg.train.seed, roots=[str(root)])


def _warn_missing_val_classes(index: ImageFolderIndex, root: Path) -> None:
    """A val folder without some training classes measures an error over fewer classes: say which."""
    missing = [name for name, count in zip(index.classes, index.class_counts()) if count == 0]
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        warnings.warn(f"validation folder {root} has no images of {len(missing)} training class(es): {shown}; "
                      f"val error is measured over the other classes only", stacklevel=3)


def build_folder_eval_loader(folder: str | os.PathLike, classes: Sequence[str], *, batch_size: int, image_size: int,
                             resize: int | None = None, backend: str = "auto", num_workers: int = 2, rank: int = 0,
                             world_size: int = 1, local_rank: int = 0, device: torch.device | str = torch.device("cpu"),
                             verify: bool = True):
    """Evaluation over any ``<folder>/<wnid>/*`` tree (e.g. one ImageNet-C cell) with a FIXED class list.

    Folders may lack classes; a folder whose name is not in ``classes`` is a DatasetLayoutError.
    ``resize=None``: images are center-cropped to ``image_size`` (a no-op for 224x224 ImageNet-C);
    otherwise the shorter side is resized to ``resize`` first.
    """
    index = scan_image_folder(folder, classes=classes, verify=verify, allow_missing_classes=True, allow_empty=True)
    if not index.files:
        raise DatasetLayoutError(f"no readable images in {folder}")
    return build_image_loader(index.files, index.labels, index.classes, backend=backend, batch_size=batch_size,
                              train=False, image_size=image_size, resize=resize, num_workers=num_workers, rank=rank,
                              world_size=world_size, local_rank=local_rank, device=device, roots=[str(folder)])
