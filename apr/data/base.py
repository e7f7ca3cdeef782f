"""The contract every loader shares: validation, sharding arithmetic, epoch bookkeeping, resume position.

Kept in one place so that the DALI, torchvision and in-memory loaders agree on what "this rank's
samples" and "the same epoch" mean, which is what makes the backends interchangeable.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from apr.errors import UserError

__all__ = ["mix_seed", "train_shard_size", "epoch_permutation", "eval_shard", "to_device_batch",
           "check_loader_state", "LoaderStateError", "data_changed_message", "loader_length", "LoaderBase",
           "SkipList", "SeededPosition", "balanced_subset"]


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers (seed, epoch, index, ...), stable across runs and platforms."""
    state = np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(1, np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


def train_shard_size(num_samples: int, world_size: int) -> int:
    """Samples per rank per epoch in training: the remainder ``N % world_size`` is left out so that
    every rank runs the same number of steps (unequal step counts deadlock DDP)."""
    return num_samples // world_size


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The global shuffle of one epoch, identical on every rank (like DistributedSampler)."""
    g = torch.Generator()
    g.manual_seed(mix_seed(seed, epoch))
    return torch.randperm(num_samples, generator=g)


def eval_shard(num_samples: int, rank: int, world_size: int) -> range:
    """Evaluation indices of one rank: every sample exactly once over all ranks, no padding."""
    return range(rank, num_samples, world_size)


def to_device_batch(images: torch.Tensor, labels: torch.Tensor, device: torch.device):
    """Batch contract: float32 images and int64 labels of shape (N,) on ``device``."""
    labels = labels.reshape(-1).to(device=device, dtype=torch.int64, non_blocking=True)
    images = images.to(device=device, dtype=torch.float32, non_blocking=True)
    return images, labels


class LoaderStateError(UserError, ValueError):
    """A saved loader position that does not fit this loader (other backend, data set, world or seed)."""


def check_loader_state(state: dict, backend: str, backend_words: str, identity: dict, advice: str) -> None:
    """Refuse a saved loader position that belongs to another backend, data set, world or seed.

    ``identity`` maps the keys that must match (num_files, world_size, rank, seed, ...) to this
    loader's values; a mismatch means the saved position would point at other samples."""
    if state.get("backend") != backend:
        raise LoaderStateError(f"loader state is for backend {state.get('backend')!r}, this loader uses "
                               f"{backend_words}")
    for key, mine in identity.items():
        if state[key] != mine:
            raise LoaderStateError(f"loader state has {key}={state[key]} but this loader has {key}={mine}: {advice}")


def data_changed_message(saved_files: int, files_now: int) -> str:
    """What changed in the data set since a checkpoint, and what a resume does about it."""
    delta = files_now - saved_files
    what = f"{abs(delta)} file(s) {'added' if delta > 0 else 'removed'}" if delta else "the file list changed"
    return (f"the training set changed since the checkpoint ({saved_files} files then, {files_now} now: {what}); "
            "the saved position no longer points at the same samples, so the interrupted epoch restarts from "
            "its first batch with the current files")


def loader_length(num_items: int, batch_size: int, train: bool, eval_samples: int, world_size: int) -> tuple[int, int]:
    """(batches per epoch, samples per epoch) of one rank: train drops the remainder and the last partial
    batch (every rank runs the same steps), eval keeps the partial batch (every sample counted)."""
    if train:
        batches = train_shard_size(num_items, world_size) // batch_size
        if batches == 0:
            raise ValueError(f"training set has {num_items} images for {world_size} rank(s): fewer per rank than "
                             f"batch_size={batch_size}")
        return batches, batches * batch_size
    return -(-eval_samples // batch_size), eval_samples


class LoaderBase:
    """The contract every loader shares (DALI, torchvision, in-memory, and any new backend).

    Iterating yields ``(images, labels)``: float32 N x 3 x H x W in [0, 1] and int64 labels on
    ``self.device``; ``len(loader)`` batches per epoch on this rank; ``num_samples``, ``classes``,
    ``set_epoch``, ``state_dict`` / ``load_state_dict``. A subclass calls :meth:`_init_contract` in its
    ``__init__`` (validation, sharding arithmetic, position), then only implements the decoding.
    """

    STATE_BACKEND = ""
    STATE_WORDS = ""

    def _init_contract(self, num_items: int, num_labels: int, classes: Sequence[str] | None, *, batch_size: int,
                       train: bool, rank: int, world_size: int, seed: int, device: torch.device | str) -> None:
        if num_items != num_labels:
            raise ValueError(f"{num_items} files but {num_labels} labels")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if classes is not None:
            self.classes = list(classes)
        self.batch_size, self.train, self.seed = int(batch_size), bool(train), int(seed)
        self.rank, self.world_size, self.device = int(rank), int(world_size), torch.device(device)
        self._len, self.num_samples = loader_length(num_items, self.batch_size, self.train,
                                                    self._eval_samples(num_items), self.world_size)
        self.epoch, self._pos, self._started = 0, 0, False

    def _eval_samples(self, num_items: int) -> int:
        """Samples of this rank in evaluation (strided shard by default; DALI reads contiguous shards)."""
        return len(eval_shard(num_items, self.rank, self.world_size))

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` at its first batch (unless a loaded state already positioned us in it)."""
        if int(epoch) != self.epoch:
            self.epoch, self._pos = int(epoch), 0

    def _num_items(self) -> int:
        raise NotImplementedError


class SkipList:
    """The undecodable files a decoding loader met (path -> reason), each warned about once: the header
    check before training cannot see a scrambled JPEG body, so the backends that decode per sample
    (torchvision, GPU decode) skip such a file where they meet it and list it here."""

    def __init__(self, train: bool):
        self.files: dict[str, str] = {}
        self.train = train

    def add(self, path: str, reason: str) -> None:
        if path in self.files:
            return
        self.files[path] = reason
        what = "replaced by another sample" if self.train else "left out of the evaluation"
        warnings.warn(f"skipped undecodable image {path} ({reason}): {what}; {len(self.files)} skipped so far",
                      stacklevel=4)


class SeededPosition(LoaderBase):
    """Resume state of a loader whose epoch order is a pure function of (seed, epoch): the position is
    just (epoch, next batch). Used by the torchvision and the in-memory backends (DALI keeps its own
    checkpoint bytes). Subclasses set ``STATE_BACKEND``, ``STATE_WORDS`` and ``_num_items()``.

    A saved position from a data set with another number of files (a corrupt file deleted, images
    added) cannot point at the same samples: the saved epoch restarts from its first batch, with a
    warning that says what changed. Another seed, world or backend is refused."""

    def _begin_pass(self) -> tuple[int, int]:
        """(epoch, first batch) of the pass ``__iter__`` starts: eval passes cover the whole shard, a
        finished train pass without ``set_epoch`` moves on to the next epoch."""
        if not self.train:
            self._pos = 0
        if self._pos >= self._len:
            if self._started:
                self.epoch += 1
            self._pos = 0
        self._started = True
        return self.epoch, self._pos

    def state_dict(self) -> dict:
        epoch, pos = self.epoch, self._pos
        if pos >= self._len:
            epoch, pos = epoch + 1, 0
        return {"backend": self.STATE_BACKEND, "epoch": epoch, "batch": pos, "num_files": self._num_items(),
                "world_size": self.world_size, "rank": self.rank, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        check_loader_state(state, self.STATE_BACKEND, self.STATE_WORDS,
                           {"world_size": self.world_size, "rank": self.rank, "seed": self.seed},
                           "resume with the same seed and number of processes")
        self.epoch, self._pos, self._started = int(state["epoch"]), int(state["batch"]), True
        if state["num_files"] != self._num_items():
            warnings.warn(data_changed_message(state["num_files"], self._num_items()), stacklevel=2)
            self._pos = 0


def balanced_subset(labels: Sequence[int] | torch.Tensor | np.ndarray, n: int | None, seed: int = 0) -> torch.Tensor:
    """Indices of the first ``n`` of a fixed seeded order that deals the classes round-robin: the one
    class-balanced subset of the project (``--max-images`` of every command, the attacked images).

    Order: a seeded permutation, then a stable sort by each image's rank within its class, so any
    prefix holds the classes as evenly as they allow. Same (labels, seed) -> same indices everywhere.
    ``n`` None or >= the number of images: every index, in that order.
    """
    labels = torch.as_tensor(np.asarray(labels)).reshape(-1).cpu()
    n = len(labels) if n is None else min(int(n), len(labels))
    if n < 1 and len(labels):
        raise ValueError(f"a subset needs at least 1 image, got {n}")
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(labels), generator=g)
    permuted = labels[order]
    rank_in_class = torch.zeros(len(labels), dtype=torch.int64)
    for c in permuted.unique():
        where = (permuted == c).nonzero().reshape(-1)
        rank_in_class[where] = torch.arange(len(where))
    dealt = torch.sort(rank_in_class, stable=True).indices
    return order[dealt[:n]]
