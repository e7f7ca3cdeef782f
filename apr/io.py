"""Atomic file writes: the one way every module of apr puts a file on disk that must never be
half-written (checkpoints, results JSON, heat-map progress, corrupted images, manifests).

A crash or a preemption mid-write leaves the previous file (or none), never a truncated one:
data goes to a temporary file in the same folder, is flushed to disk, then renamed over the
target (``os.replace`` is atomic on POSIX within one file system).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["atomic_open", "atomic_write_text", "atomic_write_json", "current_umask", "output_error"]

# what writing a file can fail with that the user must fix (full disk or quota, file size limit, read-only)
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def current_umask() -> int:
    """The process umask (read by setting and restoring it: POSIX has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", fsync: bool = True) -> Iterator[IO[Any]]:
    """``with atomic_open(p) as f: f.write(...)``: ``p`` appears only when the block succeeds."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise output_error(path, exc) from None
    recorder = None
    try:
        # mkstemp creates 0600 files; give the result the mode open() would (0666 less the umask)
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as f:
            recorder = _WriteRecorder(f)
            yield recorder
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
            raise output_error(path, exc) from None
        failed = recorder.error if recorder is not None else None  # a writer that wraps the OSError (torch.save)
        if failed is not None and failed.errno in _DISK_ERRNOS:
            raise output_error(path, failed) from exc
        raise


class _WriteRecorder:
    """The file of :func:`atomic_open`, remembering the OSError of a failed write: torch.save turns a full
    disk into an opaque RuntimeError ("unexpected pos ..."), and the user must be told the disk is full."""

    def __init__(self, file: IO[Any]):
        self._file, self.error = file, None

    def write(self, data):
        try:
            return self._file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str):
        return getattr(self._file, name)


def output_error(path: str | os.PathLike, exc: OSError):
    """``exc`` (raised writing ``path``) as one line naming the path (a UserError); other errors as they are."""
    from apr.errors import OutputError

    if exc.errno in _DISK_ERRNOS + (errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST):
        return OutputError(f"cannot write {path}: {exc.strerror or exc}; nothing was written there (free space, "
                           "or choose a writable folder)")
    return exc


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> Path:
    with atomic_open(path, "w", fsync=fsync) as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 2, fsync: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=indent) + "\n", fsync=fsync)
