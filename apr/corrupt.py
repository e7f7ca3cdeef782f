"""Generate an ImageNet-C-style tree ``<dst>/<corruption>/<severity>/<wnid>/<name>.JPEG`` from any
ImageFolder tree ``<src>/<wnid>/*``.

Follows hendrycks' ``make_imagenet_c``: Resize(256) + CenterCrop(224) (PIL bilinear, torchvision's
arithmetic), the corruption, then JPEG quality 85. The corruptions come from
``imagecorruptions-imaug`` (the maintained fork; the original 1.1.2 breaks on current NumPy and
scikit-image). Why the extra machinery:

- *parallel*: a full ImageNet-C is ~100 core-hours, so work is spread over processes, one task
  per source image (decoded and resized once, then every corruption and severity of it);
- *resumable*: outputs that exist are skipped, and files are written to a temporary name and
  renamed, so a killed run never leaves a half-written JPEG that would count as done;
- *interruptible*: SIGTERM to the main process (or its death, even by SIGKILL, on Linux) stops
  every worker within about a second, each finishing at most the JPEG it is writing; rerun to resume;
- *deterministic*: each (corruption, severity, image) gets its own seed from a SHA-256 of those
  names, so a rerun or another worker count produces the same bytes. imagecorruptions draws
  from ``np.random`` except impulse_noise (scikit-image ``rng``) and glass_blur (numba RNG),
  which take the seed as an argument.

glass_blur is compiled by numba on its first call in each process (seconds); workers are
long-lived so that happens once per worker, and only if that worker has glass_blur work left.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from apr.cli import add_common, add_deprecated, run_main
from apr.data.layout import IMG_EXTENSIONS as IMAGE_EXTENSIONS, scan_image_folder
from apr.errors import UserError
from apr.io import atomic_open, atomic_write_text
from apr.metrics import ALL_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES

__all__ = [
    "CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "ALL_CORRUPTIONS",
    "IMAGE_EXTENSIONS",
    "MANIFEST_NAME",
    "CorruptionError",
    "CorruptionSummary",
    "scan_source",
    "preprocess",
    "corruption_seed",
    "corrupt_image",
    "output_path",
    "make_corrupted_tree",
    "main",
]

MANIFEST_NAME = "apr_corrupt.json"
MIN_SIZE = 32  # imagecorruptions refuses anything smaller


class CorruptionError(UserError, ValueError):
    """Bad input for corruption generation (missing/empty source, unknown corruption, tiny image...)."""


@dataclass
class CorruptionSummary:
    dst: str
    source_images: int
    outputs: int  # source_images x corruptions x severities
    written: int
    skipped: int  # already there (resume)
    seconds: float


@dataclass(frozen=True)
class _Settings:
    src: str
    dst: str
    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    resize: int | None
    crop: int | None
    quality: int


# --------------------------------------------------------------------------- pieces

def scan_source(src: str | os.PathLike, limit_per_class: int | None = None,
                max_images: int | None = None) -> list[tuple[str, str]]:
    """List ``(class_folder, file_name)`` of every image under ``<src>/<class>/``, sorted; ``max_images``:
    only a fixed class-balanced subset of that many (``apr.data.base.balanced_subset``).

    Raises ``CorruptionError`` for a missing source, one with no class folders (e.g. a flat
    ImageNet val folder: sort it into ``<wnid>/`` folders first), or an empty class folder.
    """
    root = Path(src)
    if not root.exists():
        raise CorruptionError(f"source folder {root} does not exist")
    if not root.is_dir():
        raise CorruptionError(f"source {root} is not a folder; expected an ImageFolder tree <src>/<class>/<image>")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = [p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
        hint = (f" It holds {len(loose)} images directly: move them into one folder per class "
                f"(<src>/<wnid>/<image>, as ImageNet val is after valprep.sh).") if loose else ""
        raise CorruptionError(f"source folder {root} has no class folders (expected <src>/<class>/<image>).{hint}")
    if limit_per_class is not None and limit_per_class < 1:
        raise CorruptionError(f"limit_per_class must be >= 1, got {limit_per_class}")
    if max_images is not None and max_images < 1:
        raise CorruptionError(f"max_images must be >= 1, got {max_images}")

    index = scan_image_folder(root, verify=True, allow_empty=True)
    per_class: dict[str, list[str]] = {cls: [] for cls in index.classes}
    for path, label in zip(index.files, index.labels):
        per_class[index.classes[label]].append(Path(path).name)
    items: list[tuple[str, str]] = []
    empty: list[str] = []
    for cls, names in per_class.items():
        names.sort()
        stems: dict[str, str] = {}
        for name in names:
            stem = Path(name).stem
            if stem in stems:
                raise CorruptionError(f"{root / cls}: {stems[stem]} and {name} would both be written as {stem}.JPEG")
            stems[stem] = name
        if not names:
            empty.append(cls)
        items += [(cls, n) for n in names[:limit_per_class]]
    if empty:
        raise CorruptionError(f"source folder {root}: class folder(s) without images ({', '.join(empty[:10])}"
                              f"{', ...' if len(empty) > 10 else ''}); extensions looked for: {', '.join(IMAGE_EXTENSIONS)}")
    if max_images is not None:
        from apr.data.base import balanced_subset

        label = {cls: i for i, cls in enumerate(per_class)}
        keep = balanced_subset([label[cls] for cls, _ in items], max_images).sort().values.tolist()
        items = [items[i] for i in keep]
    return items


def preprocess(img: Image.Image, resize: int | None = 256, crop: int | None = 224) -> np.ndarray:
    """RGB, shorter side to ``resize`` (bilinear), centre crop ``crop``: torchvision's
    Resize + CenterCrop arithmetic on PIL, as in make_imagenet_c. ``None`` skips a step."""
    img = img.convert("RGB")
    if resize:
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        if short != resize:
            new_short, new_long = resize, int(resize * long / short)
            size = (new_short, new_long) if w <= h else (new_long, new_short)
            img = img.resize(size, Image.BILINEAR)
    if crop:
        w, h = img.size
        if w < crop or h < crop:
            raise CorruptionError(f"image of {w}x{h} is smaller than the crop {crop}; set resize >= crop "
                                  "(or resize=None, crop=None to keep images as they are)")
        top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
        img = img.crop((left, top, left + crop, top + crop))
    return np.asarray(img, dtype=np.uint8)


def corruption_seed(corruption: str, severity: int, name: str) -> int:
    """A 32-bit seed fixed by (corruption, severity, image path relative to src): same pixels
    whatever the worker count, order or resume point."""
    digest = hashlib.sha256(f"{corruption}/{int(severity)}/{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """imagecorruptions' ``corrupt`` on a uint8 HxWx3 array with every random source seeded.

    Same result as ``imagecorruptions.corrupt`` (same function, same final ``np.uint8`` cast)
    except for one upstream bug: spatter at severities 1-3 divides by the largest "liquid"
    value, which is 0 when the random liquid layer stays below its threshold everywhere (a few
    percent of draws on small images), giving an all-NaN image that casts to black. No liquid
    means no spatter, so those pixels are the input's.
    """
    from imagecorruptions import corruption_dict

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise CorruptionError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < MIN_SIZE:
        raise CorruptionError(f"image of {image.shape[1]}x{image.shape[0]} is below imagecorruptions' "
                              f"minimum of {MIN_SIZE}x{MIN_SIZE}")
    if corruption not in corruption_dict:
        raise CorruptionError(f"unknown corruption {corruption!r}; choose from {', '.join(corruption_dict)}")
    if int(severity) not in SEVERITIES:
        raise CorruptionError(f"severity must be an integer in 1..5, got {severity!r}")
    np.random.seed(seed)
    kwargs = {"seed": seed} if corruption in ("impulse_noise", "glass_blur") else {}
    with np.errstate(invalid="ignore", divide="ignore"):
        raw = np.asarray(corruption_dict[corruption](Image.fromarray(image), int(severity), **kwargs))
    if raw.shape != image.shape:  # never seen, but a silent shape change would corrupt the benchmark
        raise RuntimeError(f"{corruption} severity {severity} changed the shape {image.shape} -> {raw.shape}")
    if raw.dtype.kind == "f" and np.isnan(raw).any():
        if corruption != "spatter":
            raise RuntimeError(f"{corruption} severity {severity} produced NaN pixels (seed {seed})")
        raw = np.where(np.isnan(raw), image, raw)
    return np.uint8(raw)


def output_path(dst: str | os.PathLike, corruption: str, severity: int, cls: str, name: str) -> Path:
    return Path(dst) / corruption / str(int(severity)) / cls / (Path(name).stem + ".JPEG")


def _save_jpeg_atomic(array: np.ndarray, path: Path, quality: int) -> None:
    # no fsync per image: a killed process leaves no partial file, and ImageNet-C has 3.75 M of them
    with atomic_open(path, "wb", fsync=False) as f:
        Image.fromarray(array).save(f, format="JPEG", quality=quality, optimize=True)


# --------------------------------------------------------------------------- workers

_SETTINGS: _Settings | None = None
_PARENT_PID: int | None = None  # set in worker processes only
_SAVING = False  # a worker is between creating and renaming a temporary JPEG
_STOP_REQUESTED = False


def _init_worker(settings: _Settings, parent_pid: int) -> None:
    """One thread per worker process (the parallelism is across processes); stop with the parent."""
    global _SETTINGS, _PARENT_PID
    _SETTINGS, _PARENT_PID = settings, parent_pid
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = "1"
    try:
        import cv2  # imported by imagecorruptions anyway

        cv2.setNumThreads(1)
    except Exception:  # pragma: no cover - cv2 is a dependency of imagecorruptions
        pass
    _die_with_parent()


def _die_with_parent() -> None:
    """A worker gets SIGTERM when the parent dies, even by SIGKILL (Linux ``PR_SET_PDEATHSIG``;
    elsewhere ``_process_image`` checks the parent's pid between images), and answers SIGTERM by
    exiting at once, or right after the JPEG it is writing: no orphan keeps writing, no
    temporary file is left behind."""
    signal.signal(signal.SIGTERM, _worker_sigterm)
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    _exit_if_orphaned()  # the parent may have died before prctl


def _worker_sigterm(signum: int, frame) -> None:
    global _STOP_REQUESTED
    _STOP_REQUESTED = True
    if not _SAVING:
        os._exit(128 + signum)


def _exit_if_orphaned() -> None:
    if _STOP_REQUESTED or (_PARENT_PID is not None and os.getppid() != _PARENT_PID):
        os._exit(128 + signal.SIGTERM)


def _process_image(item: tuple[str, str]) -> tuple[int, int]:
    """All (corruption, severity) outputs of one source image; returns (written, skipped)."""
    global _SAVING
    s = _SETTINGS
    assert s is not None, "worker not initialised"
    _exit_if_orphaned()
    cls, name = item
    todo = [(c, sev, output_path(s.dst, c, sev, cls, name)) for c in s.corruptions for sev in s.severities]
    todo_left = [t for t in todo if not t[2].exists()]
    skipped = len(todo) - len(todo_left)
    if not todo_left:
        return 0, skipped
    path = Path(s.src) / cls / name
    try:
        with Image.open(path) as img:
            image = preprocess(img, s.resize, s.crop)
    except CorruptionError as exc:
        raise CorruptionError(f"{path}: {exc}") from None
    except OSError as exc:
        raise CorruptionError(f"{path}: cannot read image ({exc})") from None
    if min(image.shape[:2]) < MIN_SIZE:
        raise CorruptionError(f"{path}: {image.shape[1]}x{image.shape[0]} after preprocessing; imagecorruptions "
                              f"needs at least {MIN_SIZE}x{MIN_SIZE} (raise resize/crop)")
    rel = f"{cls}/{name}"
    for corruption, severity, out in todo_left:
        result = corrupt_image(image, corruption, severity, corruption_seed(corruption, severity, rel))
        _SAVING = True
        try:
            _save_jpeg_atomic(result, out, s.quality)
        finally:
            _SAVING = False
        _exit_if_orphaned()  # a SIGTERM that arrived during the save
    return len(todo_left), skipped


def _process_chunk(items: list[tuple[str, str]]) -> list[tuple[int, int]]:
    return [_process_image(item) for item in items]


# --------------------------------------------------------------------------- driver

def _check_names(corruptions: Iterable[str], severities: Iterable[int]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    corruptions = tuple(dict.fromkeys(corruptions))
    unknown = [c for c in corruptions if c not in ALL_CORRUPTIONS]
    if unknown or not corruptions:
        raise CorruptionError(f"unknown corruption(s) {unknown or '(none given)'}; choose from {', '.join(ALL_CORRUPTIONS)}")
    try:
        severities = tuple(sorted(dict.fromkeys(int(s) for s in severities)))
    except (TypeError, ValueError):
        raise CorruptionError(f"severities must be integers 1..5, got {severities!r}") from None
    if not severities or any(s not in SEVERITIES for s in severities):
        raise CorruptionError(f"severities must be integers in 1..5, got {list(severities)}")
    return corruptions, severities


def _check_manifest(dst: Path, settings: _Settings) -> None:
    """Refuse to resume into a tree made with other preprocessing: the cells would mix."""
    manifest = dst / MANIFEST_NAME
    fixed = {"resize": settings.resize, "crop": settings.crop, "quality": settings.quality}
    if manifest.exists():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CorruptionError(f"{manifest} is unreadable ({exc}); delete it if this tree is yours") from None
        diff = {k: (old.get(k), v) for k, v in fixed.items() if old.get(k) != v}
        if diff:
            raise CorruptionError(f"{dst} was generated with different settings "
                                  + ", ".join(f"{k}={a} (now {b})" for k, (a, b) in diff.items())
                                  + "; use another destination or the same settings")
    try:
        from importlib.metadata import version

        ic_version = version("imagecorruptions-imaug")
    except Exception:
        ic_version = None
    atomic_write_text(manifest, json.dumps({"schema": "apr.corrupt/1", **fixed, "source": settings.src,
                               "imagecorruptions_imaug": ic_version,
                               "seed": "sha256('<corruption>/<severity>/<class>/<file>')[:4] little-endian"},
                              indent=1))


def make_corrupted_tree(src: str | os.PathLike, dst: str | os.PathLike, corruptions: Sequence[str] = CORRUPTIONS,
                        severities: Sequence[int] = SEVERITIES, resize: int | None = 256, crop: int | None = 224,
                        quality: int = 85, workers: int | None = None, progress: bool = True,
                        limit_per_class: int | None = None, start_method: str = "spawn",
                        max_images: int | None = None) -> CorruptionSummary:
    """Write ``<dst>/<corruption>/<severity>/<class>/<stem>.JPEG`` for every image of ``<src>/<class>/``.

    ``resize``/``crop``: shorter side and centre crop (ImageNet-C: 256/224); ``None`` keeps the
    images as they are (e.g. 32x32 demo images). ``workers``: processes (``None``: all cores;
    0 or 1: in this process). Existing outputs are kept, so an interrupted run resumes.
    """
    corruptions, severities = _check_names(corruptions, severities)
    if not 1 <= int(quality) <= 100:
        raise CorruptionError(f"JPEG quality must be in 1..100, got {quality}")
    for key, value in (("resize", resize), ("crop", crop)):
        if value is not None and (int(value) != value or value < MIN_SIZE):
            raise CorruptionError(f"{key} must be None or an integer >= {MIN_SIZE}, got {value!r}")
    src_path, dst_path = Path(src).resolve(), Path(dst).resolve()
    if dst_path == src_path or src_path in dst_path.parents:
        raise CorruptionError(f"destination {dst_path} must not lie inside the source {src_path}")
    items = scan_source(src_path, limit_per_class, max_images)
    settings = _Settings(str(src_path), str(dst_path), corruptions, severities,
                         None if resize is None else int(resize), None if crop is None else int(crop), int(quality))
    _check_manifest(dst_path, settings)
    for cls in sorted({c for c, _ in items}):  # all folders up front: workers never race on mkdir
        for c in corruptions:
            for s in severities:
                (dst_path / c / str(s) / cls).mkdir(parents=True, exist_ok=True)

    if workers is None:  # the cores this process may use (a slurm allocation, not the whole node)
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = int(workers)
    workers = max(0, min(workers, len(items)))
    from tqdm import tqdm

    bar = tqdm(total=len(items), unit="img", desc=f"corrupting ({len(corruptions)}x{len(severities)} per image)",
               disable=not progress, dynamic_ncols=True)
    counts = {"written": 0, "skipped": 0}

    def tally(written: int, skipped: int) -> None:
        counts["written"] += written
        counts["skipped"] += skipped
        bar.update(1)
        bar.set_postfix(counts, refresh=False)

    start = time.perf_counter()
    with _exit_cleanly_on_sigterm():
        try:
            if workers <= 1:
                _run_here(items, settings, tally)
            else:
                _run_in_workers(items, settings, workers, start_method, tally)
        finally:
            bar.close()
    if counts["skipped"] == 0:
        _record_decodable(dst_path, items, corruptions, severities)
    return CorruptionSummary(str(dst_path), len(items), len(items) * len(corruptions) * len(severities),
                             counts["written"], counts["skipped"], round(time.perf_counter() - start, 3))


def _record_decodable(dst: Path, items: list[tuple[str, str]], corruptions: Sequence[str],
                      severities: Sequence[int]) -> None:
    """A tree written whole by this run was just encoded by PIL: its folders go into the decode-check cache
    (apr.data.layout.record_decodable), each only where it holds exactly the files this run wrote."""
    from apr.data.layout import _list_class_dir, record_decodable

    expected: dict[Path, set[str]] = {}
    for cls, name in items:
        for c in corruptions:
            for s in severities:
                out = output_path(dst, c, s, cls, name)
                expected.setdefault(out.parent, set()).add(str(out))
    files = []
    for folder, outs in expected.items():
        listed = _list_class_dir(folder)
        if set(listed) == outs:
            files += listed
    record_decodable(files)


def _run_here(items: list[tuple[str, str]], settings: _Settings, tally: Callable[[int, int], None]) -> None:
    global _SETTINGS
    saved_settings, saved_rng = _SETTINGS, np.random.get_state()  # leave the caller's RNG alone
    _SETTINGS = settings
    try:
        for item in items:
            tally(*_process_image(item))
    finally:
        _SETTINGS = saved_settings
        np.random.set_state(saved_rng)


def _run_in_workers(items: list[tuple[str, str]], settings: _Settings, workers: int, start_method: str,
                    tally: Callable[[int, int], None]) -> None:
    """ProcessPoolExecutor, not multiprocessing.Pool: a worker that dies (OOM killer, a script
    without a ``__main__`` guard under spawn) raises BrokenProcessPool instead of hanging. On any
    error or interruption the workers are stopped, not left to finish their chunks."""
    size = max(1, min(16, len(items) // (workers * 8)))
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    known = {p.pid for p in mp.active_children()}  # children that are not this pool's
    with ProcessPoolExecutor(workers, mp_context=mp.get_context(start_method), initializer=_init_worker,
                             initargs=(settings, os.getpid())) as pool:
        futures = [pool.submit(_process_chunk, chunk) for chunk in chunks]
        try:
            for future in as_completed(futures):
                for result in future.result():
                    tally(*result)
        except BaseException:
            _stop_workers(known)  # (no future.cancel(): Python 3.11's pool then fails on the cancelled ones)
            raise


def _stop_workers(known: set[int], grace: float = 10.0) -> None:
    """SIGTERM this process's new children (the pool's workers), each finishing the JPEG it is
    writing; SIGKILL what is still alive after ``grace`` seconds."""
    workers = [p for p in mp.active_children() if p.pid not in known]
    for p in workers:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in workers:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)


@contextlib.contextmanager
def _exit_cleanly_on_sigterm():
    """Within the block SIGTERM raises ``SystemExit(143)`` instead of ending the process on the spot,
    so the workers are stopped, no temporary file is left and the interpreter shuts down normally.
    Only in the main thread and where SIGTERM has its default action: a caller's own handler stays
    in charge."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def exit_on_signal(signum: int, frame) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m apr.corrupt",
        description="Make an ImageNet-C-style tree DST/<corruption>/<severity>/<class>/<image>.JPEG from an "
                    "ImageFolder tree SRC/<class>/<image> (e.g. ImageNet val sorted into wnid folders). "
                    "Resumable: rerun the same command after an interruption.")
    p.add_argument("src", help="source ImageFolder tree: SRC/<class>/<image files>")
    p.add_argument("dst", help="destination root; created if missing")
    p.add_argument("--corruptions", nargs="+", metavar="NAME", default=list(CORRUPTIONS),
                   help=f"which corruptions (default: the 15 of ImageNet-C; 'all' = 15 + 4 extra). "
                        f"Known: {', '.join(ALL_CORRUPTIONS)}")
    p.add_argument("--extra", action="store_true",
                   help=f"also make the 4 extra corruptions ({', '.join(EXTRA_CORRUPTIONS)}), which never enter mCE")
    p.add_argument("--severities", nargs="+", type=int, default=list(SEVERITIES), metavar="S",
                   help="severities 1..5 (default: all five)")
    p.add_argument("--resize", type=int, default=256,
                   help="resize the shorter side to this many pixels before cropping (default 256; 0 = no resize)")
    p.add_argument("--size", type=int, default=224, help="centre crop size in pixels (default 224; 0 = no crop)")
    p.add_argument("--no-resize", action="store_true",
                   help="keep images as they are (no resize, no crop), e.g. 32x32 images; at least 32 px per side")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality of the outputs (ImageNet-C: 85)")
    # --workers: processes (default None: every CPU core this process may use; 0 or 1: in this process)
    add_common(p, "workers", "max_images", "progress")
    add_deprecated(p, "--limit-per-class", "limit_per_class", "--max-images", type=int)
    p.set_defaults(limit_per_class=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    corruptions = list(ALL_CORRUPTIONS) if args.corruptions == ["all"] else list(args.corruptions)
    if args.extra:
        corruptions += [c for c in EXTRA_CORRUPTIONS if c not in corruptions]
    resize = None if args.no_resize or args.resize == 0 else args.resize
    crop = None if args.no_resize or args.size == 0 else args.size
    summary = make_corrupted_tree(args.src, args.dst, corruptions=corruptions, severities=args.severities,
                                  resize=resize, crop=crop, quality=args.quality, workers=args.workers,
                                  progress=args.progress, limit_per_class=args.limit_per_class,
                                  max_images=args.max_images)
    print(json.dumps(asdict(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
