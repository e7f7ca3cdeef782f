"""Pieces every loader shares: the sharding arithmetic and seed mixing.

Kept in one place so that the DALI, torchvision and in-memory loaders agree on what "this rank's
samples" and "the same epoch" mean, which is what makes the backends interchangeable.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["mix_seed", "train_shard_size", "epoch_permutation", "eval_shard", "to_device_batch",
           "check_loader_state", "SeededPosition"]


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


def check_loader_state(state: dict, backend: str, backend_words: str, identity: dict, advice: str) -> None:
    """Refuse a saved loader position that belongs to another backend, data set, world or seed.

    ``identity`` maps the keys that must match (num_files, world_size, rank, seed, ...) to this
    loader's values; a mismatch means the saved position would point at other samples."""
    if state.get("backend") != backend:
        raise ValueError(f"loader state is for backend {state.get('backend')!r}, this loader uses {backend_words}")
    for key, mine in identity.items():
        if state[key] != mine:
            raise ValueError(f"loader state has {key}={state[key]} but this loader has {key}={mine}: {advice}")


class SeededPosition:
    """Resume state of a loader whose epoch order is a pure function of (seed, epoch): the position is
    just (epoch, next batch). Used by the torchvision and the in-memory backends (DALI keeps its own
    checkpoint bytes). Subclasses set ``STATE_BACKEND``, ``STATE_WORDS`` and ``_num_items()``."""

    STATE_BACKEND = ""
    STATE_WORDS = ""

    def _num_items(self) -> int:
        raise NotImplementedError

    def state_dict(self) -> dict:
        epoch, pos = self.epoch, self._pos
        if pos >= self._len:
            epoch, pos = epoch + 1, 0
        return {"backend": self.STATE_BACKEND, "epoch": epoch, "batch": pos, "num_files": self._num_items(),
                "world_size": self.world_size, "rank": self.rank, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        check_loader_state(state, self.STATE_BACKEND, self.STATE_WORDS,
                           {"num_files": self._num_items(), "world_size": self.world_size, "rank": self.rank,
                            "seed": self.seed}, "resume with the same data, seed and number of processes")
        self.epoch, self._pos, self._started = int(state["epoch"]), int(state["batch"]), True
