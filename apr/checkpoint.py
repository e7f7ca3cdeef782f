"""Checkpoints that survive preemption: atomic writes, safe loads, exact resume state, signals.

A checkpoint is one ``torch.save``'d dict of tensors and plain Python values, so it loads with
``torch.load(weights_only=True)`` (no arbitrary code runs when a file is opened). It holds
everything a run needs to continue the same trajectory: model, optimizer, scheduler, epoch,
step within the epoch, the loader's position, and every RNG state.
"""

from __future__ import annotations

import faulthandler
import fcntl
import os
import random
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

from apr.errors import UserError

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
    "ignore_stop_signals",
    "TrainingDiverged",
    "RunFolderBusy",
    "RunLock",
    "weights_are_finite",
    "diverged",
    "clean_stale_temp_files",
    "resolve_resume",
    "on_rank0",
]

CHECKPOINT_FORMAT = "apr.checkpoint/1"
_NAME = re.compile(r"^checkpoint-e(\d+)-s(\d+)\.pt$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unreadable, not ours, or does not fit the model."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss or the weights became NaN or infinite; no such weights are ever saved."""


class RunFolderBusy(CheckpointError):
    """Another process (named in the message) is training in this run folder."""


def weights_are_finite(state_dict: dict) -> bool:
    """True when every floating-point tensor of ``state_dict`` is free of NaN and infinities."""
    return all(bool(torch.isfinite(t).all()) for t in state_dict.values()
               if isinstance(t, torch.Tensor) and t.is_floating_point())


def refuse_non_finite(state_dict: dict, source: str, error: type[Exception] = CheckpointError) -> None:
    """Stop before evaluating weights holding NaN or infinities (they give NaN logits, wrong numbers or a
    crash far away), naming the first such tensor; the one check of every model-loading path."""
    bad = [(name, t) for name, t in state_dict.items()
           if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        name, t = bad[0]
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        more = f" ({len(bad)} tensors are not finite)" if len(bad) > 1 else ""
        raise error(f"{source} holds non-finite weights: tensor {name} has {nan} NaN and {inf} infinite value(s)"
                    f"{more}; it is not evaluated: take an earlier checkpoint of the run")


def load_failure(path: Path, exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused ``path``, in one line (never torch's multi-line advice to
    load the file unsafely)."""
    import pickle

    try:
        if path.stat().st_size == 0:
            return "the file is empty (0 bytes)"
    except OSError:
        pass
    if isinstance(exc, pickle.UnpicklingError):
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))  # torch names the refused class or function
        if not found and "invalid load key" in str(exc):
            return "it is not a PyTorch weights file (unknown format)"
        what = f"a Python object ({found.group(1)})" if found else "pickled Python data"
        return (f"it holds {what} that safe loading refuses: it is not a weights file, and it is not loaded, for "
                "safety (unpickling it could run code); re-save just the state_dict, or use .safetensors")
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def diverged(run_dir: str | Path, what: str) -> TrainingDiverged:
    """The error for a diverged run, naming the checkpoint that is good (every saved one is) or saying none is."""
    latest = find_latest_checkpoint(run_dir)
    kept = (f"the last good checkpoint is {latest} (what --resume auto continues from)"
            if latest is not None else f"no checkpoint was saved in {run_dir} before it")
    return TrainingDiverged(f"{what}; {kept}; lower optim.lr or check the data")


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
        raise CheckpointError(f"cannot read checkpoint {path}: {load_failure(path, exc)}") from exc
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
    refuse_non_finite(state["model"], f"checkpoint {path}")
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
        if not weights_are_finite(state["model"]):  # never let NaN weights replace (or prune) good ones
            raise diverged(self.run_dir, f"the weights became non-finite by epoch {epoch + 1}, step {step}; "
                                         "they were not saved")
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
    first_received: int | None = None  # process-wide: the signal that stopped the run (what a rank reports)
    last_received: int | None = None  # the latest (rank 0 requeues on USR1, not on a scancel's later SIGTERM)

    @classmethod
    def record(cls, signum: int) -> None:
        cls.first_received = cls.first_received or signum
        cls.last_received = signum

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):  # noqa: ARG002
        self.received = signum
        PreemptionFlag.record(signum)

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

    def adopt(self, signum: int) -> None:
        """Stop as if ``signum`` had arrived here: a peer rank got it first (slurm signals every task, and
        a task may stop on its peer's flag before its own signal lands; rank 0 must still requeue)."""
        if self.received is None:
            self._handle(signum, None)


def ignore_stop_signals(*_) -> None:
    """In a data-loading worker process: leave SIGTERM/SIGUSR1 to the parent. slurm signals every process of
    a step; a worker killed by it would break the parent's save at the signal (the parent ends the workers).
    And SIGUSR2, whose stack dump (apr.slurm's, inherited through fork) would interleave with the parent's
    character by character in the one job log."""
    for sig in PreemptionFlag.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if faulthandler.unregister(signal.SIGUSR2):
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------
# one run per folder: the lock, stale temporary files, which checkpoint to resume from


class RunLock:
    """Exclusive ``flock`` on ``<run_dir>/.run.lock`` for the life of a run, with the holder's pid and host.

    The kernel drops the lock when the process exits, however it exits (crash, SIGKILL), so a stale
    lock file never blocks the next run. ``acquire`` is explicit (rank 0 only, inside :func:`on_rank0`);
    leaving the ``with`` block releases it.
    """

    NAME = ".run.lock"

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / self.NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process that has not written its pid yet"
            os.close(fd)
            raise RunFolderBusy(
                f"{self.path.parent} is in use by another training run ({holder}): wait for it to end, stop it, "
                "or choose another train.run_name") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def clean_stale_temp_files(run_dir: str | Path) -> list[Path]:
    """Remove half-written ``.checkpoint-*.tmp`` / ``.best.pt.*.tmp`` files a killed run left behind.

    Call it only while holding the run's :class:`RunLock`: then no other process is writing them."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    stale = [p for p in run_dir.iterdir() if p.name.endswith(".tmp")
             and (p.name.startswith(".checkpoint-") or p.name.startswith(".best.pt."))]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _newest_readable(run_dir: Path) -> Path | None:
    """The newest checkpoint that loads; unreadable newer ones are renamed ``*.corrupt`` (out of the
    sequence, so the resumed run's saves are not pruned in their favour) and reported."""
    while (latest := find_latest_checkpoint(run_dir)) is not None:
        try:
            load_checkpoint(latest)
            return latest
        except CheckpointError as exc:
            aside = latest.with_name(latest.name + ".corrupt")
            latest.rename(aside)
            print(f"--resume auto: {exc}; moved it to {aside.name} and falling back to the previous checkpoint",
                  file=sys.stderr)
    return None


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """The checkpoint to continue from. Refuses to mix two runs in one folder: a fresh start, or an
    explicit older checkpoint, next to newer checkpoints would see its own saves pruned at once by
    ``keep_last`` (they sort older), and ``--resume auto`` would later return to the other run."""
    run_dir = Path(run_dir)
    latest = find_latest_checkpoint(run_dir)
    if not resume:
        if latest is not None:
            raise CheckpointError(
                f"{run_dir} already holds checkpoints (newest {latest.name}): continue that run with --resume auto, "
                "or start a new one with another train.run_name or train.output_dir")
        return None
    if resume == "auto":
        return _newest_readable(run_dir)
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no such checkpoint file")
    if latest is not None and latest.resolve() != path.resolve():
        position = checkpoint_position(path)
        if position is None:  # best.pt or a renamed file: its position is inside
            state = load_checkpoint(path)
            position = (int(state.get("epoch", 0)), int(state.get("step", 0)))
        if checkpoint_position(latest) > position:
            raise CheckpointError(
                f"--resume {resume} is at epoch {position[0]}, step {position[1]}, but {run_dir} holds the newer "
                f"{latest.name}: the resumed run's checkpoints would be pruned as older ones and --resume auto "
                "would return to the newer file; move the newer checkpoints away or set another train.run_name")
    return path


def on_rank0(fn: Callable, world_size: int, is_main: bool):
    """``fn()`` evaluated on rank 0 and broadcast (result or CheckpointError) to every rank: the nodes of a
    job may list a shared run folder differently (NFS caching), and ranks that resume from different
    checkpoints run different step counts (DDP deadlock) or silently train different weights."""
    if world_size == 1:
        return fn()
    box: list = [None]
    if is_main:
        try:
            box[0] = ("ok", fn())
        except CheckpointError as exc:
            box[0] = ("error", exc)
    torch.distributed.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value
