"""Checkpoints that survive preemption: atomic writes, safe loads, exact resume state, signals.

A checkpoint is one ``torch.save``'d dict of tensors and plain Python values, so it loads with
``torch.load(weights_only=True)`` (no arbitrary code runs when a file is opened). It holds
everything a run needs to continue the same trajectory: model, optimizer, scheduler, epoch,
step within the epoch, the loader's position, and every RNG state.
"""

from __future__ import annotations

from apr.errors import UserError
import random
import re
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apr.io import atomic_open

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "load_model_for_eval",
    "check_model_compatible",
    "capture_rng_state",
    "restore_rng_state",
    "CheckpointManager",
    "find_latest_checkpoint",
    "checkpoint_position",
    "PreemptionFlag",
]

CHECKPOINT_FORMAT = "apr.checkpoint/1"
_NAME = re.compile(r"^checkpoint-e(\d+)-s(\d+)\.pt$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unreadable, not ours, or does not fit the model."""


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` atomically: a crash mid-write never leaves a truncated file at ``path``."""
    path = Path(path)
    state = {"format": CHECKPOINT_FORMAT, **state}
    with atomic_open(path, "wb") as f:
        torch.save(state, f)
    return path


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Safe load (``weights_only=True``) with errors that say what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, disallowed globals ...
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not an apr checkpoint (expected format {CHECKPOINT_FORMAT!r}); "
            "train with train_imagenet.py to produce one"
        )
    for key in ("model", "model_name", "num_classes", "classes", "config"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} lacks the {key!r} entry")
    return state


def check_model_compatible(state: dict, model: torch.nn.Module, source: str = "checkpoint") -> None:
    """Refuse to load weights of another architecture or class count, naming the mismatch."""
    own = model.state_dict()
    theirs = state["model"]
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} holds a different model ({state.get('model_name')!r}): "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:3]})"
        )
    wrong = [(k, tuple(theirs[k].shape), tuple(v.shape)) for k, v in own.items() if theirs[k].shape != v.shape]
    if wrong:
        key, got, want = wrong[0]
        raise CheckpointError(
            f"{source} does not fit the model: {key} has shape {got}, the model expects {want}"
            f" ({len(wrong)} tensors differ; checkpoint has {state.get('num_classes')} classes)"
        )


def load_model_for_eval(path: str | Path, map_location: Any = "cpu"):
    """Rebuild the trained model from a checkpoint: ``(model.eval(), Config, classes, info)``."""
    from apr.config import config_from_dict
    from apr.models import create_model

    state = load_checkpoint(path, map_location=map_location)
    config = config_from_dict(state["config"])
    classes = list(state["classes"])
    if len(classes) != int(state["num_classes"]):
        raise CheckpointError(
            f"checkpoint {path} is inconsistent: {len(classes)} class names but num_classes={state['num_classes']}"
        )
    model = create_model(state["model_name"], int(state["num_classes"]))
    check_model_compatible(state, model, source=f"checkpoint {path}")
    model.load_state_dict(state["model"])
    model.eval()
    info = {k: state.get(k) for k in ("epoch", "step", "metrics", "model_name", "num_classes")}
    return model, config, classes, info


# ---------------------------------------------------------------------------------------
# RNG state (all of it, so a resumed run draws the same random numbers)


def capture_rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's own GPU only: a process that lists every visible GPU would, on resume where fewer
        # GPUs are visible (one per process under some launchers), fail on a device index that is gone
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])  # the current device (accelerate sets it per process)


# ---------------------------------------------------------------------------------------
# run folder bookkeeping


def _sort_key(path: Path) -> tuple[int, int]:
    match = _NAME.match(path.name)
    return (int(match.group(1)), int(match.group(2))) if match else (-1, -1)


def checkpoint_position(path: str | Path) -> tuple[int, int] | None:
    """``(epoch, step)`` from a ``checkpoint-e<epoch>-s<step>.pt`` name; None for other names (best.pt)."""
    match = _NAME.match(Path(path).name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest ``checkpoint-e<epoch>-s<step>.pt`` in ``run_dir`` (by epoch, then step)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = [p for p in run_dir.iterdir() if _NAME.match(p.name)]
    return max(found, key=_sort_key) if found else None


class CheckpointManager:
    """Saves ``checkpoint-e<epoch>-s<step>.pt`` files, keeps the newest ``keep_last`` and ``best.pt``.

    ``epoch`` is the epoch in progress and ``step`` the number of its batches already trained,
    so ``(e, 0)`` after a finished epoch ``e - 1`` sorts after every mid-epoch save of ``e - 1``.
    """

    def __init__(self, run_dir: str | Path, keep_last: int = 2, keep_best: bool = True):
        self.run_dir = Path(run_dir)
        self.keep_last = max(1, keep_last)
        self.keep_best = keep_best
        self.best_metric: float | None = None

    def path_for(self, epoch: int, step: int) -> Path:
        return self.run_dir / f"checkpoint-e{epoch:04d}-s{step:07d}.pt"

    def save(self, state: dict, epoch: int, step: int, metric: float | None = None) -> Path:
        """Save; ``metric`` is an error (lower is better) used to maintain ``best.pt``.

        The saved ``best_metric`` includes this save's ``metric``: a run resumed from this file must
        not let a later, worse epoch overwrite ``best.pt``."""
        is_best = self.keep_best and metric is not None and (self.best_metric is None or metric < self.best_metric)
        if is_best:
            self.best_metric = metric
        state = {**state, "best_metric": self.best_metric}
        path = save_checkpoint(state, self.path_for(epoch, step))
        if is_best:
            save_checkpoint(state, self.run_dir / "best.pt")
        self._prune()
        return path

    def _prune(self) -> None:
        found = sorted((p for p in self.run_dir.iterdir() if _NAME.match(p.name)), key=_sort_key)
        for old in found[: -self.keep_last]:
            old.unlink(missing_ok=True)


class PreemptionFlag:
    """Turns SIGTERM / SIGUSR1 (slurm's ``--signal=USR1@120``) into a flag the loop polls.

    The loop saves a checkpoint at the next step boundary and exits cleanly instead of dying
    mid-write. Handlers are restored on ``close``.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):  # noqa: ARG002
        self.received = signum

    def __enter__(self) -> "PreemptionFlag":
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def is_set(self) -> bool:
        return self.received is not None
