"""Evaluation suites: where each benchmark's clean set and corrupted cells are on disk.

A suite turns a benchmark's file layout into a list of :class:`Cell` objects that the evaluator
runs without knowing any layout: ``suite.bind(classes, data_cfg)`` checks the tree against the
checkpoint, ``suite.clean()`` is the clean test set, ``suite.cells(corruptions, severities)``
returns ``(cells, missing)``. Every cell carries a fingerprint of its files (so a rerun on another
or changed tree re-evaluates it), the number of unreadable files it skips, and a loader factory.

Distribution-shift suites (:func:`make_shift_suite`: ImageNet-R/-A/-Sketch/-V2, ImageNet-C-bar,
CIFAR-10.1) follow the same contract with ``cells(severities)``; their cells name their ``suite``
and may carry a ``logit_subset`` (ImageNet-R/-A score only the logits of their 200 classes).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from apr.errors import UserError

from .cifar import cifar_name_for
from .layout import (_class_dirs, _list_class_dir, check_files, check_tree_classes,
                     find_missing_cells, folder_fingerprint, warn_missing_classes)

__all__ = ["EvalError", "LoaderOptions", "Cell", "FolderCSuite", "CifarCSuite", "make_suite",
           "find_missing_cifar_c", "SHIFT_SUITES", "C_BAR_SEVERITIES", "CIFAR10_CLASSES", "FolderShiftSuite",
           "CBarSuite", "Cifar101Suite", "make_shift_suite", "parse_suite_args", "make_clean_suite",
           "read_class_list"]


class EvalError(UserError, ValueError):
    """An evaluation that cannot run as asked (missing cells, class mismatch, bad options)."""


@dataclass(frozen=True)
class LoaderOptions:
    """How the evaluator wants its batches: the same for every cell of a run."""

    batch_size: int = 256
    backend: str = "auto"
    num_workers: int = 4
    image_size: int = 224
    val_resize: int = 256
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Any = "cpu"
    max_images: int | None = None  # a fixed class-balanced subset of every cell (apr.data.base.balanced_subset)


def _subset(labels, max_images: int | None):
    """Indices (in cell order) of the cell's ``max_images`` subset, or None for the whole cell."""
    from .base import balanced_subset

    if max_images is None or max_images >= len(labels):
        return None
    return balanced_subset(labels, max_images).sort().values

@dataclass
class Cell:
    """One scored unit: the clean set (``corruption="clean"``, severity 0) or one corruption/severity."""

    corruption: str
    severity: int
    fingerprint: dict
    make_loader: Callable[[LoaderOptions], Any] = field(repr=False)
    unreadable: list[str] = field(default_factory=list)
    empty_reason: str | None = None  # set when the cell has no readable image at all
    suite: str | None = None  # a distribution-shift suite's name; None: the corruption suite's cells
    logit_subset: list[int] | None = None  # score only these classes' logits (ImageNet-R/-A)
    missing_classes: list[str] = field(default_factory=list)  # classes the set should hold but has no image of

    @property
    def name(self) -> str:
        """``clean``, ``<corruption>/<severity>``, or a one-cell suite's name (severity 0)."""
        return self.corruption if self.severity == 0 else f"{self.corruption}/{self.severity}"


# ------------------------------------------------------------------------------------ folder trees

def _list_cell(folder: Path, label_of: dict[str, int], skip: frozenset = frozenset()) -> tuple[list[str], list[int]]:
    """Files and labels of ``<folder>/<class folder>/*`` in folder order, without the files in ``skip``;
    ``label_of`` maps a class folder's name to the model's class index."""
    files, labels = [], []
    for name in _class_dirs(folder):
        entries = [f for f in _list_class_dir(folder / name) if f not in skip]
        files += entries
        labels += [label_of[name]] * len(entries)
    return files, labels


def _unreadable(files: list[str]) -> list[tuple[str, str]]:
    """(file, reason) of the files that fail the header check or do not decode (PIL), in parallel threads:
    every backend then scores the same files (DALI would decode a scrambled JPEG body into garbage)."""
    reasons = check_files(files, decode=True)
    return [(f, r) for f, r in zip(files, reasons) if r is not None]


def _folder_cell(corruption: str, severity: int, folder: Path, classes: list[str], resize_clean: bool,
                 label_of: dict[str, int] | None = None, expect_all: bool = False, **extra) -> Cell:
    """Pre-flight of one folder cell: fingerprint, unreadable files, emptiness. The file list is listed
    again when the cell's loader is built (holding 75 lists of 50,000 paths per rank would cost GBs).
    ``resize_clean``: resize the shorter side to ``val_resize`` before the centre crop (full-size photos);
    ``label_of``: class folder -> class index (default: the folder is the class name); ``expect_all``: the set
    should hold every class of ``classes`` (a val folder, Sketch, V2): those without a readable image are
    listed in ``missing_classes`` and warned about; ``extra``: Cell fields."""
    label_of = label_of if label_of is not None else {name: i for i, name in enumerate(classes)}
    files, labels = _list_cell(folder, label_of)
    bad = _unreadable(files)
    skip = frozenset(f for f, _ in bad)
    if expect_all:
        kept = {label for f, label in zip(files, labels) if f not in skip}
        extra["missing_classes"] = warn_missing_classes(folder, [c for i, c in enumerate(classes) if i not in kept])
    reason = None
    if len(bad) == len(files):
        reason = f"all {len(bad)} image files are unreadable" if bad else "its class folders hold no image files"

    def make_loader(opts: LoaderOptions):
        from apr.data import build_image_loader

        files, labels = _list_cell(folder, label_of, skip)
        keep = _subset(labels, opts.max_images)
        if keep is not None:
            files, labels = [files[i] for i in keep.tolist()], [labels[i] for i in keep.tolist()]
        return build_image_loader(
            files, labels, classes, backend=opts.backend, batch_size=opts.batch_size, train=False,
            image_size=opts.image_size, resize=opts.val_resize if resize_clean else None,
            num_workers=opts.num_workers, rank=opts.rank, world_size=opts.world_size,
            local_rank=opts.local_rank, device=opts.device, roots=[str(folder)])

    return Cell(corruption, severity, folder_fingerprint(folder), make_loader, [f"{f} ({r})" for f, r in bad], reason,
                **extra)


class FolderCSuite:
    """ImageNet-C layout ``<c_root>/<corruption>/<severity>/<class>/*`` plus a clean ``<val>/<class>/*``.

    ``dataset``: ``imagenet-c`` (AlexNet normalisation) or ``folder-c`` (any other tree, e.g. from
    ``apr.corrupt``); None picks ``imagenet-c`` for a 1000-class checkpoint.
    """

    def __init__(self, c_root: str | os.PathLike, val_root: str | os.PathLike, dataset: str | None = None):
        self.c_root = None if c_root is None else Path(c_root)  # None: only the clean set is used
        self.val_root, self.dataset = Path(val_root), dataset
        self.classes: list[str] = []

    def bind(self, classes: list[str], data_cfg) -> "FolderCSuite":
        if not self.val_root.is_dir():
            raise EvalError(f"clean val folder not found: {self.val_root}")
        if self.c_root is not None and not self.c_root.is_dir():
            raise EvalError(f"ImageNet-C root not found: {self.c_root}")
        if self.dataset is None:
            self.dataset = "imagenet-c" if len(classes) == 1000 else "folder-c"
        if self.dataset not in ("imagenet-c", "folder-c"):
            raise EvalError(f"dataset for a folder tree must be 'imagenet-c' or 'folder-c', got {self.dataset!r}")
        self.classes = list(classes)
        check_tree_classes([("clean val", self.val_root)], self.classes)
        return self

    def source(self) -> dict:
        return {"suite": "folder-c", "corrupted": self.c_root and str(self.c_root.resolve()),
                "clean": str(self.val_root.resolve())}

    def clean(self) -> Cell:
        return _folder_cell("clean", 0, self.val_root, self.classes, resize_clean=True, expect_all=True)

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
    """Images of the cell and ``apr.results.files_fingerprint`` of the files it is cut from."""
    from apr.results import files_fingerprint

    return {**files_fingerprint(paths[0].parent, paths), "files": images}


def _tensor_cell(corruption: str, severity: int, fingerprint: dict, load: Callable, classes: list[str],
                 **extra) -> Cell:
    def make_loader(opts: LoaderOptions):
        from apr.data import TensorBatchLoader

        images, labels = load()
        labels = torch.as_tensor(labels)
        keep = _subset(labels, opts.max_images)
        if keep is not None:
            images, labels = images[keep.numpy()], labels[keep]
        if int(labels.max()) >= len(classes) or int(labels.min()) < 0:
            raise EvalError(f"labels run from {int(labels.min())} to {int(labels.max())}, "
                            f"but the checkpoint has {len(classes)} classes")
        return TensorBatchLoader(images, labels, opts.batch_size, train=False, rank=opts.rank,
                                 world_size=opts.world_size, device=opts.device, classes=classes)

    return Cell(corruption, severity, fingerprint, make_loader, **extra)


class CifarCSuite:
    """CIFAR-10-C / CIFAR-100-C (``<corruption>.npy`` + ``labels.npy``) and the CIFAR test set."""

    def __init__(self, c_root: str | os.PathLike, cifar_root: str | os.PathLike):
        self.c_root = None if c_root is None else Path(c_root)  # None: only the clean set is used
        self.cifar_root = Path(cifar_root)
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
        return {"suite": "cifar-c", "corrupted": self.c_root and str(self.c_root.resolve()),
                "clean": str(self.cifar_root.resolve())}

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


def _read_npy(path: Path):
    """An ``.npy`` array, never unpickled: random bytes, object arrays or a truncated file are an EvalError."""
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EvalError(f"cannot read {path} as a NumPy array file ({why}); download it again") from None


def _npy_rows(path: Path) -> int:
    import numpy as np

    try:
        return len(np.load(path, mmap_mode="r", allow_pickle=False))
    except (ValueError, OSError, EOFError, TypeError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EvalError(f"cannot read {path} as a NumPy array file ({why}); download it again") from None


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


# ------------------------------------------------------------------------------------ distribution shift

SHIFT_SUITES = ("imagenet-r", "imagenet-a", "imagenet-sketch", "imagenet-v2", "imagenet-c-bar", "cifar10.1")
_SUBSET_SUITES = {"imagenet-r": 200, "imagenet-a": 200}  # scored on the logits of their own classes only
#: ImageNet-C-bar: corruption -> its 5 severity parameters, as in facebookresearch/augmentation-corruption
#: (imagenet_c_bar/imagenet_c_bar.csv); its generator names each severity folder "{parameter:.2f}".
C_BAR_SEVERITIES: dict[str, tuple[float, ...]] = {
    "blue_noise_sample": (0.8, 1.6, 2.4, 4.0, 5.6), "brownish_noise": (1.0, 2.0, 3.0, 4.0, 5.0),
    "caustic_refraction": (2.35, 3.2, 4.9, 6.6, 9.15), "checkerboard_cutout": (2.0, 3.0, 4.0, 5.0, 6.0),
    "cocentric_sine_waves": (3.0, 5.0, 8.0, 9.0, 10.0), "inverse_sparkles": (1.0, 2.0, 4.0, 9.0, 10.0),
    "perlin_noise": (4.6, 5.2, 5.8, 7.6, 8.8), "plasma_noise": (4.75, 7.0, 8.5, 9.25, 10.0),
    "single_frequency_greyscale": (1.0, 1.5, 2.0, 4.5, 5.0), "sparkles": (1.0, 2.0, 3.0, 5.0, 6.0),
}
#: CIFAR-10's label names in label order: CIFAR-10.1's labels index this list.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class FolderShiftSuite:
    """One folder ``<root>/<class folder>/<image>`` scored as one cell, resized like the clean val set
    (shorter side ``val_resize``, centre crop ``image_size``: 256/224 at ImageNet size).

    ImageNet-R, -A, -Sketch: class folders are wnids, mapped to the model's classes by name; R and A
    hold 200 of the 1,000 classes and are scored on those classes' logits only (``logit_subset``, taken
    from the folders found, as their authors' evaluation). ImageNet-V2: folders ``0`` ... ``999`` are
    class indices of the standard (sorted-wnid) ImageNet order.
    """

    def __init__(self, name: str, root: str | os.PathLike):
        self.name, self.root = name, Path(root)
        self.label_of: dict[str, int] = {}
        self.subset: list[int] | None = None
        self.classes: list[str] = []

    def bind(self, classes: list[str], data_cfg=None) -> "FolderShiftSuite":
        if not self.root.is_dir():
            raise EvalError(f"{self.name} folder not found: {self.root}")
        folders = _class_dirs(self.root)
        if not folders:
            raise EvalError(f"{self.name} folder {self.root} has no class folders ({self._layout()})")
        self.classes = list(classes)
        self.label_of = _index_folders(folders, classes, self.root) if self.name == "imagenet-v2" else \
            _wnid_folders(folders, classes, f"{self.name} ({self.root})")
        if self.name in _SUBSET_SUITES:
            self.subset = sorted(set(self.label_of.values()))
            if len(self.subset) != _SUBSET_SUITES[self.name]:
                import warnings

                warnings.warn(f"{self.name} ({self.root}) has {len(self.subset)} class folders, not the "
                              f"{_SUBSET_SUITES[self.name]} of the published set: scoring on those "
                              f"{len(self.subset)} classes (incomplete download?)", stacklevel=2)
        return self

    def _layout(self) -> str:
        return "expected <root>/<0..999>/<image>" if self.name == "imagenet-v2" else \
            "expected <root>/<wnid, e.g. n01443537>/<image>"

    def source(self) -> dict:
        source = {"suite": self.name, "root": str(self.root.resolve()), "classes": len(set(self.label_of.values()))}
        if self.name == "imagenet-v2":
            source["label_order"] = v2_label_order(self.classes)
        return source

    def cells(self, severities: Iterable[int] = ()) -> tuple[list[Cell], list[str]]:
        cell = _folder_cell(self.name, 0, self.root, self.classes, True, self.label_of, suite=self.name,
                            logit_subset=self.subset, expect_all=self.name not in _SUBSET_SUITES)
        if self.name == "imagenet-v2":  # the label map is part of what the cell was computed from
            cell.fingerprint = {**cell.fingerprint, "label_order": v2_label_order(self.classes)}
        return [cell], []


def _wnid_folders(folders: list[str], classes: list[str], where: str) -> dict[str, int]:
    """Class folder -> the model's index of that class; every folder must be one of the model's classes."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise EvalError(f"{where} has {len(unknown)} class folder(s) the model does not know: "
                        f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}. The model's classes are "
                        f"{', '.join(classes[:3])}, ... ({len(classes)}); for a third-party model give --val or "
                        "--classes with the ImageNet wnids")
    return {f: index[f] for f in folders}


def _index_folders(folders: list[str], classes: list[str], root: Path) -> dict[str, int]:
    """ImageNet-V2's folders ``0``..``999`` -> the model's class index (index i = the i-th sorted wnid)."""
    bad = [f for f in folders if not f.isdigit() or not 0 <= int(f) < 1000]
    if bad:
        raise EvalError(f"imagenet-v2 folder {root} has class folder(s) that are not class indices 0..999: "
                        f"{', '.join(bad[:5])} (expected the published layout <root>/<0..999>/<image>)")
    if len(classes) != 1000:
        raise EvalError(f"imagenet-v2 needs a 1000-class ImageNet model, this one has {len(classes)} classes")
    if v2_label_order(classes) == "class list":  # e.g. a --classes file of words, already in the standard order
        return {f: int(f) for f in folders}
    standard = sorted(classes)
    index = {name: i for i, name in enumerate(classes)}
    return {f: index[standard[int(f)]] for f in folders}


_WNID = re.compile(r"^n\d{8}$")


def v2_label_order(classes: list[str]) -> str:
    """How ImageNet-V2's folder index i finds the model's class: ``sorted wnids`` (i = the i-th sorted wnid,
    wherever the model puts it) when the class names are wnids; otherwise ``class list`` (i = the i-th class
    of the list: names that are not wnids cannot be sorted into the standard order)."""
    return "sorted wnids" if all(_WNID.match(c) for c in classes) else "class list"


class CBarSuite:
    """ImageNet-C-bar: ``<root>/<corruption>/<severity>/<wnid>/<image>``, 10 corruptions x 5 severities of
    224 x 224 images (no resize, as ImageNet-C). A severity folder is named by its parameter
    (``0.80``, as the published generator writes it) or by its level ``1``..``5``."""

    name = "imagenet-c-bar"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.classes: list[str] = []

    def bind(self, classes: list[str], data_cfg=None) -> "CBarSuite":
        if not self.root.is_dir():
            raise EvalError(f"imagenet-c-bar folder not found: {self.root}")
        self.classes = list(classes)
        return self

    def source(self) -> dict:
        return {"suite": self.name, "root": str(self.root.resolve())}

    def _folder(self, corruption: str, severity: int) -> Path | None:
        base = self.root / corruption
        for name in (f"{C_BAR_SEVERITIES[corruption][severity - 1]:.2f}", str(severity)):
            if (base / name).is_dir() and any(p.is_dir() for p in (base / name).iterdir()):
                return base / name
        return None

    def cells(self, severities: Iterable[int] = (1, 2, 3, 4, 5)) -> tuple[list[Cell], list[str]]:
        cells, missing = [], []
        for corruption in C_BAR_SEVERITIES:
            for s in severities:
                folder = self._folder(corruption, int(s))
                if folder is None:
                    missing.append(f"{corruption}/{C_BAR_SEVERITIES[corruption][int(s) - 1]:.2f}")
                    continue
                label_of = _wnid_folders(_class_dirs(folder), self.classes, f"imagenet-c-bar cell {folder}")
                cells.append(_folder_cell(corruption, int(s), folder, self.classes, False, label_of, suite=self.name))
        return cells, missing


class Cifar101Suite:
    """CIFAR-10.1 (Recht et al.): ``cifar10.1_v6_data.npy`` (N x 32 x 32 x 3 uint8) and
    ``cifar10.1_v6_labels.npy`` (CIFAR-10 label indices) in one folder; ``v4`` files are taken when
    ``v6`` is absent. 32 x 32 images, no preprocessing, as the CIFAR-10 test set."""

    name = "cifar10.1"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.classes: list[str] = []
        self.files: tuple[Path, Path] | None = None

    def bind(self, classes: list[str], data_cfg=None) -> "Cifar101Suite":
        if not self.root.is_dir():
            raise EvalError(f"cifar10.1 folder not found: {self.root}")
        for version in ("v6", "v4"):
            data, labels = (self.root / f"cifar10.1_{version}_{part}.npy" for part in ("data", "labels"))
            if data.is_file() and labels.is_file():
                self.files = (data, labels)
                break
        else:
            raise EvalError(f"cifar10.1 folder {self.root} lacks cifar10.1_v6_data.npy + cifar10.1_v6_labels.npy "
                            "(or the v4 pair)")
        if tuple(classes) != CIFAR10_CLASSES:
            raise EvalError(f"cifar10.1 needs a CIFAR-10 model (classes {', '.join(CIFAR10_CLASSES[:3])}, ... in "
                            f"CIFAR-10's order); this one has {len(classes)} classes ({', '.join(classes[:3])}, ...)")
        self.classes = list(classes)
        return self

    def source(self) -> dict:
        return {"suite": self.name, "root": str(self.root.resolve()), "files": [p.name for p in self.files]}

    def _load(self):
        """(uint8 N x 32 x 32 x 3 images, int64 labels in 0..9), or an EvalError naming the broken file."""
        import numpy as np

        data, labels = (_read_npy(p) for p in self.files)
        if data.ndim != 4 or data.shape[1:] != (32, 32, 3) or data.dtype != np.uint8:
            raise EvalError(f"{self.files[0]}: expected uint8 N x 32 x 32 x 3 images, got {data.dtype} {data.shape}")
        if len(data) == 0:
            raise EvalError(f"{self.files[0]} holds no images")
        if labels.shape != (len(data),):
            raise EvalError(f"{self.files[1]}: expected {len(data)} labels, got shape {labels.shape}")
        if labels.dtype.kind not in "iuf" or (labels.dtype.kind == "f" and not np.all(labels == np.round(labels))):
            raise EvalError(f"{self.files[1]}: labels must be whole class indices 0..9, got {labels.dtype} values "
                            f"such as {labels.reshape(-1)[:3].tolist()} (a label is never rounded or truncated)")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
            raise EvalError(f"{self.files[1]}: labels run from {labels.min()} to {labels.max()}, CIFAR-10 has 0..9")
        return data, labels.astype("int64")

    def cells(self, severities: Iterable[int] = ()) -> tuple[list[Cell], list[str]]:
        data, _ = self._load()  # checked before any forward pass (and a broken file named), not in the cell loop
        fingerprint = _file_fingerprint(*self.files, images=len(data))
        return [_tensor_cell(self.name, 0, fingerprint, self._load, self.classes, suite=self.name)], []


def make_shift_suite(name: str, root: str | os.PathLike):
    """The suite ``name`` (one of :data:`SHIFT_SUITES`) read from ``root``."""
    if name in ("imagenet-r", "imagenet-a", "imagenet-sketch", "imagenet-v2"):
        return FolderShiftSuite(name, root)
    if name == "imagenet-c-bar":
        return CBarSuite(root)
    if name == "cifar10.1":
        return Cifar101Suite(root)
    raise EvalError(f"unknown suite {name!r}; known: {', '.join(SHIFT_SUITES)}")


def parse_suite_args(items: Iterable[str]) -> dict[str, str]:
    """``["imagenet-r=/data/imagenet-r", ...]`` -> {name: root}, each name known and given once."""
    suites: dict[str, str] = {}
    for item in items:
        name, sep, root = item.partition("=")
        if not sep or not root:
            raise EvalError(f"--suite takes NAME=FOLDER (e.g. imagenet-r=/data/imagenet-r), got {item!r}")
        if name not in SHIFT_SUITES:
            raise EvalError(f"unknown suite {name!r} in --suite {item!r}; known: {', '.join(SHIFT_SUITES)}")
        if name in suites:
            raise EvalError(f"--suite {name} is given twice")
        suites[name] = root
    return suites


def make_clean_suite(*, val: str | None = None, cifar: str | None = None):
    """The clean test set alone (``--val`` folder or ``--cifar`` test batch), for the shift table's clean column."""
    if val is not None:
        return FolderCSuite(None, val)
    if cifar is not None:
        return CifarCSuite(None, cifar)
    return None


def read_class_list(*, classes_file: str | None = None, val: str | None = None, cifar: str | None = None) -> list[str]:
    """The class list of a third-party model: one name per line of ``classes_file``, else the sorted class
    folders of ``val`` (ImageNet: the 1,000 sorted wnids), else the CIFAR folder's label names."""
    if classes_file is not None:
        path = Path(classes_file)
        if not path.is_file():
            raise EvalError(f"--classes file not found: {path}")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(set(names)) != len(names) or not names:
            raise EvalError(f"--classes file {path} must list each class once, one per line")
        return names
    if val is not None:
        if not Path(val).is_dir():
            raise EvalError(f"clean val folder not found: {val}")
        return _class_dirs(Path(val))
    if cifar is not None:
        from .cifar import CIFAR_FOLDERS, load_cifar

        name = next((n for n, folder in CIFAR_FOLDERS.items()
                     if (Path(cifar) / folder).is_dir() or Path(cifar).name == folder), "cifar10")
        return list(load_cifar(cifar, name, train=False)[2])
    raise EvalError("a third-party model needs its class list: give --val (its class folders, sorted, are the "
                    "classes: the 1,000 ImageNet wnids) or --classes FILE (one class name per line, in the "
                    "model's output order)")
