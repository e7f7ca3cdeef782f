"""Amplitude/phase swap: give image A the amplitude spectrum of image B. Does the model follow the
amplitude (predicts B) or the phase (predicts A)? Humans follow the phase; APR pushes models there.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from apr.fourier import recombine
from apr.inference import eval_mode

from .common import as_images, as_labels, classifier_for, resolve_device

__all__ = ["SWAP_COLUMNS", "swap_predictions", "class_derangement", "amplitude_follow_fraction"]


def _per_model(value, names: Sequence[str], what: str) -> dict:
    if isinstance(value, Mapping):
        missing = [n for n in names if n not in value]
        if missing:
            raise ValueError(f"{what} has no entry for model(s) {', '.join(missing)}")
        return {n: value[n] for n in names}
    return {n: value for n in names}


SWAP_COLUMNS = ("A", "B", "amplitude B + phase A", "amplitude A + phase B")


def swap_predictions(models: Mapping[str, nn.Module], images_a, images_b, *, mean=None, std=None, device=None,
                     precision: str = "fp32", dim: Sequence[int] = (-3, -2, -1)) -> dict:
    """Predictions of each model on A, B and both recombinations, for pairs of images.

    Returns ``{"images": 4 x P x C x H x W tensor (columns as SWAP_COLUMNS),
    "predictions": {name: (4 x P) class indices}, "confidences": {name: (4 x P)}}``.
    ``mean``/``std``: one value for all models or a mapping name -> value.
    """
    a = as_images(images_a, "images_a")
    b = as_images(images_b, "images_b")
    if a.shape != b.shape:
        raise ValueError(f"images_a and images_b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not models:
        raise ValueError("swap_predictions needs at least one model")
    names = list(models)
    means, stds = _per_model(mean, names, "mean"), _per_model(std, names, "std")
    grid = torch.stack([a, b, recombine(b, a, dim=dim), recombine(a, b, dim=dim)])
    predictions, confidences = {}, {}
    for name in names:
        dev = resolve_device(models[name], device)
        classifier = classifier_for(models[name], means[name], stds[name], a.shape[1], dev, precision)
        with eval_mode(classifier), torch.inference_mode():
            probs = classifier(grid.flatten(0, 1).to(dev)).softmax(dim=-1)
        conf, pred = probs.max(dim=-1)
        predictions[name] = pred.view(4, -1).cpu()
        confidences[name] = conf.view(4, -1).cpu()
    return {"images": grid, "predictions": predictions, "confidences": confidences}


def class_derangement(labels, seed: int = 0) -> np.ndarray:
    """A random permutation ``perm`` with ``labels[perm[i]] != labels[i]`` for every i.

    Each image is used once as a partner. Impossible when one class holds more than half of
    the images (pigeonhole), which is reported as an error.
    """
    labels = np.asarray(torch.as_tensor(labels).cpu()).reshape(-1)
    n = labels.size
    _, counts = np.unique(labels, return_counts=True)
    if n < 2 or counts.max() * 2 > n:
        raise ValueError(
            f"cannot pair every image with one of another class: the largest class has {counts.max()} of "
            f"{n} images (needs at most half)"
        )
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    for _ in range(1000):
        bad = np.flatnonzero(labels[perm] == labels)
        if bad.size == 0:
            return perm
        for i in bad:
            if labels[perm[i]] != labels[i]:
                continue  # fixed by an earlier swap
            # swap partners with a random position j when both end up valid
            for j in rng.permutation(n):
                if labels[perm[j]] != labels[i] and labels[perm[i]] != labels[j]:
                    perm[i], perm[j] = perm[j], perm[i]
                    break
    raise RuntimeError("class_derangement did not converge")  # not reached for valid input


def amplitude_follow_fraction(model: nn.Module, images, labels, *, mean=None, std=None, batch_size: int = 256,
                              device=None, precision: str = "fp32", seed: int = 0,
                              dim: Sequence[int] = (-3, -2, -1), progress: bool = False) -> dict:
    """How often the model follows the amplitude rather than the phase of an image.

    Each image A is paired with an image B of another class (:func:`class_derangement`); the
    model sees recombine(amplitude=B, phase=A). Counts predictions equal to B's label
    ("amplitude"), to A's label ("phase") or neither, over all pairs and over the pairs whose
    two originals the model classifies correctly ("both_correct").
    """
    images = as_images(images)
    labels = as_labels(labels, images.shape[0])
    perm = torch.from_numpy(class_derangement(labels, seed))
    dev = resolve_device(model, device)
    classifier = classifier_for(model, mean, std, images.shape[1], dev, precision)
    tallies = {key: np.zeros(3, dtype=np.int64) for key in ("all", "both_correct")}
    from tqdm.auto import tqdm

    with eval_mode(classifier), torch.inference_mode():
        clean = torch.empty(images.shape[0], dtype=torch.long)
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(dev)
            clean[start:start + batch_size] = classifier(x).argmax(-1).cpu()
        correct = clean == labels
        for start in tqdm(range(0, images.shape[0], batch_size), disable=not progress, desc="amplitude swap"):
            idx = torch.arange(start, min(start + batch_size, images.shape[0]))
            a, b = images[idx].to(dev), images[perm[idx]].to(dev)
            pred = classifier(recombine(b, a, dim=dim)).argmax(-1).cpu()
            la, lb = labels[idx], labels[perm[idx]]
            kinds = torch.where(pred == lb, 0, torch.where(pred == la, 1, 2))
            both = correct[idx] & correct[perm[idx]]
            tallies["all"] += np.bincount(kinds.numpy(), minlength=3)
            tallies["both_correct"] += np.bincount(kinds[both].numpy(), minlength=3)

    def summary(t: np.ndarray) -> dict:
        total = int(t.sum())
        frac = (lambda v: float(v) / total if total else None)
        return {"pairs": total, "amplitude_count": int(t[0]), "phase_count": int(t[1]), "neither_count": int(t[2]),
                "amplitude_fraction": frac(t[0]), "phase_fraction": frac(t[1]), "neither_fraction": frac(t[2])}

    result = summary(tallies["all"])
    result["both_correct"] = summary(tallies["both_correct"])
    result["clean_accuracy"] = float(correct.float().mean())
    result["dim"] = list(dim)
    result["seed"] = seed
    return result
