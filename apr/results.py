"""What every results file of the evaluation commands shares (corruptions, shift, OOD, attacks).

A results file names what made it (the checkpoint's SHA-256, the software versions, the time) so
that a rerun can tell whether its earlier numbers still hold: :func:`reusable` returns the earlier
file only when nothing that made it has changed, and says why otherwise.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import platform
import warnings
from pathlib import Path
from typing import Callable

from apr.errors import UserError

__all__ = ["now", "file_sha256", "collect_versions", "changed_keys", "reusable"]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Identity of a checkpoint: resume is only safe if the weights are byte-identical."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def collect_versions() -> dict:
    """Library versions, so a number in a report can be traced to the stack that made it."""
    import torch
    import torchvision

    import apr

    def version(module: str) -> str | None:
        try:
            return __import__(module, fromlist=["__version__"]).__version__
        except ImportError:
            return None

    return {"apr": apr.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": version("timm"), "dali": version("nvidia.dali"), "python": platform.python_version()}


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
