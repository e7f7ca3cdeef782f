"""What every results file of the evaluation commands shares (corruptions, shift, OOD, attacks).

A results file names what made it (the checkpoint's SHA-256, the software versions, the time) so
that a rerun can tell whether its earlier numbers still hold: :func:`reusable` returns the earlier
file only when nothing that made it has changed, and says why otherwise.

The one results-file discipline of every evaluation command: the output folder is checked writable
before any work (:func:`check_output_folder`); every cell/set carries :func:`files_fingerprint`; and
every save is a locked read-merge-write (:class:`ResultsFile`), so concurrent runs and reruns with
other subsets keep each other's entries.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import os
import platform
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from apr.errors import OutputError, UserError

__all__ = ["now", "file_sha256", "collect_versions", "changed_keys", "reusable", "files_fingerprint",
           "OutputError", "check_output_folder", "ResultsBusy", "results_lock", "merge_entries", "ResultsFile",
           "update_results"]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Identity of a checkpoint: resume is only safe if the weights are byte-identical."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# distributions that install the module, for a version read without importing it
_DISTRIBUTIONS = {"torchvision": ("torchvision",), "timm": ("timm",),
                  "nvidia.dali": ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali")}


def installed_version(module: str) -> str | None:
    """A library's installed version without importing it: importing torchvision, timm or DALI costs
    seconds, and every evaluation records the versions."""
    from importlib import metadata

    for name in _DISTRIBUTIONS[module]:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return getattr(sys.modules.get(module), "__version__", None)  # run from a source tree, not installed


def collect_versions() -> dict:
    """Library versions, so a number in a report can be traced to the stack that made it."""
    import torch

    import apr

    return {"apr": apr.__version__, "torch": torch.__version__, "torchvision": installed_version("torchvision"),
            "timm": installed_version("timm"), "dali": installed_version("nvidia.dali"),
            "python": platform.python_version()}


def changed_keys(previous: dict, identity: dict) -> list[str]:
    """The keys of ``identity`` whose value in ``previous`` differs: what changed since that file."""
    return [key for key, value in identity.items() if previous.get(key) != value]


def reusable(out_path: Path, read: Callable[[Path], dict], differences: Callable[[dict], list[str]]) -> dict | None:
    """The earlier results at ``out_path`` if ``differences(previous)`` is empty, else None with a warning.

    ``read`` raises a :class:`UserError` for a file it cannot use (unreadable, another schema); that
    file is then started over too, never silently mixed with new numbers."""
    if not out_path.is_file():
        return None
    try:
        previous = read(out_path)
    except UserError as exc:
        warnings.warn(f"{exc}; starting over", stacklevel=3)
        return None
    reasons = differences(previous)
    if reasons:
        warnings.warn(f"{out_path} exists but {'; '.join(reasons)}: starting over", stacklevel=3)
        return None
    return previous


# ----------------------------------------------------------------------------- fingerprints


def files_fingerprint(root: str | os.PathLike, files: Iterable[str | os.PathLike], **extra) -> dict:
    """What a cell or set was computed from: file count, total bytes and a SHA-1 of every file's path
    (relative to ``root``), size and modification time (ns).

    The one fingerprint of every results file (corruption and shift cells, OOD sets, attack subsets).
    Renaming, adding, removing or rewriting any file changes it, also by a same-size file (a write sets
    the mtime); a copy that keeps times (``rsync -a``, ``cp -p``) keeps it. Hashing the contents would
    read the whole data set (60 GB for ImageNet-C) on every rerun only to learn that nothing changed.
    ``extra`` (e.g. ``max_images``) is stored as it is."""
    root = Path(root)
    digest = hashlib.sha1()
    count = total = 0
    for path in files:
        stat = os.stat(path)
        name = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
        digest.update(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        count += 1
        total += stat.st_size
    return {"files": count, "bytes": total, "sha1": digest.hexdigest(), **extra}


# ----------------------------------------------------------------------------- output folders


def check_output_folder(folder: str | os.PathLike, what: str = "--out") -> Path:
    """Create ``folder`` and prove it writable before any work, so a run never computes for an hour
    and then fails to save; names the path and the reason."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{what} {folder} is a file, not a folder: give a folder for the results")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        try:
            data = memoryview(b"0" * 512)  # a full disk refuses data, not always an empty file
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to {what} {folder}: {exc.strerror or exc}") from None
    return folder


# ----------------------------------------------------------------------------- one results file, many writers

LOCK_WAIT_S = 300.0  # a writer holds the lock for one read-merge-write (well under a second)


class ResultsBusy(UserError):
    """Another process has held a results file's lock for longer than any read-merge-write takes."""


@contextlib.contextmanager
def results_lock(path: str | os.PathLike, timeout: float = LOCK_WAIT_S) -> Iterator[None]:
    """Exclusive ``flock`` on ``<folder>/.<name>.lock`` (holder's pid and host inside) around one
    read-merge-write of ``path``; waits for another writer's short critical section, never for its
    computation. The kernel drops the lock with the process, however it ends."""
    path = Path(path)
    lock_path = path.parent / f".{path.name}.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise OutputError(f"cannot write to {path.parent} (lock file {lock_path.name}): "
                          f"{exc.strerror or exc}") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process"
                    raise ResultsBusy(f"{path} has been locked by {holder} for over {timeout:.0f} s: if that process "
                                      "hangs, stop it and run again") from None
                time.sleep(0.02)
        with contextlib.suppress(OSError):  # the holder's name is a courtesy; a full disk must not stop the write
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _stamp(path: Path) -> tuple | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def merge_entries(on_disk: Mapping, ours: Mapping, computed: Iterable,
                  current: Callable[[object, dict], bool] = lambda key, entry: True) -> dict:
    """Entries (cells, OOD sets, attacks) of two writers of one file: every entry of both, ours where
    this run computed it, else the file's (it is at least as new as what this run read at its start).
    ``current(key, entry)`` is False for an entry of the file made from other inputs than this run's
    for the same key (another fingerprint or attack settings): it is left out, never kept as stale."""
    computed = set(computed)
    fresh = {key: entry for key, entry in on_disk.items() if current(key, entry)}
    return {**ours, **fresh, **{key: ours[key] for key in computed if key in ours}}


class ResultsFile:
    """One results JSON that several runs may write at once (two ``apr.ood`` with other ``--ood`` sets,
    the same ``--out``): each save merges into what is on disk under :func:`results_lock`, so no run's
    entries are lost and no run waits for another's computation.

    ``read`` raises a :class:`UserError` for a file it cannot use; ``differences(previous)`` lists why an
    earlier file's numbers cannot stand next to this run's (other checkpoint, settings, data). A file
    found unusable by :meth:`load` is replaced; one that another run made unusable meanwhile is not:
    that run's numbers are kept and this one stops, saying so."""

    def __init__(self, path: str | os.PathLike, read: Callable[[Path], dict],
                 differences: Callable[[dict], list[str]]):
        self.path, self.read, self.differences = Path(path), read, differences
        self._replaceable: tuple | None = None
        self._written: tuple[tuple | None, dict | None] = (None, None)  # (stamp, content) of this run's last save

    def load(self) -> dict | None:
        """The earlier results if they can be reused (see :func:`reusable`), else None."""
        with results_lock(self.path):
            previous = reusable(self.path, self.read, self.differences)
            self._replaceable = _stamp(self.path) if previous is None else None
        return previous

    def save(self, result: dict, merge: Callable[[dict, dict], dict]) -> dict:
        """Write ``merge(on_disk, result)`` (just ``result`` when there is nothing to merge) atomically
        and return what was written."""
        from apr.io import atomic_write_json

        with results_lock(self.path):
            on_disk = self._current()
            merged = result if on_disk is None else merge(on_disk, result)
            atomic_write_json(self.path, merged, indent=1)
            self._replaceable, self._written = None, (_stamp(self.path), merged)
        return merged

    def _current(self) -> dict | None:
        stamp = _stamp(self.path)
        if stamp is None or stamp == self._replaceable:
            return None
        if stamp == self._written[0]:  # nobody wrote since this run's last save
            return self._written[1]
        try:
            on_disk = self.read(self.path)
        except UserError as exc:
            raise UserError(f"{self.path} was replaced during this run by a file it cannot merge with ({exc}); "
                            "not overwriting it: move it away or give another --out, then run again") from None
        reasons = self.differences(on_disk)
        if reasons:
            raise UserError(f"{self.path} was rewritten during this run by another run whose results cannot stand "
                            f"next to these ({'; '.join(reasons)}); not overwriting them: give another --out")
        return on_disk


def update_results(path: str | os.PathLike, read: Callable[[Path], dict], change: Callable[[dict], dict]) -> dict:
    """Rewrite the results file at ``path`` as ``change(what is on disk now)``, under its lock: for an
    addition computed from the file (a report's normalised metrics) that must not drop another run's
    entries written since this process last read it."""
    from apr.io import atomic_write_json

    path = Path(path)
    with results_lock(path):
        updated = change(read(path))
        atomic_write_json(path, updated, indent=1)
    return updated
