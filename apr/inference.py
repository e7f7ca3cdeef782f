"""The one inference path: [0, 1] images in, float32 logits out.

Every loop of the project (training, validation, corruption evaluation, OOD scoring, attacks,
Fourier analysis, benchmarks) feeds models through :class:`ImageClassifier`, so normalisation,
``channels_last`` and mixed precision are decided in one place and an attack differentiates
through exactly what evaluation runs. Precision has one vocabulary, ``bf16 | fp16 | fp32``, and one
default, ``auto`` (:func:`resolve_precision`): bf16 on a CUDA GPU, fp32 on a CPU, for every command.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

__all__ = ["PRECISIONS", "check_precision", "default_precision", "resolve_precision", "autocast", "Normaliser", "ImageClassifier",
           "eval_mode", "predict_batches"]

PRECISIONS = ("bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {' | '.join(PRECISIONS)}; got {precision!r}")
    return precision


def default_precision(device: torch.device | str) -> str:
    """bf16 where it is fast (a CUDA GPU), fp32 elsewhere (bf16 on a CPU is slow and only adds noise)."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def resolve_precision(precision: str | None, device: torch.device | str) -> str:
    """``auto`` (or None) -> :func:`default_precision` of ``device``; any other value is checked and kept."""
    if precision in (None, "auto"):
        return default_precision(device)
    return check_precision(precision)


def autocast(device: torch.device | str, precision: str):
    """bf16 / fp16 autocast on ``device``, or nothing for fp32."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[precision])


class Normaliser(nn.Module):
    """(x - mean) / std per channel; identity when mean and std are None (a model fed [0, 1] images).

    A module (buffers, no parameters) so it moves with ``.to(device)`` and is differentiable for attacks.
    """

    def __init__(self, mean: Sequence[float] | None, std: Sequence[float] | None, channels_last: bool = False):
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither (for a model that takes [0, 1] images)")
        self.channels_last = channels_last
        self.identity = mean is None
        if self.identity:
            return
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32).reshape(-1)
        std_t = torch.as_tensor(list(std), dtype=torch.float32).reshape(-1)
        if mean_t.numel() != std_t.numel():
            raise ValueError(f"mean and std need one value per channel each, got {mean_t.numel()} and {std_t.numel()}")
        if not torch.isfinite(mean_t).all() or not (std_t > 0).all():
            raise ValueError(f"mean must be finite and std positive, got mean {list(mean)}, std {list(std)}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if not self.identity:
            if x.shape[1] != self.mean.shape[1]:
                raise ValueError(f"images have {x.shape[1]} channels, mean/std have {self.mean.shape[1]}")
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class ImageClassifier(nn.Module):
    """``model`` behind its normalisation and precision: takes [0, 1] images, returns float32 logits.

    Checkpoints hold ``classifier.model.state_dict()``: plain model weights, loadable without this wrapper.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None,
                 precision: str = "fp32", channels_last: bool = False):
        super().__init__()
        self.model = model
        self.normalise = Normaliser(mean, std, channels_last=channels_last)
        self.precision = check_precision(precision)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalise(images)
        with autocast(x.device, self.precision):
            logits = self.model(x)
        return logits.float()


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model.eval()`` for the block, then back to the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def predict_batches(classifier: nn.Module, batches: Iterable, device: torch.device | str | None = None,
                    progress=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, labels) per batch of ``batches`` (the loader contract: [0, 1] images, int64 labels).

    Eval mode and no autograd for the whole iteration; tensors stay on the device (no host sync),
    so callers reduce them where they need numbers. ``progress``: a tqdm bar advanced by batch size.
    """
    with eval_mode(classifier), torch.inference_mode():
        for images, labels in batches:
            if device is not None:
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
            logits = classifier(images)
            if progress is not None:
                progress.update(labels.numel())
            yield logits, labels
