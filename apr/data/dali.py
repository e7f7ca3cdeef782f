"""DALI loaders: ONE pipeline definition for GPU and CPU, checkpointable for exact mid-epoch resume.

The GPU path (``decoder device "mixed"``, nvJPEG) and its CPU twin (``device_id=None``, what runs
on a machine without a GPU and in the tests) differ only in the decoder's device string, so what the
tests check is what runs on a cluster.

Sharding: ``shard_id`` = GLOBAL rank, ``num_shards`` = world size, ``device_id`` = local rank.
Every shard is read with ``pad_last_batch=True`` so an epoch never reads into the next one:

- train: the file list is put in a ``seed``-dependent order (``N % world_size`` files left out, the
  same on every rank, so every rank runs the same number of steps), then the reader reshuffles the
  whole list every epoch (``shuffle_after_epoch=True``; DALI's ``random_shuffle`` would shuffle once
  and then only rotate a 1,024-sample buffer, so consecutive epochs came in nearly the same order);
  each rank reads its contiguous slice of that epoch's order; the last partial batch is dropped;
- eval: contiguous shards, ``LastBatchPolicy.PARTIAL`` with ``reader_name`` drops the padding, so
  each image is seen exactly once over all ranks (a rank may have one batch more than another).

Resume: the pipeline is built with ``enable_checkpointing=True``; ``state_dict()`` stores
``DALIGenericIterator.checkpoints()`` (reader position and the state of every random operator), and a
pipeline rebuilt from it yields exactly the batches the uninterrupted run would have yielded next.
DALI cannot restart an epoch: a pass abandoned part-way (``max_steps_per_epoch``) continues where it
stopped on the next ``for batch in loader``.

Decode errors (verification off): DALI 2.4 stops with ``Error in CPU operator
nvidia.dali.fn.decoders.image... nvImageCodec failure: '#3'`` and does not say which file failed; the
pipeline is then dead. We re-raise it as :class:`ImageDecodeError` naming the dataset roots and the
command that finds the file (``python -m apr.data.layout ROOT --decode``).

DALI is imported only when a pipeline is built: the package imports and runs without it (the lent GPU
box has none), and ``data.backend: dali`` there stops with :class:`DaliMissingError` naming the fix.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from apr.errors import UserError

from .base import (LoaderBase, check_loader_state, data_changed_message, epoch_permutation, mix_seed, to_device_batch,
                   train_shard_size)
from .layout import ImageDecodeError

__all__ = ["DaliImageLoader", "DaliMissingError", "image_pipeline", "require_dali", "dali_available"]

_RATIO = (3.0 / 4.0, 4.0 / 3.0)


class DaliMissingError(UserError, ImportError):
    """``data.backend: dali`` on a machine without NVIDIA DALI (the lent GPU box, some clusters)."""


def _import_dali():
    """NVIDIA DALI's modules, imported only when a DALI loader is built (the package imports without it)."""
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as exc:
        raise DaliMissingError(
            f"data.backend=dali needs NVIDIA DALI, which is not installed here ({exc}): pip install "
            "nvidia-dali-cuda120, or set data.backend=gpu (torchvision.io decoding on the training device), "
            "torchvision or auto") from exc
    return fn, pipeline_def, types, DALIGenericIterator, LastBatchPolicy


def dali_available() -> bool:
    """True where NVIDIA DALI imports (what ``data.backend: auto`` picks first)."""
    try:
        _import_dali()
    except DaliMissingError:
        return False
    return True


def require_dali() -> None:
    """Stop with a one-line :class:`DaliMissingError` naming the fix where DALI is not installed."""
    _import_dali()


def _image_graph(files: Sequence[str], labels: Sequence[int], *, train: bool, image_size: int,
                 crop_scale: Sequence[float] = (0.08, 1.0), resize: int | None = None,
                 shard_id: int = 0, num_shards: int = 1, reader_seed: int = 0, decoder_device: str = "cpu"):
    """Train: RandomResizedCrop + flip. Eval: resize shorter side (optional) + center crop.
    Output: float32 CHW in [0, 1] (mean 0, std 255) and the label."""
    fn, _, types, _, _ = _import_dali()
    jpegs, labels = fn.readers.file(
        files=list(files), labels=list(labels), shard_id=shard_id, num_shards=num_shards,
        shuffle_after_epoch=train, pad_last_batch=True, stick_to_shard=not train, name="Reader", seed=reader_seed)
    if train:
        images = fn.decoders.image_random_crop(
            jpegs, device=decoder_device, output_type=types.RGB, random_area=list(crop_scale),
            random_aspect_ratio=list(_RATIO), num_attempts=10)
        images = fn.resize(images, resize_x=image_size, resize_y=image_size, interp_type=types.INTERP_LINEAR,
                           antialias=True)
        mirror = fn.random.coin_flip(probability=0.5)
        crop = None
    else:
        images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB)
        if resize:
            images = fn.resize(images, resize_shorter=resize, interp_type=types.INTERP_LINEAR, antialias=True)
        mirror = 0
        crop = (image_size, image_size)
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", crop=crop, crop_pos_x=0.5, crop_pos_y=0.5,
        mean=[0.0], std=[255.0], mirror=mirror, out_of_bounds_policy="pad", fill_values=[0.0])
    return images, labels


def image_pipeline(*args, **kwargs):
    """The DALI pipeline of :func:`_image_graph` (``@pipeline_def(enable_checkpointing=True)``, applied
    here so that DALI is imported only when a pipeline is built); takes the graph's and DALI's arguments."""
    pipeline_def = _import_dali()[1]
    return pipeline_def(enable_checkpointing=True)(_image_graph)(*args, **kwargs)


class DaliImageLoader(LoaderBase):
    """Iterable over one epoch of ``(images, labels)`` batches from a DALI pipeline (batch contract)."""

    def __init__(self, files: Sequence[str], labels: Sequence[int], classes: Sequence[str], *, batch_size: int,
                 train: bool, image_size: int, crop_scale: Sequence[float] = (0.08, 1.0), resize: int | None = None,
                 num_threads: int = 4, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 device: torch.device | str = "cpu", seed: int = 0, roots: Sequence[str] = (),
                 prefetch: int = 2):
        require_dali()
        self._init_contract(len(files), len(labels), classes, batch_size=batch_size, train=train, rank=rank,
                            world_size=world_size, seed=seed, device=device)
        self.files, self.labels = self._reader_order(list(files), [int(x) for x in labels])
        self.local_rank, self.roots = local_rank, [str(r) for r in roots]
        self._kwargs = dict(train=self.train, image_size=image_size, crop_scale=tuple(crop_scale), resize=resize,
                            shard_id=rank, num_shards=world_size, reader_seed=mix_seed(seed, 1) % (2 ** 31),
                            decoder_device="mixed" if self.device.type == "cuda" else "cpu")
        self._pipe_seed = mix_seed(seed, 2, rank) % (2 ** 31)
        self._num_threads, self._prefetch = max(1, int(num_threads)), prefetch
        self._it = self._build()

    def _reader_order(self, files: list[str], labels: list[int]) -> tuple[list[str], list[int]]:
        """Train: the file list in a ``seed``-dependent order, ``N % world_size`` files left out (the
        same on every rank) so that the shards are equal. DALI's ``shuffle_after_epoch`` reshuffles the
        whole list each epoch but from its own fixed seed; starting from a seeded order makes every
        epoch's order depend on ``train.seed``. Eval: the list as given."""
        if not self.train:
            return files, labels
        order = epoch_permutation(len(files), self.seed, -1).tolist()
        order = order[: train_shard_size(len(files), self.world_size) * self.world_size]
        return [files[i] for i in order], [labels[i] for i in order]

    def _eval_samples(self, num_items: int) -> int:
        """DALI reads contiguous eval shards: rank r gets files [r*N/W, (r+1)*N/W)."""
        return (self.rank + 1) * num_items // self.world_size - self.rank * num_items // self.world_size

    def _build(self, checkpoint: bytes | None = None):
        pipe = image_pipeline(
            self.files, self.labels, **self._kwargs, batch_size=self.batch_size, num_threads=self._num_threads,
            device_id=self._device_id(), seed=self._pipe_seed,
            prefetch_queue_depth=self._prefetch, checkpoint=checkpoint)
        DALIGenericIterator, LastBatchPolicy = _import_dali()[3:]
        try:
            pipe.build()
            return DALIGenericIterator(
                [pipe], ["images", "labels"], reader_name="Reader", auto_reset=False,
                last_batch_policy=LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL)
        except RuntimeError as exc:  # the first batch is decoded when the iterator is created
            raise self._decode_error(exc) from exc

    def _device_id(self) -> int | None:
        """The GPU DALI decodes on: the training device's own index (accelerate uses local_rank % visible
        GPUs, so with one visible GPU per process that is 0, not the local rank); None on CPU."""
        if self.device.type != "cuda":
            return None
        return self.device.index if self.device.index is not None else self.local_rank

    def set_epoch(self, epoch: int) -> None:
        """Bookkeeping only: DALI's reader moves to the next epoch by itself (its order is seeded)."""
        self.epoch = int(epoch)

    def __iter__(self):
        if not self.train and 0 < self._pos < self._len:  # an abandoned eval pass: finish it, start over
            for _ in range(self._len - self._pos):
                next(self._it)
            self._pos = self._len
        if self._pos >= self._len:
            self._next_epoch()
        epoch = self.epoch
        while self.epoch == epoch and self._pos < self._len:
            try:
                out = next(self._it)[0]
            except StopIteration:
                break
            except RuntimeError as exc:
                raise self._decode_error(exc) from exc
            self._pos += 1
            yield to_device_batch(out["images"], out["labels"], self.device)
        if self.epoch == epoch and self._pos >= self._len:
            self._next_epoch()

    def _next_epoch(self) -> None:
        self._it.reset()
        self._pos = 0
        self.epoch += 1

    def state_dict(self) -> dict:
        """Position after the last yielded batch: DALI checkpoint bytes + epoch/batch counters."""
        if self._pos >= self._len:  # epoch finished: checkpoint the start of the next one
            self._next_epoch()
        return {"backend": "dali", "epoch": self.epoch, "batch": self._pos, "num_files": len(self.files),
                "world_size": self.world_size, "rank": self.rank, "seed": self.seed,
                "checkpoint": bytes(self._it.checkpoints()[0])}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved reader position. If the data set changed since (another file count) or
        the state comes from the older reader without a seeded file order (no ``seed`` key), the saved
        position means nothing: warn and restart the interrupted epoch with a fresh reader."""
        check_loader_state(state, "dali", "dali", {"world_size": self.world_size, "rank": self.rank},
                           "resume with the same number of processes")
        if "seed" in state:
            check_loader_state(state, "dali", "dali", {"seed": self.seed}, "resume with the same seed")
        reason = None
        if state["num_files"] != len(self.files):
            reason = data_changed_message(state["num_files"], len(self.files))
        elif "seed" not in state:
            reason = ("the loader state was written by an older DALI reader (one shuffle, then a rotating buffer); "
                      "the interrupted epoch restarts from its first batch in the new per-epoch order")
        if reason:
            warnings.warn(reason, stacklevel=2)
        self._it = self._build(None if reason else bytes(state["checkpoint"]))
        self.epoch, self._pos = int(state["epoch"]), 0 if reason else int(state["batch"])

    def _decode_error(self, exc: RuntimeError) -> Exception:
        text = str(exc)
        if "decoders" not in text and "nvImageCodec" not in text:
            return exc
        roots = ", ".join(self.roots) or "the dataset folders"
        first = " ".join(line.strip() for line in text.splitlines() if "failure" in line or "Error in" in line)
        return ImageDecodeError(
            f"DALI could not decode an image from {roots} ({first}). DALI does not report which file; find it "
            f"with `python -m apr.data.layout <root> --decode`, or keep data.verify_images=true, which skips "
            f"truncated and non-image files before training.")
