"""GPU JPEG decoding without DALI: ``torchvision.io.decode_jpeg`` on the training device (``data.backend: gpu``).

For GPU machines without NVIDIA DALI (the lent H100 box, clusters where the wheel is not installed).
Background threads read the files' bytes (a small thread pool, at most ``prefetch`` batches ahead);
the iterating thread decodes one batch with ONE batched ``decode_jpeg(list, device=device)`` call
(nvJPEG on a GPU, libjpeg-turbo on a CPU: only the device string differs, so the CPU tests check the
code that runs on the GPU), then crops, resizes and flips each image on that device with
``torchvision.transforms.v2.functional`` (bilinear, antialiased, as the torchvision backend):

- train: RandomResizedCrop(image_size, scale=crop_scale, ratio=(3/4, 4/3)) + horizontal flip (p=0.5);
- eval: resize the shorter side to ``resize`` (keep the aspect ratio) + center crop ``image_size``
  (zero padding where the image is smaller, like DALI's ``out_of_bounds_policy="pad"``).

Output: float32 N x 3 x H x W in [0, 1] and int64 labels on the device (the batch contract).
Grayscale and CMYK JPEGs come out as 3 channels (``ImageReadMode.RGB``); files nvJPEG refuses (a PNG
saved as ``.JPEG``, as ImageNet has one) are decoded by ``decode_image`` on the CPU and moved over.

Epoch order and draws are those of the torchvision backend: a permutation seeded by (seed, epoch),
split ``rank::world_size``; each sample's crop and flip drawn from a generator seeded by
(seed, epoch, index) with RandomResizedCrop's algorithm, so the two backends crop the same boxes.
The resume state is therefore just (epoch, next batch) (:class:`apr.data.base.SeededPosition`).
Undecodable files are skipped as in the torchvision backend: warned about once, listed in
``loader.skipped_files``; training takes a seeded stand-in, evaluation leaves the file out.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

from .base import SeededPosition, SkipList, epoch_permutation, eval_shard, mix_seed, train_shard_size
from .layout import ImageDecodeError

__all__ = ["GpuDecodeLoader", "crop_box", "read_bytes", "decode_batch"]

RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's aspect-ratio range (torchvision's and DALI's default)
MAX_REPLACEMENTS = 16  # tries to find a decodable stand-in before the data set is declared broken


def crop_box(height: int, width: int, scale: Sequence[float], generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop box: torchvision's algorithm and order of draws (10 tries of
    area x aspect ratio, then a center crop with the ratio clamped), from ``generator`` instead of the global RNG."""
    area = height * width
    log_ratio = torch.log(torch.tensor(RATIO))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        log_aspect = torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(), generator=generator)
        aspect = torch.exp(log_aspect).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(RATIO):
        w, h = width, int(round(width / min(RATIO)))
    elif in_ratio > max(RATIO):
        w, h = int(round(height * max(RATIO))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def read_bytes(path: str) -> torch.Tensor:
    """The file's bytes as a 1-D uint8 CPU tensor (what ``decode_jpeg`` takes); empty for an empty file."""
    with open(path, "rb") as f:
        data = f.read()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _decode_one(data: torch.Tensor, device: torch.device):
    """(uint8 3 x H x W image on ``device``, None) or (None, reason): nvJPEG / libjpeg-turbo first, then
    ``decode_image`` on the CPU for what the JPEG decoder refuses (PNG bytes, CMYK on some nvJPEG builds)."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    try:
        image = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        if image.shape[0] == 3:
            return image, None
        first = f"decode_jpeg gave {image.shape[0]} channels in RGB mode"
    except RuntimeError as exc:
        first = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    try:
        return decode_image(data, mode=ImageReadMode.RGB).to(device), None
    except RuntimeError:
        return None, first


def decode_batch(datas: Sequence[torch.Tensor], device: torch.device) -> tuple[list, list]:
    """Decode a batch of encoded images to uint8 3 x H x W tensors on ``device`` with one batched
    ``decode_jpeg`` call; where it fails (it returns no partial result), each file alone, so that only
    the bad ones are lost. Returns (images, reasons): ``None`` image and a reason for an undecodable file."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if all(len(d) for d in datas):
        try:
            images = decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device)
            if all(image.shape[0] == 3 for image in images):  # RGB mode promises 3 channels; else one by one
                return list(images), [None] * len(images)
        except RuntimeError:
            pass
    pairs = [_decode_one(d, device) if len(d) else (None, "empty file") for d in datas]
    return [image for image, _ in pairs], [reason for _, reason in pairs]


def in_background(make_items, depth: int, name: str):
    """Iterate ``make_items()`` in a daemon thread at most ``depth`` items ahead of the consumer; an exception
    there is raised here; closing this generator (a pass abandoned part-way) stops the thread."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop, done = threading.Event(), object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in make_items():
                if not put((None, item)):
                    return
            put((None, done))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put((exc, None))

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            exc, item = items.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _to_unit(image: torch.Tensor) -> torch.Tensor:
    """uint8 (or uint16, what ``decode_image`` gives for a 16-bit PNG) -> float32 in [0, 1], before resizing
    so that the resize itself is not rounded to uint8."""
    scale = 65535.0 if image.dtype == torch.uint16 else 255.0
    return image.to(torch.float32).div_(scale)


def train_view(image: torch.Tensor, image_size: int, scale: Sequence[float],
               generator: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop + horizontal flip of one uint8 image; the box and the coin come from ``generator``."""
    from torchvision.transforms.v2 import functional as F

    top, left, h, w = crop_box(image.shape[-2], image.shape[-1], scale, generator)
    out = F.resize(_to_unit(image[:, top:top + h, left:left + w]), [image_size, image_size], antialias=True)
    flip = torch.rand(1, generator=generator).item() < 0.5  # RandomHorizontalFlip(0.5): flips when rand < p
    return out.flip(-1) if flip else out


def eval_view(image: torch.Tensor, image_size: int, resize: int | None) -> torch.Tensor:
    """Resize the shorter side to ``resize`` (keeping the ratio; skipped for None) + center crop."""
    from torchvision.transforms.v2 import functional as F

    out = _to_unit(image)
    if resize:
        out = F.resize(out, [int(resize)], antialias=True)
    return F.center_crop(out, [image_size, image_size])


class GpuDecodeLoader(SeededPosition):
    """Iterable over one epoch of ``(images, labels)`` batches decoded and augmented on ``device``."""

    STATE_BACKEND, STATE_WORDS = "gpu", "gpu (torchvision.io decoding on the training device)"

    def __init__(self, files: Sequence[str], labels: Sequence[int], classes: Sequence[str], *, batch_size: int,
                 train: bool, image_size: int, crop_scale: Sequence[float] = (0.08, 1.0), resize: int | None = None,
                 num_workers: int = 4, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                 seed: int = 0, prefetch: int = 2):
        self._init_contract(len(files), len(labels), classes, batch_size=batch_size, train=train, rank=rank,
                            world_size=world_size, seed=seed, device=device)
        self.files, self.labels = list(files), [int(x) for x in labels]
        self.image_size, self.crop_scale, self.resize = int(image_size), tuple(crop_scale), resize
        self.num_workers, self.prefetch = max(1, int(num_workers)), max(1, int(prefetch))
        self.skips = SkipList(self.train)  # undecodable files met while iterating
        self.skipped_files = self.skips.files  # path -> reason

    def _indices(self) -> list[int]:
        """This rank's samples of the current pass, in order (the torchvision backend's order)."""
        n = len(self.files)
        if not self.train:
            return list(eval_shard(n, self.rank, self.world_size))
        order = epoch_permutation(n, self.seed, self.epoch)[: train_shard_size(n, self.world_size) * self.world_size]
        return order[self.rank::self.world_size][: self._len * self.batch_size].tolist()

    def __iter__(self):
        epoch, start = self._begin_pass()
        indices = self._indices()[start * self.batch_size:]
        batches = [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        device = self._concrete_device()
        produced = in_background(lambda: self._produce(batches, epoch, device), self.prefetch, "apr-decode")
        for bad, out in produced:
            if self.epoch != epoch:
                produced.close()
                break
            self._pos += 1
            for path, reason in bad:
                self.skips.add(path, reason)
            if out is not None:
                if device.type == "cuda":  # made on the decode thread's stream, used on this one
                    for tensor in out:
                        tensor.record_stream(torch.cuda.current_stream(device))
                yield out

    def _concrete_device(self) -> torch.device:
        """The device with its index: a new thread starts on GPU 0, not on this process's current GPU."""
        if self.device.type == "cuda" and self.device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return self.device

    def _produce(self, batches: list[list[int]], epoch: int, device: torch.device):
        """(skipped files, batch or None) per batch, decoded on the decode thread; on a GPU on a stream of
        its own, finished before it is handed over (so the training stream never waits for a partial batch)."""
        on_gpu = device.type == "cuda"
        stream = torch.cuda.Stream(device) if on_gpu else None
        with torch.cuda.device(device) if on_gpu else contextlib.nullcontext(), \
                torch.cuda.stream(stream) if on_gpu else contextlib.nullcontext():
            for batch, datas in self._read_ahead(batches):
                item = self._decode(batch, datas, epoch, device)
                if on_gpu:
                    stream.synchronize()
                yield item

    def _read_ahead(self, batches: list[list[int]]):
        """(indices, bytes) per batch, read by ``num_workers`` threads at most ``prefetch`` batches ahead."""
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="apr-read") as pool:
            pending: deque = deque()
            todo = iter(batches)
            try:
                while True:
                    while len(pending) < self.prefetch and (batch := next(todo, None)) is not None:
                        pending.append((batch, [pool.submit(read_bytes, self.files[i]) for i in batch]))
                    if not pending:
                        return
                    batch, futures = pending.popleft()
                    yield batch, [f.result() for f in futures]
            finally:  # an abandoned pass: drop what was queued, do not read it
                for _, futures in pending:
                    for f in futures:
                        f.cancel()

    def _decode(self, batch: list[int], datas: list[torch.Tensor], epoch: int, device: torch.device):
        """(undecodable (path, reason) pairs, (images, labels) on ``device`` or None when no image of an eval
        batch decodes). Runs on the decode thread: it reports nothing itself, the consumer warns."""
        images, reasons = decode_batch(datas, device)
        bad, views, labels = [], [], []
        for index, image, reason in zip(batch, images, reasons):
            label = self.labels[index]
            if image is None:
                bad.append((self.files[index], reason))
                if not self.train:
                    continue
                image, label = self._stand_in(index, epoch, device, bad)
            views.append(self._view(image, epoch, index))
            labels.append(label)
        if not views:
            return bad, None
        return bad, (torch.stack(views), torch.tensor(labels, dtype=torch.int64).to(device, non_blocking=True))

    def _view(self, image: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        if not self.train:
            return eval_view(image, self.image_size, self.resize)
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index))
        return train_view(image, self.image_size, self.crop_scale, generator)

    def _stand_in(self, index: int, epoch: int, device: torch.device, bad: list) -> tuple[torch.Tensor, int]:
        """A decodable training sample in place of an undecodable one, drawn from (seed, epoch, index,
        attempt) as the torchvision backend does, so a resumed run draws the same one."""
        for attempt in range(MAX_REPLACEMENTS):
            source = mix_seed(self.seed, epoch, index, attempt) % len(self.files)
            (image,), (reason,) = decode_batch([read_bytes(self.files[source])], device)
            if image is not None:
                return image, self.labels[source]
            bad.append((self.files[source], reason))
        raise ImageDecodeError(f"cannot decode image {self.files[index]} nor {MAX_REPLACEMENTS} stand-ins drawn from "
                               f"the data set: check it with `python -m apr.data.layout <root> --decode`")

    def _num_items(self) -> int:
        return len(self.files)
