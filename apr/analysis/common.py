"""Inputs every analysis takes: [0, 1] image tensors, labels, and a model behind apr.inference."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from apr.inference import ImageClassifier, check_precision

__all__ = ["as_images", "as_labels", "resolve_device", "classifier_for"]


def as_images(images, name: str = "images") -> torch.Tensor:
    """N x C x H x W floats in [0, 1]; uint8 images are scaled by 1/255."""
    images = torch.as_tensor(images)
    if images.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor N x C x H x W, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"{name} must be float in [0, 1] or uint8, got dtype {images.dtype}")
    if images.dtype in (torch.float16, torch.bfloat16):
        images = images.float()
    return images


def as_labels(labels, n: int) -> torch.Tensor:
    """int64 labels on the CPU whatever the caller's device: counts and pairings are tallied there."""
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    if labels.numel() != n:
        raise ValueError(f"got {n} images but {labels.numel()} labels")
    return labels


def resolve_device(model: nn.Module, device) -> torch.device:
    """``device`` if given, else where the model's weights are (CPU for a model without any)."""
    if device is not None:
        return torch.device(device)
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def classifier_for(model: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None, channels: int,
                   device: torch.device, precision: str = "fp32", channels_last: bool = False) -> ImageClassifier:
    """``model`` on ``device`` behind the project's one inference path (normalise, channels_last, autocast).

    Checks mean/std against the images' channel count up front, so a wrong config fails before any work."""
    check_precision(precision)
    for values in (mean, std):
        if values is not None and len(list(values)) != channels:
            raise ValueError(f"mean and std need {channels} values (one per channel), got "
                             f"{len(list(mean or []))} and {len(list(std or []))}")
    return ImageClassifier(model, mean, std, precision=precision, channels_last=channels_last).to(device)
