"""ImageNet-layout discovery and validation: ``<root>/<wnid>/<image>`` -> files, labels, classes.

Class index = sorted class-folder names (the same as torchvision's ImageFolder), so a checkpoint's
class list means the same thing whichever backend trained it.

Corrupt-file policy (a multi-day run must not die on one bad JPEG):

- ``verify=True`` (``cfg.data.verify_images``, the default): while scanning, each file's first and
  last bytes are read (no decode): a JPEG must start with SOI ``FF D8`` and hold EOI ``FF D9`` in its
  last 4 KiB, a PNG must carry its 8-byte signature and ``IEND`` near its end; BMP/WebP/TIFF/PNM must
  carry their signature; zero-byte files fail. Bad files are skipped, listed in ``index.skipped`` and
  reported once in a warning naming the first few. This catches truncated copies, text/HTML error
  pages saved as ``.JPEG`` and empty files, which are the failures seen in practice; it costs two
  small reads per file (parallel threads), not a decode.
- ``decode=True`` (every evaluation set, and DALI training): each file that passes is also decoded
  by PIL (JPEGs in DCT-scaled draft mode, which still reads every entropy-coded block). This finds a
  valid header on a scrambled body, which DALI would otherwise decode into garbage and score, and
  images PIL refuses to open (a 16000 x 16000 PNG): so every backend skips, counts and names the same
  files. Cost measured here (one core, PIL 12): 0.07 ms per 32 px JPEG, 0.19 ms per 224 px ImageNet-C
  JPEG, 0.75 ms per 500 x 375 photo, against 0.007 ms for the header check (ImageNet-C's 3.75 M files:
  about 12 core-minutes). Results are cached per folder (:func:`check_files`): unchanged folders are
  not decoded again (0.01 ms per file).
- GIF files are refused by the check on every backend: DALI cannot decode GIF, and a set must not be
  scored differently by different backends.
- ``verify=False``: nothing is checked; an undecodable file then stops DALI with
  :class:`ImageDecodeError` (DALI 2.4's own error says only ``nvImageCodec failure`` and not which
  file, see ``apr.data.dali``), and the torchvision backend raises it naming the file.
  ``python -m apr.data.layout ROOT --decode`` finds such files with a full PIL decode.
"""

from __future__ import annotations

from apr.errors import UserError
import argparse
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "DatasetLayoutError",
    "ImageDecodeError",
    "ImageFolderIndex",
    "IMG_EXTENSIONS",
    "scan_image_folder",
    "scan_train_roots",
    "check_image_file",
    "check_files",
    "decode_problem",
    "find_undecodable",
    "folder_fingerprint",
    "find_missing_cells",
    "check_tree_classes",
    "warn_missing_classes",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
_TAIL = 4096
_SIGNATURES = (b"BM", b"II*\x00", b"MM\x00*", b"P6", b"P5")


class DatasetLayoutError(UserError, ValueError):
    """A dataset folder that does not have the expected ``<root>/<class>/<image>`` layout."""


class ImageDecodeError(UserError, RuntimeError):
    """An image file that the decoder could not read (raised only with verification off)."""


@dataclass
class ImageFolderIndex:
    """The files of one or more ImageNet-layout folders and their labels in one class space."""

    root: str
    classes: list[str]
    files: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    def class_counts(self) -> list[int]:
        counts = [0] * len(self.classes)
        for label in self.labels:
            counts[label] += 1
        return counts


def check_image_file(path: str | os.PathLike, decode: bool = False) -> str | None:
    """Cheap header/trailer check (and, with ``decode``, a PIL decode); None if usable, else a short reason."""
    reason = _check_header(path)
    if reason is None and decode:
        reason = decode_problem(path)
    return reason


def decode_problem(path: str | os.PathLike) -> str | None:
    """Why PIL cannot decode ``path`` (None if it can). JPEGs decode in draft mode (1/8 scale in the DCT
    domain: every entropy-coded block is still read, so a scrambled body fails as in a full decode)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, DecompressionBombError ... for bad data
        text = str(exc).splitlines()[0] if str(exc) else ""
        return f"undecodable: {type(exc).__name__}: {text}".rstrip(": ")
    return None


def check_files(files: Sequence[str], decode: bool = False, workers: int = 16) -> list[str | None]:
    """:func:`check_image_file` of every file (parallel threads), in order: the one check of every scan.

    The decode results are cached per folder, keyed by its files' names, sizes and modification times, in
    ``$APR_CACHE_DIR/decode-check`` (default ``~/.cache/apr``): a rerun, a resumed training or another
    command over the same unchanged files pays the header check only."""
    files = [str(f) for f in files]
    cached, keys = _cached_decode_results(files) if decode else ({}, {})
    todo = [f for f in files if f not in cached]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        found = dict(zip(todo, pool.map(lambda f: check_image_file(f, decode), todo, chunksize=64)))
    if decode:
        _store_decode_results(keys, {f: r for f, r in found.items() if f in keys})
    return [cached[f] if f in cached else found[f] for f in files]


def record_decodable(files: Sequence[str]) -> None:
    """Record ``files`` as decodable without decoding them: the complete image lists of folders this process
    has just written with PIL (apr.corrupt's fresh trees), so the first evaluation does not decode them
    all again (ImageNet-C: about 12 core-minutes). A file changed later no longer matches its folder's key."""
    _store_decode_results(_folder_keys([str(f) for f in files]), {})


def _decode_cache_dir() -> Path:
    return Path(os.environ.get("APR_CACHE_DIR") or Path.home() / ".cache" / "apr") / "decode-check"


def _folder_keys(files: Sequence[str]) -> dict[str, str]:
    """file -> the cache key of its folder's files (sha1 of folder, names, sizes, mtimes); unstattable files none."""
    import hashlib

    by_folder: dict[str, list[str]] = {}
    for f in files:
        by_folder.setdefault(os.path.dirname(f), []).append(f)
    keys = {}
    for folder, members in by_folder.items():
        digest = hashlib.sha1(f"{os.path.realpath(folder)}\n".encode())
        try:
            for f in sorted(members):
                st = os.stat(f)
                digest.update(f"{os.path.basename(f)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            continue
        keys.update({f: digest.hexdigest() for f in members})
    return keys


def _cached_decode_results(files: Sequence[str]) -> tuple[dict[str, str | None], dict[str, str]]:
    """(file -> cached reason or None, file -> folder key) for the folders checked before, unchanged since."""
    import json

    keys, cached = _folder_keys(files), {}
    for key in set(keys.values()):
        try:
            bad = json.loads((_decode_cache_dir() / f"{key}.json").read_text())
        except (OSError, ValueError):
            continue
        cached.update({f: bad.get(os.path.basename(f)) for f, k in keys.items() if k == key})
    return cached, {f: k for f, k in keys.items() if f not in cached}


def _store_decode_results(keys: dict[str, str], found: dict[str, str | None]) -> None:
    """Record each folder's undecodable files (name -> reason); a cache that cannot be written is skipped."""
    import json

    from apr.io import atomic_open

    per_key: dict[str, dict[str, str]] = {}
    for f, key in keys.items():
        per_key.setdefault(key, {})
        if found.get(f) is not None:
            per_key[key][os.path.basename(f)] = found[f]
    try:
        _decode_cache_dir().mkdir(parents=True, exist_ok=True)
        for key, bad in per_key.items():
            with atomic_open(_decode_cache_dir() / f"{key}.json", "w") as out:
                json.dump(bad, out)
    except OSError:
        pass


def _check_header(path: str | os.PathLike) -> str | None:
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            head = f.read(16)
            if size > _TAIL:
                f.seek(size - _TAIL)
            else:
                f.seek(0)
            tail = f.read(_TAIL)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if head[:2] == b"\xff\xd8":
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return None if b"IEND" in tail else "truncated PNG (no IEND chunk)"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return None
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF image: not decoded by every backend (DALI cannot), so skipped by all; convert it to PNG"
    if any(head.startswith(sig) for sig in _SIGNATURES):
        return None
    return "not an image (unknown file signature)"


def _list_class_dir(class_dir: Path) -> list[str]:
    return sorted(
        str(class_dir / name)
        for name in os.listdir(class_dir)
        if not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS) and (class_dir / name).is_file()
    )


def _class_dirs(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def scan_image_folder(root: str | os.PathLike, classes: Sequence[str] | None = None, verify: bool = True,
                      *, allow_missing_classes: bool = False, allow_empty: bool = False,
                      workers: int = 16, warn: bool = True, decode: bool = False) -> ImageFolderIndex:
    """Index ``<root>/<class>/<image>``.

    ``classes``: a fixed class list (e.g. from the training set or a checkpoint); a folder that is not
    in it is an error. Without it the classes are the sorted folder names. ``allow_missing_classes``:
    classes of the list may lack a folder (ImageNet-C cells, subsets). ``allow_empty``: an empty class
    folder is accepted (evaluation trees), else it is an error naming the folder. ``decode``: the
    files that pass the header check are decoded too (:func:`decode_problem`).
    """
    root = Path(root)
    if not root.exists():
        raise DatasetLayoutError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset path is not a folder: {root}")
    found = _class_dirs(root)
    if not found:
        raise DatasetLayoutError(
            f"no class folders in {root}: expected ImageNet layout {root}/<class, e.g. n01440764>/<image>.JPEG")
    if classes is None:
        classes = found
    else:
        classes = list(classes)
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DatasetLayoutError(
                f"{root} has class folder(s) not in the class list ({len(classes)} classes): "
                f"{_preview(unknown)}")
        missing = sorted(set(classes) - set(found))
        if missing and not allow_missing_classes:
            raise DatasetLayoutError(f"{root} lacks class folder(s): {_preview(missing)}")
    index = {name: i for i, name in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    for name in found:
        entries = _list_class_dir(root / name)
        if not entries and not allow_empty:
            raise DatasetLayoutError(f"class folder has no images: {root / name}")
        files += entries
        labels += [index[name]] * len(entries)
    skipped: list[str] = []
    if verify and files:
        reasons = check_files(files, decode, workers)
        keep = [r is None for r in reasons]
        skipped = [f"{f} ({r})" for f, r in zip(files, reasons) if r is not None]
        files = [f for f, k in zip(files, keep) if k]
        labels = [lab for lab, k in zip(labels, keep) if k]
        if not allow_empty:
            _refuse_unreadable_classes(root, found, index, labels)
        if skipped and warn:
            warnings.warn(f"{root}: skipped {len(skipped)} unreadable image file(s): {_preview(skipped, 5)}",
                          stacklevel=2)
    return ImageFolderIndex(root=str(root), classes=list(classes), files=files, labels=labels, skipped=skipped)


def _refuse_unreadable_classes(root: Path, found: list[str], index: dict[str, int], labels: list[int]) -> None:
    """A class folder whose every file failed the check would silently become a class of 0 images."""
    kept = set(labels)
    dead = [str(root / name) for name in found if index[name] not in kept]
    if dead:
        raise DatasetLayoutError(f"every image file is unreadable in class folder(s) {_preview(dead, 5)}; "
                                 "replace the files (python -m apr.data.layout ROOT lists them) or remove the folder")


def warn_missing_classes(folder: str | os.PathLike, missing: Sequence[str]) -> list[str]:
    """Say that an evaluated set lacks some of the model's classes (its error is then over the other classes
    only); returns ``missing`` for the results file."""
    missing = list(missing)
    if missing:
        warnings.warn(f"{folder} has no readable image of {len(missing)} of the model's classes "
                      f"({_preview(missing)}): its error is measured over the other classes only "
                      "(recorded as missing_classes)", stacklevel=3)
    return missing


def scan_train_roots(roots: Iterable[str | os.PathLike], verify: bool = True, **kwargs) -> ImageFolderIndex:
    """Merge several training folders (ImageNet train + DeepAugment EDSR/, CAE/) into one label space.

    All roots must have the same class folders: a DeepAugment copy that lacks or adds classes would
    silently shift labels, so differences are listed in the error.
    """
    roots = [Path(r) for r in roots]
    first = scan_image_folder(roots[0], verify=verify, **kwargs)
    merged = ImageFolderIndex(root=str(roots[0]), classes=first.classes, files=list(first.files),
                              labels=list(first.labels), skipped=list(first.skipped))
    for extra in roots[1:]:
        if not extra.is_dir():
            raise DatasetLayoutError(f"extra training folder not found: {extra}")
        extra_classes = _class_dirs(extra)
        missing = sorted(set(first.classes) - set(extra_classes))
        added = sorted(set(extra_classes) - set(first.classes))
        if missing or added:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)}: {_preview(missing)}")
            if added:
                parts.append(f"not in {roots[0]}: {_preview(added)}")
            raise DatasetLayoutError(
                f"extra training folder {extra} has different classes than {roots[0]} ({'; '.join(parts)})")
        idx = scan_image_folder(extra, classes=first.classes, verify=verify, **kwargs)
        merged.files += idx.files
        merged.labels += idx.labels
        merged.skipped += idx.skipped
    return merged


def find_undecodable(files: Sequence[str], workers: int = 4, progress: bool = True) -> list[str]:
    """Fully decode every file with PIL (slow; for diagnosis) and return ``"path (reason)"`` for failures."""
    from PIL import Image
    from tqdm import tqdm

    def check(path: str) -> str | None:
        try:
            with Image.open(path) as img:
                img.convert("RGB").load()
        except Exception as exc:  # PIL raises many types for bad data
            return f"{path} ({type(exc).__name__}: {exc})"
        return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(tqdm(pool.map(check, files), total=len(files), disable=not progress, desc="decode"))
    return [r for r in results if r is not None]


def folder_fingerprint(root: str | os.PathLike) -> dict:
    """What an evaluation cell was computed from: ``apr.results.files_fingerprint`` of its class folders'
    images (a copied, regenerated or edited tree gives another fingerprint)."""
    from apr.results import files_fingerprint

    root = Path(root)
    return files_fingerprint(root, (path for name in _class_dirs(root) for path in _list_class_dir(root / name)))


def find_missing_cells(root: str | Path, corruptions: Iterable[str], severities: Iterable[int]
                       ) -> tuple[list[tuple[str, int]], list[str]]:
    """Split the cells of ``<root>/<corruption>/<severity>/`` into present and missing (``"c/s"``).

    A cell counts as present when its folder holds at least one sub-folder (class folder).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"corrupted-image root not found: {root}")
    present, missing = [], []
    for corruption in corruptions:
        for severity in severities:
            cell = root / corruption / str(severity)
            if cell.is_dir() and any(p.is_dir() for p in cell.iterdir()):
                present.append((corruption, int(severity)))
            else:
                missing.append(f"{corruption}/{severity}")
    return present, missing


def check_tree_classes(folders: Iterable[tuple[str, Path]], classes: Sequence[str]) -> None:
    """Every class folder of an evaluation tree must be a class the checkpoint was trained on."""
    known = set(classes)
    for label, folder in folders:
        found = sorted(p.name for p in Path(folder).iterdir() if p.is_dir())
        unknown = [name for name in found if name not in known]
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise DatasetLayoutError(
                f"{label} ({folder}) has {len(unknown)} class folder(s) the checkpoint does not know: {shown}. "
                f"The checkpoint has {len(classes)} classes ({', '.join(list(classes)[:3])}, ...); evaluate it on "
                "a tree made from the classes it was trained on")


def _preview(items: Sequence[str], n: int = 10) -> str:
    items = list(items)
    text = ", ".join(str(i) for i in items[:n])
    return text + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def main(argv: list[str] | None = None) -> int:
    from apr.cli import add_common

    parser = argparse.ArgumentParser(
        prog="python -m apr.data.layout",
        description="Check an ImageNet-layout folder (<root>/<class>/<image>) and list unreadable images.")
    parser.add_argument("root", help="folder holding one sub-folder per class")
    parser.add_argument("--decode", action="store_true",
                        help="also decode every image with PIL (slow) to find files that pass the cheap "
                             "header/trailer check but still fail to decode")
    add_common(parser, "workers", defaults={"workers": 8})
    args = parser.parse_args(argv)
    index = scan_image_folder(args.root, verify=True, workers=args.workers, warn=False)
    print(f"{args.root}: {len(index.classes)} classes, {len(index.files)} images, {len(index.skipped)} skipped")
    for line in index.skipped:
        print(f"bad: {line}")
    bad = index.skipped
    if args.decode:
        failed = find_undecodable(index.files, workers=args.workers)
        for line in failed:
            print(f"undecodable: {line}")
        bad = bad + failed
    return 1 if bad else 0


if __name__ == "__main__":
    from apr.cli import run_main

    raise SystemExit(run_main(main))
