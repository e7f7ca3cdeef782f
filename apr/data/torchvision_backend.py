"""torchvision/DataLoader backend with the same batch contract and resume semantics as the DALI one.

For machines without DALI (the lent GPU box, laptops) and as the reference the DALI pipeline is
tested against. Train: RandomResizedCrop(image_size, scale=crop_scale) + RandomHorizontalFlip;
eval: Resize(shorter side) + CenterCrop; both end in ``ToImage`` + ``ToDtype(float32, scale=True)``.

Exact resume without saving worker state: the epoch order is a permutation seeded by
``(seed, epoch)`` (identical on every rank, then split ``rank::world_size`` like DistributedSampler
with ``drop_last``), and each sample's augmentation is seeded by ``(seed, epoch, index)``. A resumed
loader therefore only needs ``(epoch, batch)`` to regenerate exactly the batches that come next.

Undecodable files that pass the header check (a valid JPEG header on a scrambled body) are skipped
the way header-bad ones are: warned about, listed in ``loader.skipped_files``; a training batch gets
a seeded stand-in sample (same size, same resume), an evaluation batch leaves the file out.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from apr.checkpoint import ignore_stop_signals

from .base import (SeededPosition, SkipList, epoch_permutation, eval_shard, mix_seed, to_device_batch,
                   train_shard_size)
from .layout import ImageDecodeError

__all__ = ["TorchvisionImageLoader", "build_transform"]


def build_transform(train: bool, image_size: int, crop_scale: Sequence[float] = (0.08, 1.0),
                    resize: int | None = None):
    from torchvision.transforms import v2

    if train:
        ops = [v2.ToImage(), v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True),
               v2.RandomHorizontalFlip()]
    else:
        ops = [v2.ToImage()]
        if resize:
            ops.append(v2.Resize(resize, antialias=True))
        ops.append(v2.CenterCrop(image_size))
    return v2.Compose(ops + [v2.ToDtype(torch.float32, scale=True)])


MAX_REPLACEMENTS = 16  # tries to find a decodable stand-in before the data set is declared broken


def _decode(path: str):
    """The file as an RGB PIL image, or the reason it cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return _to_rgb(img), None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad data
        return None, f"{type(exc).__name__}: {exc}"


def _to_rgb(img):
    """RGB, 8 bits per channel. 16-bit greyscale (PIL modes ``I;16*``, and ``I`` from a 16-bit PNG) is scaled
    by 255/65535: PIL's own ``convert("RGB")`` clips it at 255, which turns almost every pixel white."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        import numpy as np

        scaled = np.asarray(img, dtype=np.float64).clip(0, 65535) * (255.0 / 65535.0)
        img = Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
    return img.convert("RGB")


class _ImageFiles(Dataset):
    """Decodes one file; item = (dataset index, epoch) so the augmentation can be seeded per sample.

    A file that passed the header check but does not decode (a scrambled body) is reported back with
    the batch: in training it is replaced by another sample of the data set, drawn from
    ``(seed, epoch, index)`` so that a resumed run draws the same stand-in; in evaluation it is left
    out (a stand-in would count another image twice)."""

    def __init__(self, files, labels, transform, seed: int, train: bool):
        self.files, self.labels, self.transform, self.seed, self.train = files, labels, transform, seed, train

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item):
        index, epoch = item
        bad = []
        source = index
        for attempt in range(MAX_REPLACEMENTS + 1):
            img, reason = _decode(self.files[source])
            if img is not None:
                break
            bad.append((self.files[source], reason))
            if not self.train:
                return None, self.labels[index], bad
            source = mix_seed(self.seed, epoch, index, attempt) % len(self.files)
        else:
            raise ImageDecodeError(f"cannot decode image {bad[0][0]} ({bad[0][1]}) nor {MAX_REPLACEMENTS} "
                                   f"stand-ins drawn from the data set: check it with "
                                   f"`python -m apr.data.layout <root> --decode`")
        if self.train:
            with torch.random.fork_rng(devices=[]):  # never disturb the caller's global RNG
                torch.manual_seed(mix_seed(self.seed, epoch, index))
                x = self.transform(img)
        else:
            x = self.transform(img)
        return x, self.labels[source], bad


def _collate(items):
    """Stack the decoded samples; hand back the undecodable files met on the way."""
    kept = [(x, y) for x, y, _ in items if x is not None]
    bad = [entry for _, _, found in items for entry in found]
    if not kept:
        return None, None, bad
    return torch.stack([x for x, _ in kept]), torch.tensor([y for _, y in kept], dtype=torch.int64), bad


class TorchvisionImageLoader(SeededPosition):
    """Iterable over one epoch of ``(images, labels)`` batches decoded by DataLoader workers."""

    STATE_BACKEND, STATE_WORDS = "torchvision", "torchvision"

    def __init__(self, files: Sequence[str], labels: Sequence[int], classes: Sequence[str], *, batch_size: int,
                 train: bool, image_size: int, crop_scale: Sequence[float] = (0.08, 1.0), resize: int | None = None,
                 num_workers: int = 4, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                 seed: int = 0):
        self._init_contract(len(files), len(labels), classes, batch_size=batch_size, train=train, rank=rank,
                            world_size=world_size, seed=seed, device=device)
        self.files, self.labels = list(files), [int(x) for x in labels]
        self.num_workers = max(0, int(num_workers))
        self.skips = SkipList(self.train)  # undecodable files met while iterating
        self.skipped_files = self.skips.files  # path -> reason
        self._dataset = _ImageFiles(self.files, self.labels, build_transform(train, image_size, crop_scale, resize),
                                    self.seed, self.train)

    def _indices(self) -> list[int]:
        n = len(self.files)
        if not self.train:
            return list(eval_shard(n, self.rank, self.world_size))
        order = epoch_permutation(n, self.seed, self.epoch)[: train_shard_size(n, self.world_size) * self.world_size]
        mine = order[self.rank::self.world_size][: self._len * self.batch_size]
        return mine.tolist()

    def __iter__(self):
        epoch, start = self._begin_pass()
        items = [(i, epoch) for i in self._indices()[start * self.batch_size:]]
        batches = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        loader = DataLoader(self._dataset, batch_sampler=batches, num_workers=self.num_workers, collate_fn=_collate,
                            pin_memory=self.device.type == "cuda", persistent_workers=False,
                            prefetch_factor=4 if self.num_workers else None, worker_init_fn=ignore_stop_signals,
                            generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch)))  # not the global RNG
        for images, labels, bad in loader:
            if self.epoch != epoch:
                break
            self._pos += 1
            for path, reason in bad:
                self.skips.add(path, reason)
            if images is not None:
                yield to_device_batch(images, labels, self.device)

    def _num_items(self) -> int:
        return len(self.files)
