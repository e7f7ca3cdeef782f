"""Evaluation suites: where each benchmark's clean set and corrupted cells are on disk.

A suite turns a benchmark's file layout into a list of :class:`Cell` objects that the evaluator
runs without knowing any layout: ``suite.bind(classes, data_cfg)`` checks the tree against the
checkpoint, ``suite.clean()`` is the clean test set, ``suite.cells(corruptions, severities)``
returns ``(cells, missing)``. Every cell carries a fingerprint of its files (so a rerun on another
or changed tree re-evaluates it), the number of unreadable files it skips, and a loader factory.
Adding a benchmark (ImageNet-R/A/Sketch/V2, C-bar, CIFAR-10.1) is one more small class here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from apr.errors import UserError

from .cifar import cifar_name_for
from .layout import (_class_dirs, _list_class_dir, check_image_file, check_tree_classes,
                     find_missing_cells, folder_fingerprint)

__all__ = ["EvalError", "LoaderOptions", "Cell", "FolderCSuite", "CifarCSuite", "make_suite",
           "find_missing_cifar_c"]


class EvalError(UserError, ValueError):
    """An evaluation that cannot run as asked (missing cells, class mismatch, bad options)."""


@dataclass(frozen=True)
class LoaderOptions:
    """How the evaluator wants its batches: the same for every cell of a run."""

    batch_size: int = 256
    backend: str = "dali"
    num_workers: int = 4
    image_size: int = 224
    val_resize: int = 256
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Any = "cpu"


@dataclass
class Cell:
    """One scored unit: the clean set (``corruption="clean"``, severity 0) or one corruption/severity."""

    corruption: str
    severity: int
    fingerprint: dict
    make_loader: Callable[[LoaderOptions], Any] = field(repr=False)
    unreadable: list[str] = field(default_factory=list)
    empty_reason: str | None = None  # set when the cell has no readable image at all

    @property
    def name(self) -> str:
        return "clean" if self.corruption == "clean" else f"{self.corruption}/{self.severity}"


# ------------------------------------------------------------------------------------ folder trees

def _list_cell(folder: Path, classes: list[str], skip: frozenset = frozenset()) -> tuple[list[str], list[int]]:
    """Files and labels of ``<folder>/<class>/*`` in class order, without the files in ``skip``."""
    index = {name: i for i, name in enumerate(classes)}
    files, labels = [], []
    for name in _class_dirs(folder):
        entries = [f for f in _list_class_dir(folder / name) if f not in skip]
        files += entries
        labels += [index[name]] * len(entries)
    return files, labels


def _unreadable(files: list[str]) -> list[tuple[str, str]]:
    """(file, reason) of the files that fail the cheap header check, checked in parallel threads."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        reasons = list(pool.map(check_image_file, files, chunksize=256))
    return [(f, r) for f, r in zip(files, reasons) if r is not None]


def _folder_cell(corruption: str, severity: int, folder: Path, classes: list[str], resize_clean: bool) -> Cell:
    """Pre-flight of one folder cell: fingerprint, unreadable files, emptiness. The file list is listed
    again when the cell's loader is built (holding 75 lists of 50,000 paths per rank would cost GBs)."""
    files, _ = _list_cell(folder, classes)
    bad = _unreadable(files)
    skip = frozenset(f for f, _ in bad)
    reason = None
    if len(bad) == len(files):
        reason = f"all {len(bad)} image files are unreadable" if bad else "its class folders hold no image files"

    def make_loader(opts: LoaderOptions):
        from apr.data import build_image_loader

        files, labels = _list_cell(folder, classes, skip)
        return build_image_loader(
            files, labels, classes, backend=opts.backend, batch_size=opts.batch_size, train=False,
            image_size=opts.image_size, resize=opts.val_resize if resize_clean else None,
            num_workers=opts.num_workers, rank=opts.rank, world_size=opts.world_size,
            local_rank=opts.local_rank, device=opts.device, roots=[str(folder)])

    return Cell(corruption, severity, folder_fingerprint(folder), make_loader, [f"{f} ({r})" for f, r in bad], reason)


class FolderCSuite:
    """ImageNet-C layout ``<c_root>/<corruption>/<severity>/<class>/*`` plus a clean ``<val>/<class>/*``.

    ``dataset``: ``imagenet-c`` (AlexNet normalisation) or ``folder-c`` (any other tree, e.g. from
    ``apr.corrupt``); None picks ``imagenet-c`` for a 1000-class checkpoint.
    """

    def __init__(self, c_root: str | os.PathLike, val_root: str | os.PathLike, dataset: str | None = None):
        self.c_root, self.val_root, self.dataset = Path(c_root), Path(val_root), dataset
        self.classes: list[str] = []

    def bind(self, classes: list[str], data_cfg) -> "FolderCSuite":
        if not self.val_root.is_dir():
            raise EvalError(f"clean val folder not found: {self.val_root}")
        if not self.c_root.is_dir():
            raise EvalError(f"ImageNet-C root not found: {self.c_root}")
        if self.dataset is None:
            self.dataset = "imagenet-c" if len(classes) == 1000 else "folder-c"
        if self.dataset not in ("imagenet-c", "folder-c"):
            raise EvalError(f"dataset for a folder tree must be 'imagenet-c' or 'folder-c', got {self.dataset!r}")
        self.classes = list(classes)
        check_tree_classes([("clean val", self.val_root)], self.classes)
        return self

    def source(self) -> dict:
        return {"suite": "folder-c", "corrupted": str(self.c_root.resolve()), "clean": str(self.val_root.resolve())}

    def clean(self) -> Cell:
        return _folder_cell("clean", 0, self.val_root, self.classes, resize_clean=True)

    def cells(self, corruptions: Iterable[str], severities: Iterable[int]) -> tuple[list[Cell], list[str]]:
        present, missing = find_missing_cells(self.c_root, corruptions, severities)
        check_tree_classes([(f"cell {c}/{s}", self.c_root / c / str(s)) for c, s in present], self.classes)
        return [_folder_cell(c, s, self.c_root / c / str(s), self.classes, False) for c, s in present], missing


# ------------------------------------------------------------------------------------ CIFAR-C

def find_missing_cifar_c(root: str | Path, corruptions: Iterable[str]) -> tuple[list[str], list[str]]:
    """CIFAR-C keeps all five severities of a corruption in one ``<corruption>.npy``."""
    root = Path(root)
    if not root.is_dir():
        raise EvalError(f"CIFAR-C root not found: {root}")
    if not (root / "labels.npy").is_file():
        raise EvalError(f"CIFAR-C root {root} has no labels.npy (download CIFAR-10-C / CIFAR-100-C unpacked)")
    corruptions = list(corruptions)
    present = [c for c in corruptions if (root / f"{c}.npy").is_file()]
    return present, [c for c in corruptions if c not in present]


def _file_fingerprint(*paths: Path, images: int) -> dict:
    """Images of the cell, bytes of the files it is cut from, and their names, sizes and mtimes."""
    import hashlib

    digest = hashlib.sha1()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return {"files": images, "bytes": sum(p.stat().st_size for p in paths), "sha1": digest.hexdigest()}


def _tensor_cell(corruption: str, severity: int, fingerprint: dict, load: Callable, classes: list[str]) -> Cell:
    def make_loader(opts: LoaderOptions):
        from apr.data import TensorBatchLoader

        images, labels = load()
        labels = torch.as_tensor(labels)
        if int(labels.max()) >= len(classes) or int(labels.min()) < 0:
            raise EvalError(f"labels run from {int(labels.min())} to {int(labels.max())}, "
                            f"but the checkpoint has {len(classes)} classes")
        return TensorBatchLoader(images, labels, opts.batch_size, train=False, rank=opts.rank,
                                 world_size=opts.world_size, device=opts.device, classes=classes)

    return Cell(corruption, severity, fingerprint, make_loader)


class CifarCSuite:
    """CIFAR-10-C / CIFAR-100-C (``<corruption>.npy`` + ``labels.npy``) and the CIFAR test set."""

    def __init__(self, c_root: str | os.PathLike, cifar_root: str | os.PathLike):
        self.c_root, self.cifar_root = Path(c_root), Path(cifar_root)
        self.classes: list[str] = []
        self.dataset = None

    def bind(self, classes: list[str], data_cfg) -> "CifarCSuite":
        from .cifar import load_cifar

        name = cifar_name_for(data_cfg.dataset, classes)
        self.dataset, self.name, self.classes = f"{name}-c", name, list(classes)
        self._test = load_cifar(self.cifar_root, name, train=False)
        if list(self._test[2]) != self.classes:
            raise EvalError(f"the checkpoint's classes ({', '.join(classes[:4])}, ...) are not {name}'s "
                            f"({', '.join(self._test[2][:4])}, ...) in the same order")
        return self

    def source(self) -> dict:
        return {"suite": "cifar-c", "corrupted": str(self.c_root.resolve()), "clean": str(self.cifar_root.resolve())}

    def clean(self) -> Cell:
        from .cifar import CIFAR_FOLDERS

        folder = self.cifar_root / CIFAR_FOLDERS[self.name]
        batch = next(p for p in (folder / "test_batch", folder / "test", self.cifar_root / "test_batch",
                                 self.cifar_root / "test") if p.is_file())
        fingerprint = _file_fingerprint(batch, images=len(self._test[1]))
        return _tensor_cell("clean", 0, fingerprint, lambda: self._test[:2], self.classes)

    def cells(self, corruptions: Iterable[str], severities: Iterable[int]) -> tuple[list[Cell], list[str]]:
        from .cifar import load_cifar_c

        present, missing = find_missing_cifar_c(self.c_root, corruptions)
        severities = list(severities)
        cells = []
        for c in present:
            n = _npy_rows(self.c_root / f"{c}.npy") // 5
            fingerprint = _file_fingerprint(self.c_root / f"{c}.npy", self.c_root / "labels.npy", images=n)
            for s in severities:
                cells.append(_tensor_cell(c, s, fingerprint, lambda c=c, s=s: load_cifar_c(self.c_root, c, s),
                                          self.classes))
        return cells, [f"{c}/{s}" for c in missing for s in severities]


def _npy_rows(path: Path) -> int:
    import numpy as np

    return len(np.load(path, mmap_mode="r"))


def make_suite(*, imagenet_c: str | None = None, val: str | None = None, cifar_c: str | None = None,
               cifar: str | None = None, dataset: str | None = None):
    """The suite the command-line paths describe (exactly one of the two pairs)."""
    folder = imagenet_c is not None or val is not None
    tensors = cifar_c is not None or cifar is not None
    if folder == tensors:
        raise EvalError("give either --imagenet-c and --val (ImageNet layout) or --cifar-c and --cifar (CIFAR), "
                        "not both or neither")
    if folder:
        if imagenet_c is None or val is None:
            raise EvalError("ImageNet-C evaluation needs both the corrupted tree (--imagenet-c) and the clean val "
                            "folder (--val)")
        return FolderCSuite(imagenet_c, val, dataset)
    if cifar_c is None or cifar is None:
        raise EvalError("CIFAR-C evaluation needs both the CIFAR-C folder (--cifar-c) and the CIFAR folder (--cifar)")
    return CifarCSuite(cifar_c, cifar)
